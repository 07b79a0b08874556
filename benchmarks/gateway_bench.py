#!/usr/bin/env python3
"""What the gateway costs per request, side by side with nginx and LiteLLM's proxy.

Targets, all in front of the same instant upstream (cortex.testing.fake_engine, so only proxy
cost is measured):

  direct   the upstream itself
  cortex   `python -m cortex.gateway` (one worker, default settings, access log on), client auth on,
           one key without limits
  cortex-noauth    the same with client auth off (CORTEX_GATEWAY_NO_AUTH)
  cortex-limits    one key with rpm, tpm and a daily budget, all too high to refuse (the limiter's cost)
  cortex-100keys   100 keys with limits, requests spread over them in turn (lookup cost vs key count)
  cortex-2w        `cortex` with two workers (CORTEX_GATEWAY_WORKERS=2; its CPU is both workers' and the supervisor's)
  cortex-interp    `cortex` running its source interpreted (CORTEX_GATEWAY_COMPILED=0), not the mypyc build
  cortex-2w-interp the same with two workers
  nginx    Debian's nginx as a plain reverse proxy: one worker, keepalive upstream,
           proxy_buffering off, access_log off (benchmarks/gateway_nginx.conf)
  litellm  LiteLLM's proxy (`litellm[proxy]` in its own virtualenv, one worker, no database)

Modes: non-streaming chat completions, and streaming (20 SSE events + [DONE], each its own
write at the upstream). Load: `wrk` (Debian) at each concurrency for --duration seconds, the
targets interleaved in rounds so drift hits all alike; the median over rounds is reported.
Time to first byte: sequential requests on one keep-alive connection (c=1). Proxy CPU: the
proxy's process tree's utime+stime from /proc, divided by the requests wrk completed.

    (wrk and nginx-light are installed by scripts/apt-install when missing)
    python3 -m venv ~/.cache/cortex/bench/litellm-venv && \\
        ~/.cache/cortex/bench/litellm-venv/bin/pip install 'litellm[proxy]'
    .venv/bin/python benchmarks/gateway_bench.py [--rounds 3] [--duration 5] [--targets direct,cortex,nginx,litellm]
        [--baseline DIR]    # also the gateway of another checkout (git worktree/archive), as target cortex-base
    targets also: cortex-noauth, cortex-limits, cortex-100keys, cortex-2w (see above), and with
    --baseline cortex-limits-base and cortex-2w-base (those two on the other checkout)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cortex.testing.gateway import GatewayProcess
from cortex.net import free_port

HERE = Path(__file__).resolve().parent
ENGINE_KEY = "bench-engine-key"
CHUNKS = 20
TICKS = os.sysconf("SC_CLK_TCK")
MESSAGES = [{"role": "user", "content": "Say hello."}]


# --- process accounting ------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


# --- targets ---------------------------------------------------------------------------------------


class Target:
    name = ""
    url = ""
    auth = "Bearer none"
    auths: list[str] = []  # several keys: wrk sends them in turn
    model = "fake"
    pids: list[int] = []

    def stop(self) -> None: ...


def wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc  # not listening yet: asked again until the deadline
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up at {url} within {timeout:.0f} s (last: {last!r})")


class Upstream(Target):
    name = "direct"

    def __init__(self, workdir: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cortex.testing.fake_engine",
                "--port",
                str(port),
                "--api-key",
                ENGINE_KEY,
                "--chunks",
                str(CHUNKS),
            ],
            stdout=open(workdir / "upstream.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.auth = f"Bearer {ENGINE_KEY}"
        wait_http(self.url + "/health", 20, "fake upstream")
        self.pids = [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# Limits no benchmark run reaches: the limiter does all its work and never refuses.
HIGH_LIMITS = {"rpm": 10**9, "tpm": 10**12, "budget_tokens_per_day": 10**15}


class Cortex(Target):
    name = "cortex"

    def __init__(
        self,
        workdir: Path,
        upstream: Upstream,
        source: Path | None = None,
        name: str = "cortex",
        no_auth: bool = False,
        keys: int = 1,
        limits: dict | None = None,
        workers: int = 1,
        interpreted: bool = False,
    ) -> None:
        env, command = {"CORTEX_GATEWAY_WORKERS": str(workers)}, None
        self.name = name
        if source is not None:  # another checkout (-P: its cortex, not the one in the current directory)
            self.name = "cortex-base" if name == "cortex" else name + "-base"
            env, command = {"PYTHONPATH": str(source.resolve())}, [sys.executable, "-P", "-m", "cortex.gateway"]
            env["CORTEX_GATEWAY_WORKERS"] = str(workers)
        if interpreted:  # the source as it is, not its compiled build (cortex/gateway/compiled.py)
            env["CORTEX_GATEWAY_COMPILED"] = "0"
        self.gw = GatewayProcess(
            workdir / f"{self.name}-home",
            log_path=workdir / f"{self.name}.log",
            env=env,
            command=command,
            no_auth=no_auth,
        ).start()
        with self.gw.client() as c:
            c.register("fake", upstream.url, engine_api_key=ENGINE_KEY)
            self.auths = ["Bearer " + c.create_key(name=f"bench-{i}", **(limits or {}))["key"] for i in range(keys)]
            self.auth = self.auths[0]
        self.url = self.gw.url
        self.pids = _tree(self.gw.proc.pid)  # with workers: the supervisor and its workers

    def stop(self) -> None:
        self.gw.stop()


class Nginx(Target):
    name = "nginx"

    def __init__(self, workdir: Path, upstream: Upstream) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx not installed: scripts/apt-install nginx=nginx-light")
        port = free_port()
        prefix = workdir / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = (HERE / "gateway_nginx.conf").read_text()
        conf = conf.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
        conf = conf.replace("@UPSTREAM@", upstream.url.removeprefix("http://")).replace("@ENGINE_KEY@", ENGINE_KEY)
        (prefix / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
            stdout=open(prefix / "stdout.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_http(self.url + "/health", 20, "nginx")
        self.pids = _tree(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(10)


class LiteLLM(Target):
    name = "litellm"

    def __init__(self, workdir: Path, upstream: Upstream, venv: Path) -> None:
        binary = venv / "bin" / "litellm"
        if not binary.exists():
            raise RuntimeError(
                f"LiteLLM not installed in {venv}: python3 -m venv {venv} && {venv}/bin/pip install 'litellm[proxy]'"
            )
        port = free_port()
        self.master_key = "sk-" + secrets.token_hex(32)
        self.auth = f"Bearer {self.master_key}"
        config = workdir / "litellm.yaml"
        config.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": "fake",
                            "litellm_params": {
                                "model": "openai/fake",
                                "api_base": upstream.url + "/v1",
                                "api_key": ENGINE_KEY,
                            },
                        }
                    ],
                    "litellm_settings": {"drop_params": True, "telemetry": False},
                    # LiteLLM refuses to start without a master key; with no database it is the only key.
                    "general_settings": {"master_key": self.master_key},
                }
            )
        )
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "true"}
        env.pop("DATABASE_URL", None)
        self.proc = subprocess.Popen(
            [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
            stdout=open(workdir / "litellm.log", "w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_http(self.url + "/health/liveliness", 240, "LiteLLM proxy")
        self.pids = _tree(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


# --- load ------------------------------------------------------------------------------------------


def _body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "messages": MESSAGES, "stream": stream})


def _unit(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if m is None:  # wrk prints nonsense when (almost) nothing completed
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def _percentile(out: str, which: str) -> float:
    found = re.search(which + r"\s+(\S+)", out)
    return _unit(found.group(1)) if found else float("nan")


def run_wrk(target: Target, stream: bool, concurrency: int, duration: float, workdir: Path) -> dict:
    script = workdir / f"wrk-{target.name}-{int(stream)}.lua"
    lua = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(_body(target.model, stream))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "{target.auth}"\n'
    )
    if len(target.auths) > 1:  # one key after another, each request its own
        lua += (
            "local keys = {" + ",".join(json.dumps(a) for a in target.auths) + "}\n"
            "local i = 0\n"
            "request = function()\n"
            "  i = i % #keys + 1\n"
            '  return wrk.format(nil, nil, {["Content-Type"] = "application/json", ["Authorization"] = keys[i]}, nil)\n'
            "end\n"
        )
    script.write_text(lua)
    before = cpu_seconds(target.pids)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(script),
            target.url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(target.pids) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if requests == 0:
        return {
            "rps": 0.0,
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "cpu_us_per_req": float("nan"),
            "requests": 0,
            "errors": 0,
        }
    errors = 0
    for pattern in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    ):
        found = re.search(pattern, out)
        if found:
            errors += sum(int(g) for g in found.groups())
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _percentile(out, "50%"),
        "p99_ms": _percentile(out, "99%"),
        "cpu_us_per_req": cpu / max(requests, 1) * 1e6,
        "requests": requests,
        "errors": errors,
    }


def probe_ttfb(target: Target, stream: bool, n: int) -> float:
    """Median time to the first body byte (non-streaming) or first SSE event (streaming), ms."""
    host, port = target.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = _body(target.model, stream)
    headers = {"Content-Type": "application/json", "Authorization": target.auth}
    samples = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if stream:
            while not resp.readline().startswith(b"data:"):
                pass
        else:
            resp.read(1)
        t1 = time.perf_counter()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{target.name}: status {resp.status}")
        if i >= 5:
            samples.append((t1 - t0) * 1e3)
    conn.close()
    return statistics.median(samples)


# --- report ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway overhead vs direct, nginx and LiteLLM.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--targets", default="direct,cortex,nginx,litellm")
    parser.add_argument("--ttfb-requests", type=int, default=300)
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=Path(os.environ.get("CORTEX_CACHE", "~/.cache/cortex")).expanduser() / "bench" / "litellm-venv",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure the gateway of this checkout (target cortex-base), interleaved with the rest",
    )
    args = parser.parse_args()
    # wrk drives the load, nginx is a target: installed through the project's own apt helper
    # (only what is missing, .debs cached in CORTEX_CACHE), not by hand.
    needed = ["wrk=wrk"] + (["nginx=nginx-light"] if "nginx" in args.targets.split(",") else [])
    installed = subprocess.run([str(Path(__file__).resolve().parents[1] / "scripts" / "apt-install"), *needed])
    if installed.returncode != 0 or not shutil.which("wrk"):
        print("wrk is missing and scripts/apt-install could not install it (see above)", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = args.targets.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="cortex-gateway-bench-"))
    upstream = Upstream(workdir)
    targets: list[Target] = [upstream] if "direct" in wanted else []
    unavailable: dict[str, str] = {}
    factories = {
        "cortex": lambda: Cortex(workdir, upstream),
        "nginx": lambda: Nginx(workdir, upstream),
        "litellm": lambda: LiteLLM(workdir, upstream, args.litellm_venv),
        "cortex-base": lambda: Cortex(workdir, upstream, args.baseline),
        "cortex-noauth": lambda: Cortex(workdir, upstream, name="cortex-noauth", no_auth=True),
        "cortex-limits": lambda: Cortex(workdir, upstream, name="cortex-limits", limits=HIGH_LIMITS),
        "cortex-100keys": lambda: Cortex(workdir, upstream, name="cortex-100keys", keys=100, limits=HIGH_LIMITS),
        "cortex-2w": lambda: Cortex(workdir, upstream, name="cortex-2w", workers=2),
        "cortex-interp": lambda: Cortex(workdir, upstream, name="cortex-interp", interpreted=True),
        "cortex-2w-interp": lambda: Cortex(workdir, upstream, name="cortex-2w-interp", workers=2, interpreted=True),
        "cortex-limits-base": lambda: Cortex(
            workdir, upstream, args.baseline, name="cortex-limits", limits=HIGH_LIMITS
        ),
        "cortex-2w-base": lambda: Cortex(workdir, upstream, args.baseline, name="cortex-2w", workers=2),
    }
    if args.baseline and "cortex-base" not in wanted:
        wanted.insert(wanted.index("cortex") + 1 if "cortex" in wanted else len(wanted), "cortex-base")
    try:
        for name in wanted:
            if name in factories:
                try:
                    targets.append(factories[name]())
                except Exception as exc:  # reported in the table instead of aborting the others
                    unavailable[name] = str(exc)
        results: dict[tuple, list[dict]] = {}
        ttfb: dict[tuple, list[float]] = {}
        for r in range(args.rounds):
            for stream in (False, True):
                for c in levels:
                    for target in targets:
                        res = run_wrk(target, stream, c, args.duration, workdir)
                        results.setdefault((target.name, stream, c), []).append(res)
                        print(
                            f"round {r + 1} {'stream' if stream else 'json  '} c={c:<3} {target.name:8} "
                            f"{res['rps']:9.0f} req/s  p50 {res['p50_ms']:7.2f} ms  "
                            f"cpu {res['cpu_us_per_req']:8.1f} us/req  errors {res['errors']}",
                            flush=True,
                        )
                for target in targets:
                    ttfb.setdefault((target.name, stream), []).append(
                        probe_ttfb(
                            target, stream, max(20, args.ttfb_requests // (50 if target.name == "litellm" else 1))
                        )
                    )
    finally:
        for target in targets:
            target.stop()
        if upstream not in targets:  # measured only as `direct`, but always started
            upstream.stop()

    def med(name, stream, c, key):
        return statistics.median(x[key] for x in results[(name, stream, c)])

    lines = [
        f"Gateway benchmark: {args.rounds} rounds x {args.duration:g} s per cell, wrk -t1, median of rounds; "
        f"upstream answers instantly; {os.cpu_count()} CPUs (shared).",
        "",
        "| mode | c | target | req/s | p50 ms | p99 ms | added p50 ms | TTFB ms (c=1) | proxy CPU µs/req | µs/chunk | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stream in (False, True):
        for c in levels:
            for target in targets:
                n = target.name
                p50 = med(n, stream, c, "p50_ms")
                direct_p50 = med("direct", stream, c, "p50_ms") if "direct" in wanted else float("nan")
                cpu = med(n, stream, c, "cpu_us_per_req")
                lines.append(
                    f"| {'stream' if stream else 'json'} | {c} | {n} | {med(n, stream, c, 'rps'):.0f} | {p50:.2f} | "
                    f"{med(n, stream, c, 'p99_ms'):.2f} | {'' if n == 'direct' else f'{p50 - direct_p50:+.2f}'} | "
                    f"{statistics.median(ttfb[(n, stream)]):.3f} | "
                    f"{'(upstream) ' if n == 'direct' else ''}{cpu:.0f} | "
                    f"{f'{cpu / (CHUNKS + 1):.1f}' if stream else ''} | "
                    f"{sum(x['errors'] for x in results[(n, stream, c)])} |"
                )
    for name, why in unavailable.items():
        lines.append(f"\n{name}: not measured: {why}")
    names = [t.name for t in targets]
    if "cortex" in names:
        summary = []
        for other in ("litellm", "nginx"):
            if other in names:
                ratio = med("cortex", False, levels[-1], "rps") / med(other, False, levels[-1], "rps")
                summary.append(f"cortex/{other} throughput at c={levels[-1]}: {ratio:.2f}x")
        lines.append("\n" + "; ".join(summary))
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": {f"{k[0]}|{'stream' if k[1] else 'json'}|{k[2]}": v for k, v in results.items()},
                    "ttfb_ms": {f"{k[0]}|{'stream' if k[1] else 'json'}": v for k, v in ttfb.items()},
                    "unavailable": unavailable,
                },
                indent=2,
            )
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
