#!/usr/bin/env python3
"""Prefix-cache affinity on against off: two real llama-server replicas behind the gateway.

The workload is many conversations that each open with one of a few long system prompts (a
"family": one per assistant persona, say) and go on for several turns, the next turn sent with
the answer the model gave. For each mode a fresh pair of llama-servers (`--slots --metrics`,
`-np` slots each, so their caches start cold) and a fresh gateway with CORTEX_GATEWAY_AFFINITY
on or off serve the same workload, the conversations of one turn sent `--concurrency` at a
time. Reported per mode: time to first token (first streamed content event, as the client
sees it) p50/p99, the prompt tokens the engines evaluated and those they took from their
prefix cache (llama-server's `/metrics`: `llamacpp:prompt_tokens_total` counts the evaluated
ones, `llamacpp:prompt_tokens_cached_total` the reused ones), and how the requests split over
the replicas. Replica ids are fixed, so the rendezvous hashing is the same every run.

    .venv/bin/python benchmarks/affinity_bench.py [--families 4] [--conversations 8] [--turns 3]
        [--concurrency 2] [--slots 2] [--threads 1] [--max-tokens 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex.net import free_port  # noqa: E402
from cortex.testing.gateway import GatewayProcess  # noqa: E402
from cortex.toolchain import find_test_model, find_toolchain  # noqa: E402

PERSONAS = ["a bicycle shop", "a public library", "a tax office", "a train operator", "a bakery", "a hospital"]


def system_prompt(family: int, words: int) -> str:
    """A long, distinct system prompt per family (distinct from its first characters on)."""
    place = PERSONAS[family % len(PERSONAS)]
    rules = " ".join(
        f"Rule {i} for {place}: answer politely, briefly and only about {place}." for i in range(words // 12)
    )
    return f"Family {family}. You are the assistant of {place}. {rules}"


class Replica:
    def __init__(self, llama_server: Path, model: Path, slots: int, threads: int, context: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(llama_server),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--alias",
            "smollm2",
            "--slots",
            "--metrics",
            "-np",
            str(slots),
            "-c",
            str(context),
            "-t",
            str(threads),
        ]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 200:
                    return
                last = f"/health answered {health.status_code}"
            except httpx.HTTPError as exc:  # still loading: not listening yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise RuntimeError(f"llama-server at {self.url} not ready after {timeout:.0f} s (last: {last})")

    def counters(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:prompt_tokens_total ") or line.startswith(
                "llamacpp:prompt_tokens_cached_total "
            ):
                name, value = line.split()
                values[name.split(":")[1]] = float(value)
        return values

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(gateway: str, messages: list[dict], max_tokens: int) -> tuple[float, str, str]:
    """One streamed chat request: (seconds to the first content event, the answer, replica id)."""
    started = time.perf_counter()
    ttft = None
    answer = []
    with httpx.stream(
        "POST",
        gateway + "/v1/chat/completions",
        timeout=600,
        json={"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True},
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:500]!r}")
        replica = r.headers["x-cortex-replica"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - started
                answer.append(delta["content"])
    return (ttft if ttft is not None else time.perf_counter() - started), "".join(answer), replica


def run_mode(affinity: bool, args: argparse.Namespace, workdir: Path) -> dict:
    toolchain, model = find_toolchain(), find_test_model()
    replicas = [
        Replica(
            toolchain.llama_server,
            model.gguf,
            args.slots,
            args.threads,
            args.context,
            workdir / f"llama-{'on' if affinity else 'off'}-{i}.log",
        )
        for i in range(2)
    ]
    gateway = GatewayProcess(
        workdir / f"gateway-{'on' if affinity else 'off'}",
        no_auth=True,
        env={"CORTEX_GATEWAY_AFFINITY": str(affinity).lower(), "CORTEX_GATEWAY_HEALTH_TIMEOUT": "30"},
    )
    try:
        for replica in replicas:
            replica.wait_ready()
        gateway.start()
        with gateway.client() as client:
            for i, replica in enumerate(replicas):
                client.register("smollm2", replica.url, replica_id=f"smollm2-{i}")
        before = [r.counters() for r in replicas]
        conversations = [
            [{"role": "system", "content": system_prompt(c % args.families, args.system_words)}]
            for c in range(args.conversations)
        ]
        ttfts: list[float] = []
        served: dict[str, int] = {}
        lock = threading.Lock()

        def turn(conversation: list[dict], t: int, c: int) -> None:
            conversation.append({"role": "user", "content": f"Question {t} of customer {c}: what can you do for me?"})
            ttft, answer, replica = ask(gateway.url, conversation, args.max_tokens)
            conversation.append({"role": "assistant", "content": answer})
            with lock:
                ttfts.append(ttft)
                served[replica] = served.get(replica, 0) + 1

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for t in range(args.turns):
                list(pool.map(lambda ic: turn(ic[1], t, ic[0]), enumerate(conversations)))
        elapsed = time.monotonic() - started
        after = [r.counters() for r in replicas]
    finally:
        gateway.stop()
        for replica in replicas:
            replica.stop()
    evaluated = sum(a["prompt_tokens_total"] - b["prompt_tokens_total"] for a, b in zip(after, before))
    cached = sum(a["prompt_tokens_cached_total"] - b["prompt_tokens_cached_total"] for a, b in zip(after, before))
    ttfts.sort()
    return {
        "affinity": affinity,
        "requests": len(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))] * 1000,
        "prompt_tokens_evaluated": int(evaluated),
        "prompt_tokens_cached": int(cached),
        "cache_hit_share": cached / (cached + evaluated) if cached + evaluated else 0.0,
        "split": [served.get(f"smollm2-{i}", 0) for i in range(2)],
        "seconds": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Prefix-cache affinity on vs off, two llama-server replicas.")
    parser.add_argument("--families", type=int, default=4, help="distinct long system prompts")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--system-words", type=int, default=180, help="about that many words per system prompt")
    parser.add_argument("--slots", type=int, default=2, help="llama-server -np per replica")
    parser.add_argument("--context", type=int, default=8192, help="llama-server -c per replica (shared by its slots)")
    parser.add_argument("--threads", type=int, default=1, help="llama-server -t per replica")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="affinity-bench-") as tmp:
        results = [run_mode(affinity, args, Path(tmp)) for affinity in (False, True)]
    print(
        f"Affinity benchmark: 2 llama-server replicas (SmolLM2-135M Q4_1, -np {args.slots}, -t {args.threads}), "
        f"{args.conversations} conversations x {args.turns} turns over {args.families} system prompts "
        f"(~{args.system_words} words), concurrency {args.concurrency}, max_tokens {args.max_tokens}.\n"
    )
    print(
        "| affinity | requests | TTFT p50 ms | TTFT p99 ms | prompt tokens evaluated | prompt tokens from cache "
        "| cache share | requests per replica | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'on' if r['affinity'] else 'off'} | {r['requests']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
            f"| {r['prompt_tokens_evaluated']} | {r['prompt_tokens_cached']} | {r['cache_hit_share']:.0%} "
            f"| {' / '.join(map(str, r['split']))} | {r['seconds']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
