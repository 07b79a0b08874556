"""Usage per API key and model: counted in memory per request, flushed to the registry in batches.

Every request made with a key adds to one in-memory row per (key id, model): requests, prompt
and completion tokens (from the response's `usage`, streamed or not), errors, and requests
refused by the key's limits. `Gateway.flush_usage` writes the rows, together with the limiter's
state (limits.py), in one registry transaction every `gateway_usage_flush_interval` seconds
and at shutdown, into hourly rows (`key_usage`): `cortex keys usage --since 7d` sums them.

/metrics shows per-key series labelled by key id (never the key): at most `max_keys` keys get
their own series, the rest are summed under key="other", so the series count stays bounded.
"""

from __future__ import annotations

from typing import Iterable

# Columns of a usage row, in order (the registry's key_usage table has the same).
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")
OTHER = "other"


class UsageBook:
    def __init__(self, max_keys: int = 100) -> None:
        self.max_keys = max_keys
        self.pending: dict[tuple[str, str], list[int]] = {}  # (key id, model) -> FIELDS, since the last flush
        self.totals: dict[str, list[int]] = {}  # key id (or OTHER) -> FIELDS, flushed, this process's life

    def record(self, key_id: str, model: str, prompt: int | None, completion: int | None, failed: bool) -> None:
        row = self.pending.get((key_id, model))
        if row is None:
            row = self.pending[(key_id, model)] = [0, 0, 0, 0, 0]
        row[0] += 1
        if prompt:
            row[1] += prompt
        if completion:
            row[2] += completion
        if failed:
            row[3] += 1

    def refused(self, key_id: str, model: str) -> None:
        row = self.pending.get((key_id, model))
        if row is None:
            row = self.pending[(key_id, model)] = [0, 0, 0, 0, 0]
        row[4] += 1

    def take(self) -> list[tuple[str, str, list[int]]]:
        """The pending rows, folded into this process's totals and cleared."""
        rows = [(key_id, model, row) for (key_id, model), row in self.pending.items()]
        self.pending = {}
        for key_id, _, row in rows:
            self._add(key_id, row)
        return rows

    def put_back(self, rows: list[tuple[str, str, list[int]]]) -> None:
        """Rows `take` gave out that a failed flush did not write: pending again, for the next."""
        for key_id, model, row in rows:
            total = self.totals[key_id if key_id in self.totals else OTHER]
            pending = self.pending.setdefault((key_id, model), [0, 0, 0, 0, 0])
            for i, value in enumerate(row):
                total[i] -= value
                pending[i] += value

    def _add(self, key_id: str, row: list[int]) -> None:
        label = key_id if key_id in self.totals or len(self.totals) < self.max_keys else OTHER
        total = self.totals.get(label)
        if total is None:
            total = self.totals[label] = [0, 0, 0, 0, 0]
        for i, value in enumerate(row):
            total[i] += value

    def series(self) -> dict[str, list[int]]:
        """Per-key counters for /metrics: flushed totals plus what is pending."""
        out = {k: list(v) for k, v in self.totals.items()}
        for (key_id, _), row in self.pending.items():
            label = key_id if key_id in out or len(out) < self.max_keys else OTHER
            total = out.setdefault(label, [0, 0, 0, 0, 0])
            for i, value in enumerate(row):
                total[i] += value
        return out

    def render(self, out: list[str]) -> None:
        series = self.series()
        for name, help_, column, extra in (
            ("cortex_gateway_key_requests_total", "Requests made with each API key (by key id).", 0, ""),
            ("cortex_gateway_key_tokens_total", "Tokens in responses' usage, by key id.", 1, 'type="prompt"'),
            ("cortex_gateway_key_tokens_total", "", 2, 'type="completion"'),
            ("cortex_gateway_key_errors_total", "Requests with each key that ended in an error.", 3, ""),
            ("cortex_gateway_key_rate_limited_total", "Requests refused 429 by the key's limits.", 4, ""),
        ):
            if help_:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} counter")
            for key_id, row in series.items():
                labels = f'key="{key_id}"' + (f",{extra}" if extra else "")
                out.append(f"{name}{{{labels}}} {row[column]}")


def summarize(rows: Iterable[tuple], names: dict[str, str]) -> list[dict]:
    """Registry rows (key id, model, FIELDS...) as the admin API shows them."""
    return [{"key_id": r[0], "name": names.get(r[0], ""), "model": r[1], **dict(zip(FIELDS, r[2:]))} for r in rows]
