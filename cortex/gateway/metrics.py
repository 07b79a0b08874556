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

    def render(self, name: str, label_names: tuple[str, ...], out: list[str]) -> None:
        for labels, row in self.series.items():
            base = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(label_names, labels))
            cumulative = 0
            for bound, count in zip(self.buckets, row):
                cumulative += count
                out.append(f'{name}_bucket{{{base},le="{bound}"}} {cumulative}')
            cumulative += row[len(self.buckets)]
            out.append(f'{name}_bucket{{{base},le="+Inf"}} {cumulative}')
            out.append(f"{name}_sum{{{base}}} {row[-1]}")
            out.append(f"{name}_count{{{base}}} {cumulative}")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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

    def render(
        self, replicas: Iterable, connections: "ConnectionGuard | None" = None, usage: "UsageBook | None" = None
    ) -> bytes:
        """The exposition text; in-flight and health gauges are read from the live replicas,
        connection counts from the server's connection guard."""
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
            self.requests,
        )
        counter(
            "cortex_gateway_errors_total",
            "Failed requests by kind of failure.",
            ("model", "replica", "kind"),
            self.errors,
        )
        counter(
            "cortex_gateway_tokens_total",
            "Tokens reported in responses' usage.",
            ("model", "replica", "type"),
            self.tokens,
        )
        counter(
            "cortex_gateway_fallbacks_total",
            "Requests served by a fallback model, by the model asked for (its served name), the fallback "
            "that served and why the model could not (no_healthy_replica, failed_before_first_byte).",
            ("model", "fallback", "reason"),
            self.fallbacks,
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
        if connections is not None:
            out.append("# HELP cortex_gateway_client_connections Client connections open.")
            out.append("# TYPE cortex_gateway_client_connections gauge")
            out.append(f"cortex_gateway_client_connections {len(connections.open)}")
            counter(
                "cortex_gateway_connections_refused_total",
                "Client connections answered with an error and closed, by reason (the error code).",
                ("reason",),
                {(reason,): n for reason, n in connections.rejected.items()},
            )
        for name, help_, hist in (
            ("cortex_gateway_request_duration_seconds", "Time from request to last byte.", self.latency),
            (
                "cortex_gateway_time_to_first_byte_seconds",
                "Time from request to the replica's first body byte.",
                self.ttfb,
            ),
            (
                "cortex_gateway_overhead_seconds",
                "Time spent in the gateway itself before the response starts.",
                self.overhead,
            ),
        ):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            hist.render(name, ("model", "replica"), out)
        if usage is not None:
            usage.render(out)
        out.append("")
        return "\n".join(out).encode()


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
