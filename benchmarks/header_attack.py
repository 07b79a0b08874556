#!/usr/bin/env python3
"""What one unauthenticated client can do to the gateway with request heads (issue 15).

Against a real gateway process in front of the fake engine (cortex.testing.fake_engine):

  quiet    keyed requests, one at a time, nothing else going on
  endless  the same while an attacker streams one endless header in 1 MiB chunks (and
           reconnects whenever the gateway closes the connection)
  slow     N connections each send a partial head, one byte a second; how many are still
           open after --slow-wait seconds

Reported: keyed-request latency (p50, p99, max) and failures, the gateway's peak RSS, whether
a replica was marked unhealthy, and what became of the attacker's connections.

    .venv/bin/python benchmarks/header_attack.py [--duration 20] [--slow 40 --slow-wait 15]
    .venv/bin/python benchmarks/header_attack.py --gateway-source /path/to/older/checkout   # compare
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from cortex.gateway.client import GatewayError
from cortex.net import free_port
from cortex.testing.gateway import GatewayProcess

ENGINE_KEY = "attack-engine-key"
CHUNK = b"a" * (1024 * 1024)
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nX-Pad: "


class Attacker(threading.Thread):
    """Streams an endless header value; reconnects when the gateway drops the connection."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.connections = 0
        self.closed_by_gateway = 0
        self.sent = 0
        self.answers: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.settimeout(1.0)
            self.connections += 1
            try:
                sock.sendall(HEAD)
                while not self.stop.is_set():
                    try:
                        sock.sendall(CHUNK)
                        self.sent += len(CHUNK)
                    except socket.timeout:  # the gateway reads slowly: keep pushing
                        continue
            except (BrokenPipeError, ConnectionResetError):
                # the gateway closed this connection: counted and its answer read below
                self.closed_by_gateway += 1
            else:  # stopped by us
                sock.close()
                return
            if self.stop.is_set():
                sock.close()
                return
            try:
                status = sock.recv(64).split(b"\r\n", 1)[0].decode("latin-1") or "closed"
            except OSError as exc:
                status = type(exc).__name__
            self.answers[status] = self.answers.get(status, 0) + 1
            sock.close()


def keyed_requests(gw: GatewayProcess, key: str, seconds: float) -> tuple[list[float], int]:
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                r = client.post(
                    gw.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                )
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - t0) * 1000)
            failures += not ok
            time.sleep(0.05)
    return latencies, failures


class Sampler(threading.Thread):
    """Peak RSS of the gateway and whether any replica was ever listed unhealthy."""

    def __init__(self, gw: GatewayProcess, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.gw, self.stop = gw, stop
        self.peak_rss = 0
        self.unhealthy = False
        self.admin_failures: list[str] = []  # admin calls a starved gateway did not answer

    def run(self) -> None:
        with self.gw.client() as admin:
            while not self.stop.is_set():
                self.peak_rss = max(self.peak_rss, self.gw.rss_bytes())
                try:
                    if any(r["healthy"] is False for r in admin.list()["replicas"]):
                        self.unhealthy = True
                except (httpx.HTTPError, GatewayError) as exc:  # a starved gateway may not answer in time
                    self.admin_failures.append(type(exc).__name__)
                self.stop.wait(0.5)


def phase(gw: GatewayProcess, key: str, seconds: float, attack: bool) -> dict:
    stop = threading.Event()
    sampler = Sampler(gw, stop)
    sampler.start()
    attacker = Attacker(gw.port, stop) if attack else None
    if attacker:
        attacker.start()
        time.sleep(1.0)  # let the attack get going
    latencies, failures = keyed_requests(gw, key, seconds)
    stop.set()
    sampler.join()
    if attacker:
        attacker.join(10)
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "failures": failures,
        "p50": statistics.median(ordered) if ordered else float("nan"),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan"),
        "max": ordered[-1] if ordered else float("nan"),
        "rss": sampler.peak_rss,
        "unhealthy": sampler.unhealthy,
        "admin_failures": len(sampler.admin_failures),
        "attacker": attacker,
    }


def slow_heads(gw: GatewayProcess, count: int, wait: float) -> int:
    """Open `count` connections that trickle a head one byte a second; how many are still open
    after `wait` seconds."""
    socks: list[socket.socket] = []
    closed: list[socket.socket] = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
        socks.append(s)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for s in list(socks):
            try:
                s.sendall(b"X")
            except OSError:  # the gateway closed it: it is checked (and counted closed) below
                closed.append(s)
                socks.remove(s)
        time.sleep(1.0)
    still_open = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            alive = False if data == b"" else b"408" not in data
        except BlockingIOError:
            alive = True
        except OSError:
            alive = False
        still_open += alive
        s.close()
    for s in closed:
        s.close()
    return still_open


def main() -> int:
    parser = argparse.ArgumentParser(description="Endless and slow request heads against the gateway.")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of keyed requests per phase")
    parser.add_argument("--slow", type=int, default=40, help="slow-head connections to open")
    parser.add_argument("--slow-wait", type=float, default=15.0, help="seconds before counting them")
    parser.add_argument("--gateway-source", type=Path, help="run the gateway from this checkout instead")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cortex-header-attack-"))
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "cortex.testing.fake_engine", "--port", str(port), "--api-key", ENGINE_KEY],
        stdout=open(workdir / "engine.log", "w"),
        stderr=subprocess.STDOUT,
    )
    env, command = {}, None
    if args.gateway_source:  # -P: not the current directory first on the path, the other checkout
        env, command = (
            {"PYTHONPATH": str(args.gateway_source.resolve())},
            [sys.executable, "-P", "-m", "cortex.gateway"],
        )
    gw = GatewayProcess(workdir / "home", env=env, log_path=workdir / "gateway.log", command=command)
    try:
        gw.start()
        with gw.client() as c:
            c.register("fake", f"http://127.0.0.1:{port}", engine_api_key=ENGINE_KEY)
            key = c.create_key(name="attack-bench")["key"]
        for _ in range(50):  # warm up
            httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "fake", "messages": []},
            )
        idle_rss = gw.rss_bytes()
        quiet = phase(gw, key, args.duration, attack=False)
        endless = phase(gw, key, args.duration, attack=True)
        still_open = slow_heads(gw, args.slow, args.slow_wait) if args.slow else None
    finally:
        gw.stop()
        engine.terminate()
        engine.wait()
    print(
        f"\nHeader attack: gateway from {args.gateway_source or 'this checkout'}; {args.duration:g} s of keyed "
        f"requests per phase (one at a time, 50 ms apart); {os.cpu_count()} CPUs (shared); "
        f"gateway RSS idle {idle_rss / 2**20:.0f} MiB.\n"
    )
    print(
        "| phase | keyed requests | failed | p50 ms | p99 ms | max ms | gateway peak RSS MiB | replica marked unhealthy | admin calls unanswered |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("quiet", quiet), ("endless header", endless)):
        print(
            f"| {name} | {r['requests']} | {r['failures']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | "
            f"{r['rss'] / 2**20:.0f} | {'yes' if r['unhealthy'] else 'no'} | {r['admin_failures']} |"
        )
    attacker = endless["attacker"]
    print(
        f"\nattacker: {attacker.sent / 2**20:.0f} MiB sent on {attacker.connections} connections; "
        f"{attacker.closed_by_gateway} closed by the gateway; first bytes read back: {attacker.answers or 'none'}"
    )
    if still_open is not None:
        print(f"slow heads: {still_open} of {args.slow} connections still open after {args.slow_wait:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
