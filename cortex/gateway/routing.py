"""The in-memory routing table: model name or alias -> replicas, and replica selection.

Built from the registry (`RoutingTable.sync`), it keeps what only this process knows across
rebuilds: each replica's health, requests in flight and pool of upstream connections.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .registry import ApiKeyRecord, ReplicaRecord
from .upstream import ConnectionPool


UNCHECKED = "not checked yet"


class Replica:
    """One engine endpoint serving one model, as the router sees it."""

    __slots__ = (
        "id",
        "model",
        "url",
        "host",
        "port",
        "state",
        "healthy",
        "in_flight",
        "pool",
        "request_head",
        "labels",
        "engine_api_key",
        "removed",
        "reason",
    )

    def __init__(self, record: ReplicaRecord, connect_timeout: float) -> None:
        parts = urlsplit(record.url)
        self.id = record.id
        self.model = record.model
        self.url = record.url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        # Not routable until a health pass has verified that the engine registered here answers
        # (cortex.gateway.identity); a registration through the admin API marks it healthy at once,
        # because the deploy flow registers only replicas that passed smoke tests.
        self.healthy = False
        self.reason = UNCHECKED  # why it is not healthy ("" when it is)
        self.in_flight = 0
        self.removed = False
        self.pool = ConnectionPool(self.host, self.port, connect_timeout)
        self.update(record)

    def update(self, record: ReplicaRecord) -> None:
        self.state = record.state
        self.labels = record.labels
        self.engine_api_key = record.engine_api_key
        netloc = urlsplit(record.url).netloc
        # Fixed part of every request's head, assembled once per replica.
        head = f"Host: {netloc}\r\n"
        if record.engine_api_key:
            head += f"Authorization: Bearer {record.engine_api_key}\r\n"
        self.request_head = head.encode("latin-1")

    @property
    def routable(self) -> bool:
        return self.state == "active" and self.healthy and not self.removed

    def public(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "url": self.url,
            "state": self.state,
            "healthy": self.healthy,
            "reason": self.reason,
            "in_flight": self.in_flight,
            "labels": self.labels,
        }


class RoutingTable:
    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.replicas: dict[str, Replica] = {}
        self.models: dict[str, list[Replica]] = {}  # served name and each alias -> replicas
        self.canonical: dict[str, str] = {}  # name or alias -> served name
        self.aliases_of: dict[str, list[str]] = {}
        self.keys_by_hash: dict[str, ApiKeyRecord] = {}

    def sync(self, records: list[ReplicaRecord], aliases: dict[str, str], keys: list[ApiKeyRecord]) -> list[Replica]:
        """Rebuild from the registry; returns replicas that disappeared (their pools to close)."""
        seen: dict[str, Replica] = {}
        for record in records:
            replica = self.replicas.get(record.id)
            if replica is None or replica.url != record.url or replica.model != record.model:
                replica = Replica(record, self.connect_timeout)
            else:
                replica.update(record)
            seen[record.id] = replica
        gone = [r for rid, r in self.replicas.items() if seen.get(rid) is not r]
        for replica in gone:
            replica.removed = True
        by_model: dict[str, list[Replica]] = {}
        for replica in seen.values():
            by_model.setdefault(replica.model, []).append(replica)
        canonical = {name: name for name in by_model}
        aliases_of: dict[str, list[str]] = {}
        for alias, model in aliases.items():
            if model in by_model and alias not in by_model:
                canonical[alias] = model
                aliases_of.setdefault(model, []).append(alias)
        self.replicas = seen
        self.models = {name: by_model[model] for name, model in canonical.items()}
        self.canonical = canonical
        self.aliases_of = aliases_of
        self.keys_by_hash = {k.key_hash: k for k in keys}
        return gone

    def pick(self, replicas: list[Replica], tried: tuple[Replica, ...] = ()) -> Replica | None:
        """The routable replica with the fewest requests in flight, skipping ones already tried."""
        best = None
        for replica in replicas:
            if replica.state == "active" and replica.healthy and not replica.removed and replica not in tried:
                if best is None or replica.in_flight < best.in_flight:
                    best = replica
        return best

    def available_models(self) -> list[str]:
        """Served names with at least one routable replica."""
        return [m for m, rs in self.models.items() if self.canonical[m] == m and any(r.routable for r in rs)]
