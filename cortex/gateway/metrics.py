"""Prometheus metrics for the gateway, kept in plain dicts and rendered on /metrics.

A hand-rolled store rather than prometheus_client: one request updates about ten series, and
plain dict/list updates cost well under a microsecond each, with no locks (one event loop).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING, Iterable
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from .connections import ConnectionGuard
    from .usage import UsageBook

# Seconds. Latency spans sub-millisecond proxy answers to multi-minute generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class Histogram:
    __slots__ = ("buckets", "series")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        # labels -> [counts per bucket..., +Inf count, sum]
        self.series: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0] * (len(self.buckets) + 1) + [0.0]
        row[bisect_left(self.buckets, value)] += 1
        row[-1] += value


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# A snapshot (`Metrics.snapshot`) is plain data that marshal writes and reads, so the workers of
# one gateway can publish theirs and the one answering a scrape can add them up (workermetrics.py):
# counters {labels: n}, histograms {labels: row}, "keys" {key id or "other": usage.FIELDS row},
# and the gauge "connections_open".
COUNTERS = ("requests", "errors", "tokens", "fallbacks", "refused")
ROWS = ("latency", "ttfb", "overhead", "keys")
GAUGES = ("connections_open",)


class Metrics:
    """Every series the gateway exports; labels are (model, replica) unless named otherwise."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple, int] = defaultdict(int)  # model, replica, status
        self.errors: defaultdict[tuple, int] = defaultdict(int)  # model, replica, kind
        self.tokens: defaultdict[tuple, int] = defaultdict(int)  # model, replica, type
        self.fallbacks: defaultdict[tuple, int] = defaultdict(int)  # model (the primary), fallback, reason
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttfb = Histogram(LATENCY_BUCKETS)
        self.overhead = Histogram(OVERHEAD_BUCKETS)

    def error(self, model: str, replica: str, kind: str) -> None:
        self.errors[(model, replica, kind)] += 1

    def snapshot(self, connections: "ConnectionGuard | None" = None, usage: "UsageBook | None" = None) -> dict:
        """This process's counters, histograms and connection gauge as plain data (copies)."""
        snap: dict = {
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "tokens": dict(self.tokens),
            "fallbacks": dict(self.fallbacks),
            "latency": {k: list(v) for k, v in self.latency.series.items()},
            "ttfb": {k: list(v) for k, v in self.ttfb.series.items()},
            "overhead": {k: list(v) for k, v in self.overhead.series.items()},
        }
        if connections is not None:
            snap["connections_open"] = len(connections.open)
            snap["refused"] = {(reason,): n for reason, n in connections.rejected.items()}
        if usage is not None:
            snap["keys"] = usage.series()
        return snap

    def render(
        self, replicas: Iterable, connections: "ConnectionGuard | None" = None, usage: "UsageBook | None" = None
    ) -> bytes:
        """The exposition text of this process alone (a gateway with one worker)."""
        return render(self.snapshot(connections, usage), replicas)


def merge_snapshots(snapshots: Iterable[dict]) -> dict:
    """The sum of several workers' snapshots: counters and histogram rows added label by label."""
    out: dict = {name: {} for name in COUNTERS + ROWS}
    for snap in snapshots:
        for name in COUNTERS:
            acc = out[name]
            for labels, value in snap.get(name, {}).items():
                acc[labels] = acc.get(labels, 0) + value
        for name in ROWS:
            acc = out[name]
            for labels, row in snap.get(name, {}).items():
                have = acc.get(labels)
                if have is None:
                    acc[labels] = list(row)
                else:
                    for i, value in enumerate(row):
                        have[i] += value
        for name in GAUGES:
            if name in snap:
                out[name] = out.get(name, 0) + snap[name]
    return out


def render(snap: dict, replicas: Iterable) -> bytes:
    """The exposition text of a snapshot (one worker's, or the sum of all); in-flight and health
    gauges are read from the live replicas (in flight is every worker's, inflight.py)."""
    out: list[str] = []
    replicas = list(replicas)

    def counter(name: str, help_: str, labels: tuple[str, ...], values: dict, kind: str = "counter") -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for key, value in values.items():
            base = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(labels, key))
            out.append(f"{name}{{{base}}} {value}")

    counter(
        "cortex_gateway_requests_total",
        "Requests answered, by status code.",
        ("model", "replica", "status"),
        snap["requests"],
    )
    counter(
        "cortex_gateway_errors_total",
        "Failed requests by kind of failure.",
        ("model", "replica", "kind"),
        snap["errors"],
    )
    counter(
        "cortex_gateway_tokens_total",
        "Tokens reported in responses' usage.",
        ("model", "replica", "type"),
        snap["tokens"],
    )
    counter(
        "cortex_gateway_fallbacks_total",
        "Requests served by a fallback model, by the model asked for (its served name), the fallback "
        "that served and why the model could not (no_healthy_replica, failed_before_first_byte).",
        ("model", "fallback", "reason"),
        snap["fallbacks"],
    )
    counter(
        "cortex_gateway_in_flight",
        "Requests in flight.",
        ("model", "replica"),
        {(r.model, r.id): r.in_flight for r in replicas},
        "gauge",
    )
    counter(
        "cortex_gateway_replica_healthy",
        "1 when the replica passes its health check.",
        ("model", "replica"),
        {(r.model, r.id): int(r.healthy) for r in replicas},
        "gauge",
    )
    counter(
        "cortex_gateway_replica_draining",
        "1 while the replica is being drained.",
        ("model", "replica"),
        {(r.model, r.id): int(r.state == "draining") for r in replicas},
        "gauge",
    )
    if "connections_open" in snap:
        out.append("# HELP cortex_gateway_client_connections Client connections open.")
        out.append("# TYPE cortex_gateway_client_connections gauge")
        out.append(f"cortex_gateway_client_connections {snap['connections_open']}")
        counter(
            "cortex_gateway_connections_refused_total",
            "Client connections answered with an error and closed, by reason (the error code).",
            ("reason",),
            snap["refused"],
        )
    for name, help_, buckets, series in (
        (
            "cortex_gateway_request_duration_seconds",
            "Time from request to last byte.",
            LATENCY_BUCKETS,
            snap["latency"],
        ),
        (
            "cortex_gateway_time_to_first_byte_seconds",
            "Time from request to the replica's first body byte.",
            LATENCY_BUCKETS,
            snap["ttfb"],
        ),
        (
            "cortex_gateway_overhead_seconds",
            "Time spent in the gateway itself before the response starts.",
            OVERHEAD_BUCKETS,
            snap["overhead"],
        ),
    ):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        _render_histogram(name, buckets, series, ("model", "replica"), out)
    if "keys" in snap:
        render_key_series(snap["keys"], out)
    out.append("")
    return "\n".join(out).encode()


def _render_histogram(
    name: str, buckets: tuple[float, ...], series: dict, label_names: tuple[str, ...], out: list[str]
) -> None:
    for labels, row in series.items():
        base = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(label_names, labels))
        cumulative = 0
        for bound, count in zip(buckets, row):
            cumulative += count
            out.append(f'{name}_bucket{{{base},le="{bound}"}} {cumulative}')
        cumulative += row[len(buckets)]
        out.append(f'{name}_bucket{{{base},le="+Inf"}} {cumulative}')
        out.append(f"{name}_sum{{{base}}} {row[-1]}")
        out.append(f"{name}_count{{{base}}} {cumulative}")


def render_key_series(series: dict[str, list[int]], out: list[str]) -> None:
    """The per-key counters (usage.UsageBook.series, or their sum over workers)."""
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


def engine_scrape_targets(gateway_url: str, replicas: Iterable[dict]) -> list[dict]:
    """Prometheus file_sd target groups, one per replica the gateway routes (`GET
    /admin/replicas`): each engine is scraped through the gateway's admin route
    (`/admin/replicas/{id}/metrics`, `__metrics_path__`), so the scrape job needs only the admin
    token and the gateway's address, never an engine's key or address."""
    url = urlsplit(gateway_url)
    address = url.netloc or url.path
    return [
        {
            "targets": [address],
            "labels": {
                "__scheme__": url.scheme or "http",
                "__metrics_path__": f"/admin/replicas/{quote(r['id'], safe='')}/metrics",
                "replica": r["id"],
                "model": r["model"],
                **{k: str(v) for k, v in (r.get("labels") or {}).items() if k in ("engine", "host", "runtime")},
            },
        }
        for r in sorted(replicas, key=lambda r: r["id"])
    ]
