"""Usage per API key and model: counted in memory per request, flushed to the registry in batches.

Every request made with a key adds to one in-memory row per (key id, model): requests, prompt
and completion tokens (from the response's `usage`, streamed or not), errors, and requests
refused by the key's limits. `Gateway.flush_usage` writes the rows, together with the limiter's
state (limits.py), in one registry transaction every `gateway_usage_flush_interval` seconds
and at shutdown, into hourly rows (`key_usage`): `cortex keys usage --since 7d` sums them.

/metrics shows per-key series labelled by key id (never the key): at most `max_keys` keys get
their own series, the rest are summed under key="other", so the series count stays bounded. A key
keeps its label for the process's life. With several workers the labels are claimed in a table
the workers share (workermetrics.KeyLabels), so the bound holds for the whole gateway and every
worker counts a key under the same label.
"""

from __future__ import annotations

from typing import Iterable, Protocol

# Columns of a usage row, in order (the registry's key_usage table has the same).
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")
OTHER = "other"


class SharedLabels(Protocol):
    def claim(self, key_id: str, max_keys: int) -> bool: ...


class UsageBook:
    def __init__(self, max_keys: int = 100, shared: SharedLabels | None = None) -> None:
        self.max_keys = max_keys
        self.shared = shared  # the workers' label table; None: this process decides alone
        self.labels: dict[str, str] = {}  # key id -> its label (itself or OTHER), fixed once given
        self._own = 0  # keys labelled by their own id
        self.pending: dict[tuple[str, str], list[int]] = {}  # (key id, model) -> FIELDS, since the last flush
        self.totals: dict[str, list[int]] = {}  # label -> FIELDS, flushed, this process's life

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
            total = self.totals[self.labels[key_id]]
            pending = self.pending.setdefault((key_id, model), [0, 0, 0, 0, 0])
            for i, value in enumerate(row):
                total[i] -= value
                pending[i] += value

    def label(self, key_id: str) -> str:
        """The key's /metrics label: its id while fewer than `max_keys` keys have one, else OTHER."""
        label = self.labels.get(key_id)
        if label is None:
            if self.shared is not None:
                own = self.shared.claim(key_id, self.max_keys)
            else:
                own = self._own < self.max_keys
            self._own += own
            label = self.labels[key_id] = key_id if own else OTHER
        return label

    def _add(self, key_id: str, row: list[int]) -> None:
        label = self.label(key_id)
        total = self.totals.get(label)
        if total is None:
            total = self.totals[label] = [0, 0, 0, 0, 0]
        for i, value in enumerate(row):
            total[i] += value

    def series(self) -> dict[str, list[int]]:
        """Per-key counters for /metrics: flushed totals plus what is pending."""
        out = {k: list(v) for k, v in self.totals.items()}
        for (key_id, _), row in self.pending.items():
            total = out.setdefault(self.label(key_id), [0, 0, 0, 0, 0])
            for i, value in enumerate(row):
                total[i] += value
        return out


def summarize(rows: Iterable[tuple], names: dict[str, str]) -> list[dict]:
    """Registry rows (key id, model, FIELDS...) as the admin API shows them."""
    return [{"key_id": r[0], "name": names.get(r[0], ""), "model": r[1], **dict(zip(FIELDS, r[2:]))} for r in rows]
