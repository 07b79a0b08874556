"""Does Cortex's benchmark measure what `vllm bench serve` measures?

Runs vLLM's own serving benchmark (`vllm.benchmarks.serve`: `add_cli_args` + `main`, in the
vLLM virtualenv, because the `vllm` command of the CPU build breaks on its version lookup)
and `cortex.bench` against one llama-server serving SmolLM2, with the same load: the same
concurrency, request count, prompt and output lengths, greedy, ignore_eos, closed loop.

Both tools alternate, round after round (vLLM first in odd rounds, Cortex first in even
ones), so drift of a shared machine hits both alike. The script prints, per concurrency level,
the median over rounds of each tool, their difference, the paired difference (median over
rounds of Cortex/vLLM - 1 within a round, which cancels drift between rounds; the gated
number), and the noise floor: how far a tool's rounds stray from their median. Agreement
within the noise floor is all a measurement on a busy machine can show.

    .venv/bin/python benchmarks/fidelity.py [--concurrency 1,4] [--requests 32]
        [--input-len 128] [--output-len 64] [--rounds 3] [--gguf PATH] [--json OUT]

Exit status 0 when output token throughput and median TTFT agree within --tolerance (10%,
paired) at every level, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cortex import toolchain as tc  # noqa: E402
from cortex.bench import BenchmarkSettings, benchmark  # noqa: E402

# Runs under the vLLM virtualenv's python: one process, many runs, so torch is imported once.
VLLM_WORKER = r"""
import contextlib, json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
add_cli_args(parser)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    args = parser.parse_args(json.loads(line))
    with contextlib.redirect_stdout(sys.stderr):
        result = main(args)
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None}),
          flush=True)
"""

# (label, key in vLLM's result, how to read it from a Cortex level)
METRICS = [
    ("output tok/s", "output_throughput", lambda lv: lv.output_tokens_per_s),
    ("requests/s", "request_throughput", lambda lv: lv.requests_per_s),
    ("TTFT p50 ms", "median_ttft_ms", lambda lv: lv.ttft_ms.p50),
    ("TTFT mean ms", "mean_ttft_ms", lambda lv: lv.ttft_ms.mean),
    ("TPOT p50 ms", "median_tpot_ms", lambda lv: lv.tpot_ms.p50),
    ("ITL p50 ms", "median_itl_ms", lambda lv: lv.itl_ms.p50),
    ("E2EL p50 ms", "median_e2el_ms", lambda lv: lv.e2el_ms.p50),
    ("output tokens", "total_output_tokens", lambda lv: lv.total_output_tokens),
]
GATED = ("output tok/s", "TTFT p50 ms")


def start_llama_server(
    server: Path, gguf: Path, port: int, slots: int, ctx: int, threads: int, log: Path
) -> subprocess.Popen:
    cmd = [
        str(server),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(ctx),
        "-t",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError as exc:
            last = exc  # not listening yet: asked again until the deadline
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"llama-server not healthy after 180 s (last: {last!r}); see {log}")


class VllmBench:
    """vLLM's benchmark in a long-lived worker process of the vLLM virtualenv."""

    def __init__(self, python: Path, log: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [str(python), "-c", VLLM_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        self.log = log
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM benchmark worker died; see {self.log}")
        return json.loads(line)

    def run(self, argv: list[str]) -> dict:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def vllm_argv(base_url: str, model: str, tokenizer: Path, conc: int, args: argparse.Namespace, seed: int) -> list[str]:
    return [
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.requests),
        "--max-concurrency",
        str(conc),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(seed),
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
    ]


def rel(a: float, b: float) -> float:
    return (b - a) / a if a else float("nan")


def spread(values: list[float]) -> float:
    """Largest relative distance of one round from the median of its tool's rounds."""
    med = statistics.median(values)
    return max(abs(v - med) / med for v in values) if med else float("nan")


# --- a control: a server with known timing ------------------------------------------------
#
# On a busy shared CPU, llama-server's own speed swings by tens of percent between runs, which
# hides any difference between the two clients. The control server answers like llama-server
# (SSE, `usage` beside `choices` in the last message) with timing set by sleeps: prefill
# `prefill_ms` per request (not per token: vLLM sends text, Cortex token ids, and the control
# server has no tokenizer to count them alike), then one token every `token_ms`, both stretched by
# `slowdown` per other request in flight (a crude continuous batch). Differences the two tools
# report against it come from the clients alone.


def serve_control(port: int, prefill_ms: float, token_ms: float, slowdown: float) -> None:
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    active = [0]

    def stretch() -> float:
        return 1.0 + slowdown * max(active[0] - 1, 0)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "smollm2", "object": "model"}]})

    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else max(1, len(str(prompt).split()))
        n = int(body.get("max_tokens") or 16)

        async def events():
            active[0] += 1
            try:
                await asyncio.sleep(prefill_ms / 1000 * stretch())
                for i in range(n):
                    if i:
                        await asyncio.sleep(token_ms / 1000 * stretch())
                    msg = {
                        "choices": [
                            {
                                "text": " the",
                                "index": 0,
                                "logprobs": None,
                                "finish_reason": "length" if i == n - 1 else None,
                            }
                        ],
                        "object": "text_completion",
                        "model": "smollm2",
                    }
                    if i == n - 1:
                        msg["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
                    yield f"data: {json.dumps(msg)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                active[0] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", lambda r: JSONResponse({"status": "ok"})),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_control(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--serve-control",
        str(port),
        "--prefill-ms",
        str(args.prefill_ms),
        "--token-ms",
        str(args.token_ms),
        "--slowdown",
        str(args.slowdown),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError as exc:
            last = exc  # not listening yet: asked again until the deadline
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"control server not up after 60 s (last: {last!r}); see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the SmolLM2 Q4_1 test model")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama-server threads (default 1: on a shared, oversubscribed CPU one thread is "
        "several times faster and far steadier than two, whose barriers wait on each other)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all runs and the summary here")
    parser.add_argument(
        "--server",
        choices=["llama", "control"],
        default="llama",
        help="llama: a real llama-server (default); control: a server with known timing, "
        "so that only the clients can differ",
    )
    parser.add_argument("--prefill-ms", type=float, default=250.0, help="control server: prefill per request")
    parser.add_argument("--token-ms", type=float, default=20.0, help="control server: per output token")
    parser.add_argument(
        "--slowdown", type=float, default=0.25, help="control server: stretch per other request in flight"
    )
    parser.add_argument("--serve-control", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_control is not None:
        serve_control(args.serve_control, args.prefill_ms, args.token_ms, args.slowdown)
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]

    try:
        toolchain, vllm, model = tc.find_toolchain(), tc.find_vllm(), tc.find_test_model()
    except tc.ToolchainMissing as missing:
        print(f"fidelity: {missing}", file=sys.stderr)
        return 2
    gguf = args.gguf or model.gguf
    logs = Path(tempfile.mkdtemp(prefix="cortex-fidelity-"))
    port = 18000 + int(time.time()) % 1000
    base_url = f"http://127.0.0.1:{port}"
    slots = max(levels)
    ctx = slots * (args.input_len + args.output_len + 64)
    load = f"{args.requests} requests of {args.input_len} in / {args.output_len} out tokens per run"
    if args.server == "control":
        print(
            f"control server (prefill {args.prefill_ms:g} ms, {args.token_ms:g} ms/token, slowdown "
            f"{args.slowdown:g} per other request); vLLM {vllm.version}; {load}; logs in {logs}"
        )
        server = start_control(port, args, logs / "control-server.log")
    else:
        print(
            f"llama-server {toolchain.version} on {gguf.name}, {slots} slots, {args.threads} thread(s); "
            f"vLLM {vllm.version}; {load}; logs in {logs}"
        )
        server = start_llama_server(
            toolchain.llama_server, gguf, port, slots, ctx, args.threads, logs / "llama-server.log"
        )
    runs: list[dict] = []
    try:
        vbench = VllmBench(vllm.python, logs / "vllm-bench.log")
        try:
            for rnd in range(args.rounds):
                for conc in levels:
                    seed = 100 * rnd + conc  # fresh prompts every run: no prompt-cache hits
                    order = ["vllm", "cortex"] if rnd % 2 == 0 else ["cortex", "vllm"]
                    for tool in order:
                        if tool == "vllm":
                            res = vbench.run(vllm_argv(base_url, "smollm2", model.hf_dir, conc, args, seed))
                            values = {label: res.get(key) for label, key, _ in METRICS}
                            failed = res.get("failed", 0)
                        else:
                            settings = BenchmarkSettings(
                                concurrency=[conc],
                                requests=args.requests,
                                input_len=args.input_len,
                                output_len=args.output_len,
                                seed=seed + 7,
                            )
                            lv = benchmark(base_url, settings, model="smollm2").levels[0]
                            values = {label: read(lv) for label, _, read in METRICS}
                            failed = lv.errors
                        runs.append({"round": rnd, "concurrency": conc, "tool": tool, "failed": failed, **values})
                        print(
                            f"  round {rnd + 1} c={conc} {tool:6s}: {values['output tok/s']:.1f} out tok/s, "
                            f"TTFT p50 {values['TTFT p50 ms']:.1f} ms, failed {failed}",
                            flush=True,
                        )
        finally:
            vbench.close()
    finally:
        server.terminate()
        server.wait(timeout=15)

    ok = True
    summary = []
    for conc in levels:
        print(f"\nconcurrency {conc}: median of {args.rounds} rounds")
        print(
            f"  {'metric':14s} {'vLLM':>10s} {'Cortex':>10s} {'diff':>8s} {'paired':>8s}   "
            f"{'vLLM noise':>10s} {'Cortex noise':>12s}"
        )
        for label, _, _ in METRICS:
            v = [r[label] for r in runs if r["concurrency"] == conc and r["tool"] == "vllm"]
            c = [r[label] for r in runs if r["concurrency"] == conc and r["tool"] == "cortex"]
            mv, mc = statistics.median(v), statistics.median(c)
            d = rel(mv, mc)
            # the same round's two runs side by side, so drift between rounds cancels out
            paired = statistics.median(rel(a, b) for a, b in zip(v, c))
            gated = label in GATED
            passed = abs(paired) <= args.tolerance
            if gated and not passed:
                ok = False
            summary.append(
                {
                    "concurrency": conc,
                    "metric": label,
                    "vllm": mv,
                    "cortex": mc,
                    "diff": d,
                    "paired_diff": paired,
                    "vllm_noise": spread(v),
                    "cortex_noise": spread(c),
                    "gated": gated,
                    "passed": passed if gated else None,
                }
            )
            mark = ("ok" if passed else "OVER") if gated else ""
            print(
                f"  {label:14s} {mv:10.2f} {mc:10.2f} {d:+8.1%} {paired:+8.1%}   "
                f"{spread(v):10.1%} {spread(c):12.1%}  {mark}"
            )
    print(
        f"\n{'PASS' if ok else 'FAIL'}: output tok/s and TTFT p50 within {args.tolerance:.0%} at concurrency {levels}"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "passed": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
