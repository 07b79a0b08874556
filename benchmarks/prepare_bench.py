"""Numbers for the prepare step (issue 3), on the real SmolLM2-135M-Instruct checkpoint.

1. Convert + quantize (F16, then Q8_0) through Cortex (`cortex.artifacts.build_gguf`: space
   check, streamed logs, gguf-reader verification, sha256, manifest, atomic rename) against
   the same two llama.cpp commands run by hand. Target: Cortex's overhead within 10%.
2. A second `prepare_model` of an unchanged spec (an HF repo served by the local Hub endpoint
   in tests/hubserver.py, token required): no download, no conversion; flow time (the flow
   run's start to end in the Prefect API) under 5 s once Prefect is up.

    .venv/bin/python benchmarks/prepare_bench.py [--rounds 3] [--json results.json]

Needs `./dev setup` (toolchain, vLLM for the converter's Python, test model). Runs against a
temporary Prefect server (prefect_test_harness) and temporary caches; touches nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # hubserver


def _fresh_cache(tmp: Path) -> Path:
    real = Path(os.environ.get("CORTEX_CACHE") or Path.home() / ".cache" / "cortex")
    cache = tmp / "cortex"
    cache.mkdir(parents=True)
    for part in ("toolchain", "engines", "models"):
        if (real / part).exists():
            os.symlink(real / part, cache / part)
    return cache


def by_hand(hf_dir: Path, work: Path) -> float:
    from cortex.toolchain import converter_command, find_toolchain, quantize_command

    toolchain = find_toolchain()
    f16, q8 = work / "hand-F16.gguf", work / "hand-Q8_0.gguf"
    started = time.perf_counter()
    subprocess.run(
        converter_command(hf_dir, f16, "f16", toolchain=toolchain),
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    subprocess.run(
        quantize_command(f16, q8, "Q8_0", toolchain=toolchain),
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seconds = time.perf_counter() - started
    f16.unlink()
    q8.unlink()
    return seconds


def through_cortex(hf_dir: Path, store_root: Path, source_id: str) -> tuple[float, float]:
    """(seconds in all, seconds the two tools ran inside it)."""
    from cortex.artifacts import ArtifactStore, build_gguf
    from cortex.toolchain import find_toolchain

    shutil.rmtree(store_root, ignore_errors=True)
    store = ArtifactStore(store_root)
    lines: list[str] = []
    started = time.perf_counter()
    built = build_gguf(
        hf_dir,
        source_id=source_id,
        quantization="Q8_0",
        toolchain=find_toolchain(),
        model_name="SmolLM2-135M-Instruct",
        architecture="llama",
        source={"kind": "bench"},
        weights_bytes=sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
        store=store,
        log=lines.append,
    )
    total = time.perf_counter() - started
    return total, sum(step["seconds"] for a in built for step in a.steps)


def bench_build(hf_dir: Path, tmp: Path, rounds: int) -> dict:
    hand, cortex, inside = [], [], []
    by_hand(hf_dir, tmp)  # warm the page cache and the converter's imports once, for both
    for i in range(rounds):  # interleaved, so drift on a shared machine hits both alike
        hand.append(by_hand(hf_dir, tmp))
        total, tools = through_cortex(hf_dir, tmp / "store", f"bench-{i}-{time.time_ns()}")
        cortex.append(total)
        inside.append(tools)
    h, c = statistics.median(hand), statistics.median(cortex)
    # The same comparison within each Cortex run (its tools' own time against the whole build),
    # which a busy shared machine cannot skew between two separate runs.
    own = [100 * (t - k) / k for t, k in zip(cortex, inside)]
    return {
        "by_hand_s": [round(x, 3) for x in hand],
        "cortex_s": [round(x, 3) for x in cortex],
        "cortex_tools_s": [round(x, 3) for x in inside],
        "median_by_hand_s": round(h, 3),
        "median_cortex_s": round(c, 3),
        "overhead_pct": round(100 * (c - h) / h, 2),
        "overhead_within_run_pct": round(statistics.median(own), 2),
        "target_pct": 10,
    }


def bench_second_prepare(hf_dir: Path, tmp: Path, rounds: int) -> dict:
    import asyncio

    import yaml
    from hubserver import HubRepo, HubServer
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    token = "hf_benchToken" + os.urandom(8).hex()
    repo = HubRepo.from_folder("bench/smollm2", hf_dir)
    spec = tmp / "bench-smollm2.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "bench-smollm2",
                "source": {"repo": "bench/smollm2"},
                "quantization": "Q8_0",
                "resources": {"concurrency": 2, "context_length": 2048},
            }
        )
    )
    with HubServer([repo], token=token) as server, prefect_test_harness(server_startup_timeout=180):
        os.environ.update(HF_ENDPOINT=server.url, HF_TOKEN=token, HF_HUB_CACHE=str(tmp / "hf"))
        from flows.prepare import prepare_model

        started = time.perf_counter()
        first = prepare_model(str(spec))
        cold = time.perf_counter() - started
        walls = []
        for _ in range(rounds):
            started = time.perf_counter()
            again = prepare_model(str(spec))
            walls.append(time.perf_counter() - started)
            assert again.cached and again.downloaded_bytes == 0 and not again.built

        async def flow_times() -> list[float]:
            async with get_client() as client:
                runs = await client.read_flow_runs()
                return [
                    (r.end_time - r.start_time).total_seconds()
                    for r in sorted(runs, key=lambda r: r.start_time)
                    if r.end_time and r.start_time
                ]

        times = asyncio.run(flow_times())
    return {
        "cold_prepare_s": round(cold, 2),
        "cold_built": first.built,
        "cold_downloaded_bytes": first.downloaded_bytes,
        "warm_wall_s": [round(w, 3) for w in walls],
        "warm_flow_run_s": [round(t, 3) for t in times[1:]],
        "cold_flow_run_s": round(times[0], 3),
        "target_s": 5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from cortex.toolchain import find_test_model

    hf_dir = Path(find_test_model().hf_dir)
    with tempfile.TemporaryDirectory(prefix="cortex-prepare-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["CORTEX_CACHE"] = str(_fresh_cache(tmp))
        results = {
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
            "convert_quantize": bench_build(hf_dir, tmp, args.rounds),
            "second_prepare": bench_second_prepare(hf_dir, tmp, args.rounds),
        }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
