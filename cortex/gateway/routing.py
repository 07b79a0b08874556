"""The in-memory routing table: model name or alias -> replicas, fallbacks, and replica selection.

Built from the registry (`RoutingTable.sync`), it keeps what only this process knows across
rebuilds: each replica's health, requests in flight and pool of upstream connections.

Replica selection (`RoutingTable.pick`) is least-in-flight, or, for a model with several
routable replicas and a request with a prompt prefix (`prefix_key`), prefix-cache affinity:
rendezvous hashing (highest random weight) of the prefix over the routable replicas, so that
requests sharing a system prompt and opening turn reach the replica whose prefix cache holds it,
and a replica joining or leaving moves only its own share of prefixes. The load stays bounded:
when the chosen replica has more than `load_ratio` x (mean in flight + 1) requests in flight,
the request goes to the least busy replica instead.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

import orjson

from .inflight import InFlightBoard, InFlightCount, LocalCount
from .registry import ApiKeyRecord, ReplicaRecord
from .upstream import ConnectionPool


UNCHECKED = "not checked yet"

# How much of a prompt the affinity key covers, in characters. Long enough to tell apart system
# prompts that share a boilerplate opening (a few hundred tokens of it), short enough that hashing
# it costs a few microseconds. A shared prefix longer than this sends every request that has it to
# one replica (until the load bound spills them), which is what its prefix cache wants.
AFFINITY_CHARS = 4096
_MASK = (1 << 64) - 1


def prefix_key(payload: dict) -> int | None:
    """The affinity key of a request body: a 64-bit hash of the first AFFINITY_CHARS characters
    of the conversation's opening, or None when the body has no prompt to key on (embeddings).

    Chat: the messages up to and including the first user message (system and developer
    prompts, then the opening question). Every later turn of the same conversation starts with
    these same messages, so all its turns share a key and reach the replica that cached the
    turns before; keying on everything before the last user turn instead would give turn 2 a
    different key from turn 1 whenever the system prompt is shorter than AFFINITY_CHARS.
    Completions: the prompt's first AFFINITY_CHARS characters."""
    messages = payload.get("messages")
    if type(messages) is list:
        parts: list[str] = []
        size = 0
        for message in messages:
            if type(message) is not dict:
                break
            role = message.get("role")
            content = message.get("content")
            text = content if type(content) is str else orjson.dumps(content).decode()
            part = f"{role}\x1f{text}\x1e"
            parts.append(part)
            size += len(part)
            if size >= AFFINITY_CHARS or role == "user":
                break
        text = "".join(parts)[:AFFINITY_CHARS]
    else:
        prompt = payload.get("prompt")
        if type(prompt) is str:
            text = prompt[:AFFINITY_CHARS]
        elif prompt is not None:  # token ids or a batch of prompts
            text = orjson.dumps(prompt)[:AFFINITY_CHARS].decode(errors="replace")
        else:
            return None
    if not text:
        return None
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _weight(key: int, seed: int) -> int:
    """Rendezvous weight of one replica for one key (splitmix64's finaliser on their mix)."""
    x = key ^ seed
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


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
        "count",
        "pool",
        "request_head",
        "labels",
        "engine_api_key",
        "removed",
        "reason",
        "seed",
        "id_header",
        "answered",
    )

    def __init__(self, record: ReplicaRecord, connect_timeout: float, count: InFlightCount | None = None) -> None:
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
        # requests in flight: this process's (`count.mine`) and, with several workers, all of theirs
        self.count = count or LocalCount()
        self.removed = False
        self.pool = ConnectionPool(self.host, self.port, connect_timeout)
        # its rendezvous seed: the same in every gateway process and across restarts
        self.seed = int.from_bytes(hashlib.blake2b(record.id.encode(), digest_size=8).digest(), "big")
        # the header every response it serves carries, made once
        self.id_header = (b"x-cortex-replica", record.id.encode())
        # perf_counter time of the last response head it sent a proxied request: a replica that is
        # answering requests is alive, whatever its /health did meanwhile (Gateway.check_health)
        self.answered = 0.0
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
    def in_flight(self) -> int:
        """Requests in flight on this replica, through every worker of the gateway."""
        return self.count.total()

    def close(self) -> None:
        """Close the upstream connections and give back the in-flight slot (nothing in flight here)."""
        self.pool.close()
        self.count.release()

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
    def __init__(
        self,
        connect_timeout: float,
        affinity: bool = True,
        load_ratio: float = 1.25,
        board: InFlightBoard | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.board = board  # the workers' shared in-flight counts; None: one process
        self.affinity = affinity
        self.load_ratio = load_ratio
        self.replicas: dict[str, Replica] = {}
        self.models: dict[str, list[Replica]] = {}  # served name and each alias -> replicas
        self.canonical: dict[str, str] = {}  # name or alias -> served name
        self.aliases_of: dict[str, list[str]] = {}
        self.keys_by_hash: dict[str, ApiKeyRecord] = {}
        # tokens already matched to a record (Gateway.authenticate): no SHA-256 per request (with
        # OpenSSL 3 a hash object costs more than the rest of authentication); emptied with
        # keys_by_hash on every registry change, so a revoked or rotated key is never served from it
        self.keys_by_token: dict[bytes, ApiKeyRecord] = {}
        self.fallbacks: dict[str, tuple[str, ...]] = {}  # name or alias -> fallback names, in order

    def sync(
        self,
        records: list[ReplicaRecord],
        aliases: dict[str, str],
        keys: list[ApiKeyRecord],
        fallbacks: dict[str, list[str]] | None = None,
    ) -> list[Replica]:
        """Rebuild from the registry; returns replicas that disappeared (their pools to close)."""
        seen: dict[str, Replica] = {}
        for record in records:
            replica = self.replicas.get(record.id)
            if replica is None or replica.url != record.url or replica.model != record.model:
                count = self.board.count(record.id) if self.board is not None else None
                replica = Replica(record, self.connect_timeout, count)
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
        models = {name: by_model[model] for name, model in canonical.items()}
        # A name with fallbacks stays routable with no replica of its own (its model retired or
        # not deployed yet): the request goes down its fallback list.
        chains: dict[str, tuple[str, ...]] = {}
        for name, chain in (fallbacks or {}).items():
            if chain:
                chains[name] = tuple(chain)
                if name not in models:
                    models[name], canonical[name] = [], name
        for name, model in canonical.items():  # an alias without its own list uses its model's
            if name not in chains and model in chains:
                chains[name] = chains[model]
        self.replicas = seen
        self.models = models
        self.fallbacks = chains
        self.canonical = canonical
        self.aliases_of = aliases_of
        self.keys_by_hash = {k.key_hash: k for k in keys}
        self.keys_by_token = {}
        return gone

    def pick(self, replicas: list[Replica], tried: tuple[Replica, ...] = (), payload: Any = None) -> Replica | None:
        """The replica for a request, skipping ones already tried: the one its prompt prefix
        hashes to (when affinity is on, `payload` has a prompt and several replicas are
        routable) unless that one is loaded past the bound, else the one with the fewest
        requests in flight."""
        best = None
        least = 0
        routable = 0
        for replica in replicas:
            if replica.state == "active" and replica.healthy and not replica.removed and replica not in tried:
                routable += 1
                load = replica.count.total()
                if best is None or load < least:
                    best, least = replica, load
        if routable < 2 or not self.affinity or type(payload) is not dict:
            return best
        key = prefix_key(payload)
        if key is None:
            return best
        return self._by_affinity(replicas, tried, key, routable) or best

    def _by_affinity(
        self, replicas: list[Replica], tried: tuple[Replica, ...], key: int, routable: int
    ) -> Replica | None:
        """The routable replica with the highest rendezvous weight for `key`, or None when its
        in-flight count is past load_ratio x (mean in flight + 1)."""
        chosen = None
        top = -1
        total = 0
        chosen_load = 0
        for replica in replicas:
            if replica.state == "active" and replica.healthy and not replica.removed and replica not in tried:
                load = replica.count.total()
                total += load
                weight = _weight(key, replica.seed)
                if weight > top:
                    chosen, top, chosen_load = replica, weight, load
        if chosen is None or chosen_load > self.load_ratio * (total / routable + 1):
            return None
        return chosen

    def fallback_chain(self, name: str) -> tuple[str, ...]:
        """The names a request for `name` falls back to, in order (its own list, else its model's)."""
        return self.fallbacks.get(name, ())

    def available_models(self) -> list[str]:
        """Served names with at least one routable replica."""
        return [m for m, rs in self.models.items() if self.canonical[m] == m and any(r.routable for r in rs)]
