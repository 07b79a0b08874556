"""Quantization quality of SmolLM2-135M-Instruct as llama.cpp measures it (issue 13): for each
quant type, the file size and what `llama-perplexity --kl-divergence` prints against the F16
conversion over Cortex's corpus (cortex/data/kld-corpus.txt): mean KL-divergence, its 99th
percentile, PPL(Q)/PPL(F16) and same top p. The README's table is this script's output.

    .venv/bin/python benchmarks/quant_quality.py [--types Q8_0,Q6_K,...] [--json results.json]

Needs `./dev setup` (toolchain with llama-perplexity, vLLM for the converter's Python, test
model). The GGUF files are the tests' (built once in $CORTEX_CACHE/test-artifacts/), the
KL-divergence runs are cached by cortex.kld in $CORTEX_CACHE/artifacts/kld/: a second run
only reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # cache_helpers

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated quant types")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()

    from cache_helpers import smollm2_gguf_files

    from cortex import toolchain as tc
    from cortex.kld import KLD_CORPUS, measure_kld

    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    toolchain = tc.find_toolchain()
    files = smollm2_gguf_files(["F16", *types], toolchain, tc.find_vllm(), tc.find_test_model())
    started = time.monotonic()
    reports = {t: measure_kld(files["F16"], files[t], candidate_label=t, toolchain=toolchain) for t in types}
    first = next(iter(reports.values()))

    print(
        f"SmolLM2-135M-Instruct, llama.cpp {toolchain.version} `llama-perplexity`, "
        f"{time.strftime('%Y-%m-%d')}; corpus {KLD_CORPUS.name} (sha256 {first.corpus_sha256[:12]}), "
        f"{first.chunks} chunks of {first.context} tokens; PPL(F16) = {first.reference_ppl:.4f}"
    )
    print()
    print("| type | size (MB) | mean KLD | KLD p99 | PPL(Q)/PPL(F16) | same top p |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| F16 | {files['F16'].stat().st_size / 1e6:.1f} | 0 | 0 | 1 | 100 % |")
    for t, r in reports.items():
        print(
            f"| {t} | {files[t].stat().st_size / 1e6:.1f} | {r.mean_kld:.6f} | {r.kld_p99:.6f} | "
            f"{r.ppl_ratio:.6f} | {100 * r.same_top_p:.3f} % |"
        )
    print(f"\n({time.monotonic() - started:.0f} s, cached runs included)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({t: r.model_dump(mode="json") for t, r in reports.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
