"""The gateway's durable state: replicas, model aliases and client API keys, in SQLite (WAL,
the embedded default) or PostgreSQL (several gateways on several hosts; `PostgresRegistry`).

The database is the source of truth; the gateway keeps a routing table in memory built from
it and rebuilds that table whenever the database changes (its own writes, or another process's,
seen through `data_version()`). Writes are serialized: in SQLite every write runs in
`BEGIN IMMEDIATE`, so two concurrent registrations queue on SQLite's write lock instead of
interleaving; in PostgreSQL every write transaction starts by bumping a counter row, whose row
lock does the same (see `PostgresRegistry`). Both backends run the same SQL (written with `?`
placeholders and `ON CONFLICT` upserts, which both dialects accept); only the schema's column
types, the placeholders and the change counter differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from .limits import KeyLimits

KEY_PREFIX = "sk-cortex-"

# {real} and {int} are the column types of each dialect (PostgreSQL's REAL is 4 bytes, INTEGER 4).
SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    url TEXT NOT NULL,
    engine_api_key TEXT,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining')),
    labels TEXT NOT NULL DEFAULT '{}',
    created_at {real} NOT NULL,
    UNIQUE (model, url)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    model TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fallbacks (
    name TEXT PRIMARY KEY,
    models TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    key_hash TEXT NOT NULL UNIQUE,
    models TEXT,
    expires_at {real},
    disabled {int} NOT NULL DEFAULT 0,
    created_at {real} NOT NULL,
    rpm {int},
    tpm {int},
    budget_tokens_day {int}
);
CREATE TABLE IF NOT EXISTS key_usage (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour {int} NOT NULL,
    requests {int} NOT NULL DEFAULT 0,
    prompt_tokens {int} NOT NULL DEFAULT 0,
    completion_tokens {int} NOT NULL DEFAULT 0,
    errors {int} NOT NULL DEFAULT 0,
    rate_limited {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model, hour)
);
CREATE TABLE IF NOT EXISTS key_limit_state (
    key_id TEXT PRIMARY KEY,
    requests_level {real},
    tokens_level {real},
    at {real} NOT NULL,
    total_requests {int} NOT NULL DEFAULT 0,
    total_tokens {int} NOT NULL DEFAULT 0
);
"""
# Columns added to api_keys after its first release: (name, declaration), added to older files.
KEY_COLUMNS_ADDED = (("rpm", "INTEGER"), ("tpm", "INTEGER"), ("budget_tokens_day", "INTEGER"))  # SQLite only
# The change counter of a PostgreSQL registry: `routes` is bumped by every write that changes what
# a gateway routes (replicas, aliases, fallbacks, keys), `usage` by the usage flushes.
PG_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS registry_version (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO registry_version (name, version) VALUES ('routes', 0), ('usage', 0) ON CONFLICT (name) DO NOTHING
"""
USAGE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")
KEY_COLUMNS = "id, name, key_hash, models, expires_at, disabled, created_at, rpm, tpm, budget_tokens_day"


class RegistryError(Exception):
    """A registry change that cannot be made; `status` is the HTTP status the API answers."""

    status = 400


class NotFound(RegistryError):
    status = 404


class Conflict(RegistryError):
    status = 409


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    model: str
    url: str
    engine_api_key: str | None
    state: str
    labels: dict = field(default_factory=dict)
    created_at: float = 0.0

    def public(self) -> dict:
        """What the admin API shows: never the engine's key."""
        return {
            "id": self.id,
            "model": self.model,
            "url": self.url,
            "state": self.state,
            "labels": self.labels,
            "created_at": self.created_at,
            "has_engine_api_key": bool(self.engine_api_key),
        }


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    name: str
    key_hash: str
    models: tuple[str, ...] | None
    expires_at: float | None
    disabled: bool
    created_at: float
    limits: KeyLimits = KeyLimits()

    def public(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "models": list(self.models) if self.models is not None else None,
            "expires_at": self.expires_at,
            "disabled": self.disabled,
            "created_at": self.created_at,
            **self.limits.public(),
        }


def hash_key(key: str) -> str:
    """Keys are 256-bit random strings, so one SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(key.encode()).hexdigest()


def validate_replica_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise RegistryError(f"replica url {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise RegistryError(f"replica url {url!r}: expected http://host:port (the engine's base URL)")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise RegistryError(
            f"replica url {url!r}: give the engine's base URL, http://host:port, "
            "without a path (the gateway adds /v1/...)"
        )
    return url.rstrip("/")


def schema(real: str, integer: str) -> list[str]:
    """The CREATE TABLE statements with a dialect's floating-point and integer column types."""
    text = SCHEMA.replace("{real}", real).replace("{int}", integer)
    return [statement for statement in text.strip().split(";") if statement.strip()]


def is_postgres_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        user, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    if parts.query:  # libpq also takes ?password=...
        query = "&".join(
            "password=***" if item.split("=", 1)[0] == "password" else item for item in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


def open_registry(location: str | os.PathLike) -> "Registry":
    """The registry `location` names: a `postgresql://` URL, else the path of a SQLite file."""
    if is_postgres_url(location):
        return PostgresRegistry(str(location))
    return Registry(location)


class Cursor(Protocol):
    """What the shared SQL needs of a cursor (sqlite3's, or `_PgCursor`)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


class Registry:
    """Replicas, aliases and API keys in one SQLite file (the embedded default); the SQL here is
    shared with `PostgresRegistry`, which overrides only the connection, transactions and
    `data_version`. `open_registry` picks the backend from the setting's value."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.location = str(self.path)  # what logs and messages name (never a password)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(self.path, 0o600)  # it holds the engines' API keys
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._write() as cur:
            for statement in schema("REAL", "INTEGER"):
                cur.execute(statement)
            have = {row[1] for row in cur.execute("PRAGMA table_info(api_keys)")}
            for column, declaration in KEY_COLUMNS_ADDED:
                if column not in have:
                    cur.execute(f"ALTER TABLE api_keys ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self._conn.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read outside any write transaction."""
        return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def _write(self, what: str = "routes") -> Iterator[Cursor]:
        """One write transaction. `what` is "routes" for writes that change what a gateway routes
        and "usage" for usage flushes (PostgreSQL keeps them apart; SQLite has one write lock)."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection commits; cheap enough to poll."""
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    # --- replicas -------------------------------------------------------------------------

    def register(
        self,
        model: str,
        url: str,
        engine_api_key: str | None = None,
        aliases: list[str] | tuple[str, ...] = (),
        replica_id: str | None = None,
        labels: dict | None = None,
        fallbacks: list[str] | tuple[str, ...] | None = None,
    ) -> ReplicaRecord:
        """Add a replica of `model` (or update the one with the same model and url). `fallbacks`,
        when given, replaces the model's fallback list (see `set_fallbacks`)."""
        if not model or not isinstance(model, str):
            raise RegistryError("model: a non-empty served model name is required")
        url = validate_replica_url(url)
        aliases = [a for a in aliases if a != model]
        with self._write() as cur:
            if cur.execute("SELECT 1 FROM aliases WHERE alias = ?", (model,)).fetchone():
                raise Conflict(f"model name {model!r} is already an alias of another model")
            for alias in aliases:
                row = cur.execute("SELECT model FROM aliases WHERE alias = ?", (alias,)).fetchone()
                if row and row[0] != model:
                    raise Conflict(f"alias {alias!r} already points to model {row[0]!r}; deregister it first")
                if cur.execute("SELECT 1 FROM replicas WHERE model = ? LIMIT 1", (alias,)).fetchone():
                    raise Conflict(f"alias {alias!r} is the name of a registered model")
            existing = cur.execute("SELECT id FROM replicas WHERE model = ? AND url = ?", (model, url)).fetchone()
            rid = replica_id or (existing[0] if existing else f"{model}-{uuid.uuid4().hex[:8]}")
            if existing and existing[0] != rid:
                raise Conflict(f"{url} is already registered for {model!r} as replica {existing[0]!r}")
            now = time.time()
            cur.execute(
                "INSERT INTO replicas (id, model, url, engine_api_key, state, labels, created_at)"
                " VALUES (?, ?, ?, ?, 'active', ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET model = excluded.model, url = excluded.url,"
                " engine_api_key = excluded.engine_api_key, state = 'active', labels = excluded.labels",
                (rid, model, url, engine_api_key, json.dumps(labels or {}), now),
            )
            for alias in aliases:
                cur.execute(
                    "INSERT INTO aliases (alias, model) VALUES (?, ?)"
                    " ON CONFLICT (alias) DO UPDATE SET model = excluded.model",
                    (alias, model),
                )
            if fallbacks is not None:
                _write_fallbacks(cur, model, fallbacks)
        return self.replica(rid)

    def replica(self, replica_id: str) -> ReplicaRecord:
        rows = self._query(
            "SELECT id, model, url, engine_api_key, state, labels, created_at FROM replicas WHERE id = ?",
            (replica_id,),
        )
        row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no replica {replica_id!r}; `GET /admin/replicas` lists them")
        return ReplicaRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6])

    def replicas(self) -> list[ReplicaRecord]:
        rows = self._query(
            "SELECT id, model, url, engine_api_key, state, labels, created_at FROM replicas ORDER BY model, created_at"
        )
        return [ReplicaRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]) for r in rows]

    def aliases(self) -> dict[str, str]:
        return dict(self._query("SELECT alias, model FROM aliases"))

    def drain(self, replica_id: str) -> ReplicaRecord:
        with self._write() as cur:
            if cur.execute("UPDATE replicas SET state = 'draining' WHERE id = ?", (replica_id,)).rowcount == 0:
                raise NotFound(f"no replica {replica_id!r}; `GET /admin/replicas` lists them")
        return self.replica(replica_id)

    def deregister(self, replica_id: str) -> None:
        """Remove a replica; a model's aliases go with its last replica."""
        with self._write() as cur:
            row = cur.execute("SELECT model FROM replicas WHERE id = ?", (replica_id,)).fetchone()
            if row is None:
                raise NotFound(f"no replica {replica_id!r}; `GET /admin/replicas` lists them")
            cur.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))
            if not cur.execute("SELECT 1 FROM replicas WHERE model = ? LIMIT 1", (row[0],)).fetchone():
                cur.execute("DELETE FROM aliases WHERE model = ?", (row[0],))

    # --- fallbacks --------------------------------------------------------------------------

    def set_fallbacks(self, name: str, models: list[str] | tuple[str, ...]) -> list[str]:
        """Replace the ordered fallback list of `name` (a model or an alias); an empty list removes
        it. A model's list outlives its last replica, so that a retired model's clients are still
        served by its fallbacks, and it serves again itself once it is back."""
        with self._write() as cur:
            return _write_fallbacks(cur, name, models)

    def fallbacks(self) -> dict[str, list[str]]:
        """name or alias -> fallback model names, in the order they are tried."""
        return {name: json.loads(models) for name, models in self._query("SELECT name, models FROM fallbacks")}

    # --- API keys ---------------------------------------------------------------------------

    def create_key(
        self,
        name: str = "",
        models: list[str] | None = None,
        expires_at: float | None = None,
        limits: KeyLimits = KeyLimits(),
    ) -> tuple[str, ApiKeyRecord]:
        """A new key; the plain key is returned here once and stored only as its hash."""
        _check_limits(limits)
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
            raise RegistryError("models: a list of model names, or null for all models")
        if expires_at is not None and expires_at <= time.time():
            raise RegistryError("expires_at is in the past")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        kid = "key-" + uuid.uuid4().hex[:12]
        with self._write() as cur:
            cur.execute(
                "INSERT INTO api_keys (id, name, key_hash, models, expires_at, disabled, created_at,"
                " rpm, tpm, budget_tokens_day) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                (
                    kid,
                    name,
                    hash_key(key),
                    json.dumps(models) if models is not None else None,
                    expires_at,
                    time.time(),
                    limits.rpm,
                    limits.tpm,
                    limits.budget_tokens_per_day,
                ),
            )
        return key, self.key(kid)

    def key(self, key_id: str) -> ApiKeyRecord:
        rows = self._query(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no API key {key_id!r}; `cortex keys list` shows them")
        return _key_record(row)

    def keys(self) -> list[ApiKeyRecord]:
        rows = self._query(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at")
        return [_key_record(r) for r in rows]

    def revoke_key(self, key_id: str) -> None:
        """Disable a key (kept, so `keys list` still shows who had access)."""
        with self._write() as cur:
            if cur.execute("UPDATE api_keys SET disabled = 1 WHERE id = ?", (key_id,)).rowcount == 0:
                raise NotFound(f"no API key {key_id!r}; `cortex keys list` shows them")

    def set_key_limits(self, key_id: str, limits: KeyLimits) -> ApiKeyRecord:
        """Replace a key's limits (KeyLimits() removes them all)."""
        _check_limits(limits)
        with self._write() as cur:
            if (
                cur.execute(
                    "UPDATE api_keys SET rpm = ?, tpm = ?, budget_tokens_day = ? WHERE id = ?",
                    (limits.rpm, limits.tpm, limits.budget_tokens_per_day, key_id),
                ).rowcount
                == 0
            ):
                raise NotFound(f"no API key {key_id!r}; `cortex keys list` shows them")
        return self.key(key_id)

    # --- usage and limit state (written in batches by the gateway, see usage.py and limits.py) ----

    def flush_usage(
        self,
        hour: int,
        usage: list[tuple[str, str, list[int]]],
        limits: list[tuple[str, float | None, float | None, float, list[int], list[int]]],
        day_start: float,
    ) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """One transaction: add usage rows (key id, model, [requests, prompt, completion, errors,
        rate limited]) to `hour` (Unix time // 3600); for each limited key (key id, request
        level, token level, at, [pending requests, tokens], [requests, tokens] totals last seen)
        add the pending counts to the key's totals and save its levels less what other gateways
        added since this one last looked. Returns the new totals per limited key and the tokens
        each has used since `day_start`, across every gateway on this registry."""
        totals: dict[str, tuple[int, int]] = {}
        today: dict[str, int] = {}
        with self._write("usage") as cur:
            if usage:
                cur.executemany(
                    "INSERT INTO key_usage (key_id, model, hour, " + ", ".join(USAGE_COLUMNS) + ")"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, model, hour) DO UPDATE SET "
                    + ", ".join(f"{c} = key_usage.{c} + excluded.{c}" for c in USAGE_COLUMNS),
                    [(key_id, model, hour, *row) for key_id, model, row in usage],
                )
            for key_id, level_requests, level_tokens, at, pending, seen in limits:
                row = cur.execute(
                    "SELECT total_requests, total_tokens FROM key_limit_state WHERE key_id = ?", (key_id,)
                ).fetchone()
                old = (row[0], row[1]) if row else (0, 0)
                if level_requests is not None:
                    level_requests -= max(0, old[0] - seen[0])
                if level_tokens is not None:
                    level_tokens -= max(0, old[1] - seen[1])
                new = (old[0] + pending[0], old[1] + pending[1])
                cur.execute(
                    "INSERT INTO key_limit_state (key_id, requests_level, tokens_level, at, total_requests,"
                    " total_tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET"
                    " requests_level = excluded.requests_level, tokens_level = excluded.tokens_level,"
                    " at = excluded.at, total_requests = excluded.total_requests, total_tokens = excluded.total_tokens",
                    (key_id, level_requests, level_tokens, at, *new),
                )
                totals[key_id] = new
            if limits:
                sql, params = _tokens_since_query(day_start, [row[0] for row in limits])
                today = {r[0]: int(r[1]) for r in cur.execute(sql, params).fetchall()}
        return totals, today

    def limit_states(self, key_ids: list[str]) -> dict[str, tuple[float | None, float | None, float, int, int]]:
        """Saved (request level, token level, at, total requests, total tokens) per key."""
        marks = ",".join("?" * len(key_ids))
        rows = self._query(
            "SELECT key_id, requests_level, tokens_level, at, total_requests, total_tokens FROM key_limit_state"
            f" WHERE key_id IN ({marks})",
            key_ids,
        )
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def tokens_since(self, since: float, key_ids: list[str]) -> dict[str, int]:
        sql, params = _tokens_since_query(since, key_ids)
        return {r[0]: int(r[1]) for r in self._query(sql, params)}

    def usage(self, since: float | None = None) -> list[tuple]:
        """(key id, model, requests, prompt, completion, errors, rate limited) summed over the
        hours from the one holding `since` (all recorded hours when None)."""
        return self._query(
            "SELECT key_id, model, "
            + ", ".join(f"CAST(SUM({c}) AS BIGINT)" for c in USAGE_COLUMNS)
            + " FROM key_usage WHERE hour >= ? GROUP BY key_id, model ORDER BY key_id, model",
            (-1 if since is None else int(since // 3600),),
        )


def _tokens_since_query(since: float, key_ids: list[str]) -> tuple[str, list]:
    marks = ",".join("?" * len(key_ids))
    sql = (
        "SELECT key_id, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) FROM key_usage"
        f" WHERE hour >= ? AND key_id IN ({marks}) GROUP BY key_id"
    )
    return sql, [int(since // 3600), *key_ids]


def _check_limits(limits: KeyLimits) -> None:
    for name, value in limits.public().items():
        if value is not None and (type(value) is not int or value < 1):
            raise RegistryError(f"{name}: a whole number of at least 1, or null for no limit (got {value!r})")


def _write_fallbacks(cur: Cursor, name: str, models: list[str] | tuple[str, ...]) -> list[str]:
    if not name or not isinstance(name, str):
        raise RegistryError("fallbacks: the model or alias they belong to needs a non-empty name")
    chain = list(models)
    if not all(isinstance(m, str) and m for m in chain):
        raise RegistryError(f"fallbacks of {name!r}: a list of non-empty model names")
    if name in chain:
        raise RegistryError(f"fallbacks of {name!r}: a model cannot fall back to itself")
    if len(set(chain)) != len(chain):
        raise RegistryError(f"fallbacks of {name!r}: a model is listed twice")
    if chain:
        cur.execute(
            "INSERT INTO fallbacks (name, models) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET models = excluded.models",
            (name, json.dumps(chain)),
        )
    else:
        cur.execute("DELETE FROM fallbacks WHERE name = ?", (name,))
    return chain


def _key_record(row: tuple) -> ApiKeyRecord:
    models = tuple(json.loads(row[3])) if row[3] is not None else None
    return ApiKeyRecord(row[0], row[1], row[2], models, row[4], bool(row[5]), row[6], KeyLimits(row[7], row[8], row[9]))


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached (PostgreSQL down, or the network to it)."""

    status = 503


class PostgresRegistry(Registry):
    """The registry in a PostgreSQL database, so that several gateways (on several hosts) serve
    the same routes and keys. The tables and SQL are `Registry`'s; what differs:

    - Column types: DOUBLE PRECISION and BIGINT (PostgreSQL's REAL and INTEGER are 4 bytes).
    - Writes and change detection: every write transaction starts by bumping its row of
      `registry_version` (`routes` for replicas, aliases, fallbacks and keys; `usage` for the
      usage flushes). The row lock that UPDATE takes is held until commit, so writers queue the
      way SQLite's `BEGIN IMMEDIATE` makes them (and, at READ COMMITTED, each later statement of
      the transaction sees what the writer before committed: register's alias checks and
      flush_usage's read-modify-write stay correct). The `routes` counter is what
      `data_version()` returns: one primary-key read that each gateway polls every 0.5 s, like
      `PRAGMA data_version`. A counter rather than LISTEN/NOTIFY: it is bumped in the change's
      own transaction, so a gateway never sees the version without the data, and a gateway whose
      connection dropped catches up by comparing numbers, where a notification sent while it was
      away is lost.
    - The connection: one per gateway, re-opened on the next call after it breaks; while the
      database is down, calls raise `RegistryUnavailable` (503) and the gateway keeps routing
      with the table it has (the request path never reads the database).
    """

    def __init__(self, url: str, connect_timeout: int = 10) -> None:
        import psycopg

        if not is_postgres_url(url):
            raise RegistryError(f"{redact_url(url)}: expected a postgresql://user@host:port/database URL")
        self._psycopg = psycopg
        self.url = url
        self.location = redact_url(url)
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: Any = None
        with self._connected() as conn, conn.transaction():
            # Two gateways starting at once must not both create the tables.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('cortex gateway registry schema'))")
            for statement in schema("DOUBLE PRECISION", "BIGINT"):
                conn.execute(statement)
            for statement in PG_VERSION_TABLE.strip().split(";"):
                conn.execute(statement)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    @contextmanager
    def _connected(self) -> Iterator[Any]:
        """The connection (opened again if the last one broke), used by one thread at a time;
        connection failures become `RegistryUnavailable`."""
        psycopg = self._psycopg
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=self._connect_timeout,
                        application_name="cortex-gateway",
                    )
                yield self._conn
            except psycopg.OperationalError as exc:
                raise RegistryUnavailable(f"the registry database {self.location} is unavailable: {exc}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._connected() as conn:
            return conn.execute(_pg(sql), params).fetchall()

    @contextmanager
    def _write(self, what: str = "routes") -> Iterator[Cursor]:
        with self._connected() as conn, conn.transaction():
            cur = conn.cursor()
            cur.execute("UPDATE registry_version SET version = version + 1 WHERE name = %s", (what,))
            yield _PgCursor(cur)

    def data_version(self) -> int:
        """The `routes` counter: changes with every committed change of routes or keys."""
        return self._query("SELECT version FROM registry_version WHERE name = 'routes'")[0][0]


def _pg(sql: str) -> str:
    """The shared SQL's `?` placeholders as psycopg's `%s` (no statement here has a literal ? or %)."""
    return sql.replace("?", "%s")


class _PgCursor:
    """A psycopg cursor that takes the shared SQL (`?` placeholders)."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(_pg(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        return self._cur.executemany(_pg(sql), rows)
