"""Per-key rate limits and daily token budgets, held in memory on the hot path.

A key may have up to three limits (`KeyLimits`): requests per minute (`rpm`), tokens per minute
(`tpm`) and tokens per UTC day (`budget_tokens_per_day`). Keys without any pay one dict lookup
per request (`Limiter.states.get(key.id)` is None) and get no rate-limit headers.

- rpm and tpm are token buckets, as OpenAI describes its own limits: capacity = the per-minute
  limit, refilled continuously at limit/60 per second. A request takes one request token when
  it is admitted; its tokens (prompt + completion, from the response's `usage`) are taken when
  it ends, so the token bucket may go below zero; no request is admitted until it is back
  above zero (the last request before a limit may overshoot it by its own size, as at OpenAI).
- The daily budget resets at 00:00 UTC (calendar days, like a bill, not a rolling 24 h).
  A request is admitted while the day's tokens are below the budget.
- A refused request is answered 429 (`rate_limit_exceeded` or `token_budget_exceeded`) with
  `Retry-After` (seconds, rounded up), `retry-after-ms`, and the `x-ratelimit-*` headers.

Persistence and sharing (`Limiter.flush`, every `gateway_usage_flush_interval` seconds and at
shutdown, in one registry transaction with the usage counters): each gateway adds what it
consumed since its last flush to per-key totals in the registry and learns what the other
gateways consumed in the meantime, which it takes out of its own buckets; the bucket levels
are saved with the time, so a restarted gateway resumes from them (refilled for the time it
was down). The day's budget use is read back from the usage table, which all gateways share.
A crash loses at most one flush interval T of consumption. With G gateways on one registry (a
shared SQLite file on one host, or one PostgreSQL database for gateways on several hosts) a
gateway sees the others' consumption at most 2T late, so in steady traffic the total admitted
exceeds a limit by at most (G-1) x limit x 2T / 60 s per minute (budget: (G-1) x the tokens a
gateway serves in 2T); a burst into full buckets on every gateway at once can admit up to G x
the bucket (the per-minute limit) before the flushes catch up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import orjson

if TYPE_CHECKING:
    from .registry import ApiKeyRecord, Registry

DAY = 86400.0


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None
    budget_tokens_per_day: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.budget_tokens_per_day is not None

    def public(self) -> dict:
        return {"rpm": self.rpm, "tpm": self.tpm, "budget_tokens_per_day": self.budget_tokens_per_day}


class Bucket:
    """A token bucket holding up to `capacity`, refilled at capacity per minute."""

    __slots__ = ("capacity", "rate", "level", "at")

    def __init__(self, per_minute: int, level: float, at: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = min(level, self.capacity)
        self.at = at

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait(self, need: float) -> float:
        """Seconds until the level reaches `need`."""
        return max(0.0, (need - self.level) / self.rate)

    def until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class KeyState:
    """One limited key's live state in this gateway."""

    __slots__ = ("key_id", "limits", "requests", "tokens", "day", "day_tokens", "seen", "pending", "strip_usage")

    def __init__(self, key_id: str, limits: KeyLimits, now: float) -> None:
        self.key_id = key_id
        self.limits = limits
        self.requests = Bucket(limits.rpm, limits.rpm, now) if limits.rpm is not None else None
        self.tokens = Bucket(limits.tpm, limits.tpm, now) if limits.tpm is not None else None
        self.day = int(now // DAY)
        self.day_tokens = 0  # tokens used today (UTC), all gateways as of the last flush + this one since
        self.seen = [0, 0]  # the registry's request and token totals at the last flush
        self.pending = [0, 0]  # requests admitted and tokens used here since the last flush
        # Streams of keys with token limits ask the engine for usage; the extra event is removed
        # from what the client gets unless it asked for it too.
        self.strip_usage = limits.tpm is not None or limits.budget_tokens_per_day is not None

    def relimit(self, limits: KeyLimits, now: float) -> None:
        """New limits for the key (`cortex keys update`): keep what was used, within the new sizes."""
        for name, per_minute in (("requests", limits.rpm), ("tokens", limits.tpm)):
            bucket = getattr(self, name)
            if per_minute is None:
                setattr(self, name, None)
            elif bucket is None:
                setattr(self, name, Bucket(per_minute, per_minute, now))
            else:
                bucket.refill(now)
                setattr(self, name, Bucket(per_minute, bucket.level, now))
        self.limits = limits
        self.strip_usage = limits.tpm is not None or limits.budget_tokens_per_day is not None


@dataclass
class Refusal:
    message: str
    code: str
    retry_after: float  # seconds


def format_reset(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` format: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Limiter:
    """The limited keys' states, by key id. `clock` is wall time in seconds (the budget's day
    is a UTC day, and the saved levels must mean something after a restart)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.states: dict[str, KeyState] = {}

    # --- configuration -------------------------------------------------------------------------

    def sync(self, keys: list[ApiKeyRecord], registry: Registry | None = None) -> None:
        """Follow the registry's keys: new limited keys get their saved state (or full buckets),
        changed limits resize, keys without limits (or gone) are dropped."""
        now = self.clock()
        states: dict[str, KeyState] = {}
        fresh: list[KeyState] = []
        for key in keys:
            if not key.limits:
                continue
            state = self.states.get(key.id)
            if state is None:
                state = KeyState(key.id, key.limits, now)
                fresh.append(state)
            elif state.limits != key.limits:
                state.relimit(key.limits, now)
            states[key.id] = state
        if fresh and registry is not None:
            saved = registry.limit_states([s.key_id for s in fresh])
            today = registry.tokens_since(int(now // DAY) * DAY, [s.key_id for s in fresh])
            for state in fresh:
                row = saved.get(state.key_id)
                if row is not None:
                    level_requests, level_tokens, at, total_requests, total_tokens = row
                    if state.requests is not None and level_requests is not None:
                        state.requests = Bucket(state.limits.rpm or 0, level_requests, at)
                        state.requests.refill(now)
                    if state.tokens is not None and level_tokens is not None:
                        state.tokens = Bucket(state.limits.tpm or 0, level_tokens, at)
                        state.tokens.refill(now)
                    state.seen = [total_requests, total_tokens]
                state.day_tokens = today.get(state.key_id, 0)
        self.states = states

    # --- the hot path --------------------------------------------------------------------------

    def admit(self, state: KeyState) -> tuple[Refusal | None, list[tuple[bytes, bytes]]]:
        """Take one request from the key's allowance, or say why not and for how long; with the
        rate-limit headers for the response either way."""
        now = self.clock()
        requests, tokens, limits = state.requests, state.tokens, state.limits
        day = int(now // DAY)
        if day != state.day:
            state.day, state.day_tokens = day, 0
        refusal = None
        if requests is not None:
            requests.refill(now)
            if requests.level < 1:
                refusal = Refusal(
                    f"rate limit reached for this API key: {limits.rpm} requests per minute",
                    "rate_limit_exceeded",
                    requests.wait(1),
                )
        if tokens is not None:
            tokens.refill(now)
            if refusal is None and tokens.level <= 0:
                refusal = Refusal(
                    f"rate limit reached for this API key: {limits.tpm} tokens per minute",
                    "rate_limit_exceeded",
                    tokens.wait(0) + 0.001,
                )
        budget = limits.budget_tokens_per_day
        if refusal is None and budget is not None and state.day_tokens >= budget:
            refusal = Refusal(
                f"this API key's token budget of {budget} tokens per day (UTC) is used up; it resets at 00:00 UTC",
                "token_budget_exceeded",
                (day + 1) * DAY - now,
            )
        if refusal is None:
            if requests is not None:
                requests.level -= 1
            state.pending[0] += 1
        return refusal, self.headers(state, now)

    def charge(self, state: KeyState, used: int) -> None:
        """Take a finished request's tokens (prompt + completion) from the key's allowance."""
        if not used:
            return
        now = self.clock()
        if state.tokens is not None:
            state.tokens.refill(now)
            state.tokens.level -= used
        day = int(now // DAY)
        if day != state.day:
            state.day, state.day_tokens = day, 0
        state.day_tokens += used
        state.pending[1] += used

    @staticmethod
    def headers(state: KeyState, now: float) -> list[tuple[bytes, bytes]]:
        out = []
        requests, tokens, limits = state.requests, state.tokens, state.limits
        if requests is not None:
            out += [
                (b"x-ratelimit-limit-requests", b"%d" % requests.capacity),
                (b"x-ratelimit-remaining-requests", b"%d" % max(0, int(requests.level))),
                (b"x-ratelimit-reset-requests", format_reset(requests.until_full()).encode()),
            ]
        if tokens is not None:
            out += [
                (b"x-ratelimit-limit-tokens", b"%d" % tokens.capacity),
                (b"x-ratelimit-remaining-tokens", b"%d" % max(0, int(tokens.level))),
                (b"x-ratelimit-reset-tokens", format_reset(tokens.until_full()).encode()),
            ]
        budget = limits.budget_tokens_per_day
        if budget is not None:
            out += [
                (b"x-cortex-budget-limit-tokens", b"%d" % budget),
                (b"x-cortex-budget-remaining-tokens", b"%d" % max(0, budget - state.day_tokens)),
                (b"x-cortex-budget-reset", format_reset((state.day + 1) * DAY - now).encode()),
            ]
        return out

    @staticmethod
    def refusal_headers(refusal: Refusal) -> list[tuple[bytes, bytes]]:
        return [
            (b"retry-after", b"%d" % max(1, math.ceil(refusal.retry_after))),
            (b"retry-after-ms", b"%d" % max(1, math.ceil(refusal.retry_after * 1000))),
        ]

    # --- persistence ------------------------------------------------------------------------------

    def exchange(self, totals: dict[str, tuple[int, int]], today: dict[str, int]) -> None:
        """Apply a flush's answer: `totals` are the registry's request and token totals per key
        after this gateway's pending counts were added; what else was added came from other
        gateways and is taken out of this gateway's buckets. `today` is each key's tokens used
        today (UTC) by all gateways."""
        for key_id, (total_requests, total_tokens) in totals.items():
            state = self.states.get(key_id)
            if state is None:
                continue
            other_requests = total_requests - state.seen[0] - state.pending[0]
            other_tokens = total_tokens - state.seen[1] - state.pending[1]
            if state.requests is not None and other_requests > 0:
                state.requests.level -= other_requests
            if state.tokens is not None and other_tokens > 0:
                state.tokens.level -= other_tokens
            state.seen = [total_requests, total_tokens]
            state.pending = [0, 0]
            if key_id in today:
                state.day_tokens = today[key_id]

    def snapshot(self) -> list[tuple[str, float | None, float | None, float, list[int], list[int]]]:
        """(key id, request level, token level, at, pending [requests, tokens], seen [requests,
        tokens]) per key, for `Registry.flush_usage`."""
        now = self.clock()
        rows = []
        for state in self.states.values():
            for bucket in (state.requests, state.tokens):
                if bucket is not None:
                    bucket.refill(now)
            rows.append(
                (
                    state.key_id,
                    None if state.requests is None else state.requests.level,
                    None if state.tokens is None else state.tokens.level,
                    now,
                    list(state.pending),
                    list(state.seen),
                )
            )
        return rows


# What `ask_for_usage` puts in front of a body's first key.
INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def ask_for_usage(payload: dict, body: bytes) -> bytes | None:
    """The body with `stream_options.include_usage` set (and `payload` with it, which a fallback
    re-serialises), or None when the client asked for it already (nothing to strip) or sent
    `stream_options` that is not an object (the engine answers). Without `stream_options` in the
    body (the usual case) the option is spliced in after the opening brace, not the whole body
    serialised again: a long prompt costs a copy, not a re-encoding."""
    if "stream_options" not in payload:
        payload["stream_options"] = {"include_usage": True}
        brace = body.find(b"{")  # only whitespace comes before it: the body parsed as an object
        return body[: brace + 1] + INCLUDE_USAGE + body[brace + 1 :]
    options = payload["stream_options"]
    if options is None:
        options = {}
    elif type(options) is not dict or options.get("include_usage") is True:
        return None
    payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


def strip_usage_event(data: bytes) -> bytes:
    """`data` without the SSE event that carries only `usage` (`"choices": []`), the one the
    gateway asked for on the client's behalf. It is the stream's last event before `[DONE]`, so
    only the last event that mentions "usage" is parsed. An event split across two reads passes
    unchanged."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return data
    start = data.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = data.find(b"\n\n", at)
    if end < 0 or not data.startswith(b"data:", start):
        return data
    try:
        obj = orjson.loads(data[start + 5 : end])
    except orjson.JSONDecodeError:
        return data
    if type(obj) is dict and obj.get("choices") == [] and obj.get("usage") is not None:
        return data[:start] + data[end + 2 :]
    return data
