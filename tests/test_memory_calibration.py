"""The memory plan held against what the engines themselves reported (cortex/data/memory/).

- vLLM: 33 startup logs of vLLM 0.19.0 on H100-80GB (llm-d-planner's public sweep: dense
  models, TP 1/2/4, PP 2/4, contexts 2K-32K, fp16/bf16/fp32, runtime fp8, fp8 KV cache). For
  each, the weights per GPU and the KV pool cortex.memory predicts for 0.19 are within 5% of
  what vLLM logged (they land within about 1%). The old constant (2.5 GiB for everything but
  weights and KV) is also measured here, to show why it had to go under TP.
- llama.cpp: loads of the pinned llama-server on CPU (measured here, the test model) and a
  public single-GPU load log of Llama 3.1 8B Q4_K_M: the plan per device (make_plan, the
  planner's entry point) against each reported buffer: weights and KV cache within 2%, the
  overhead (compute + output buffers) within 10% where the log comes from the pinned build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cortex.facts import ModelFacts, facts_from_config, gguf_facts
from cortex.hardware import Gpu, Inventory
from cortex.memory import (
    VllmSettings,
    llamacpp_layer_devices,
    vllm_kv_pool,
    vllm_profile,
    vllm_workers,
)
from cortex.plan import GiB, MiB, make_plan
from cortex.specfile import parse_spec_text

DATA = Path(__file__).resolve().parent.parent / "cortex" / "data" / "memory"
HUB = Path(__file__).resolve().parent.parent / "specs" / "hub"
VLLM = json.loads((DATA / "vllm-0.19.0-h100.json").read_text())
LLAMACPP = json.loads((DATA / "llamacpp-loads.json").read_text())


def _vllm_case(point: dict[str, Any]) -> tuple[ModelFacts, VllmSettings, int]:
    s = point["settings"]
    settings = VllmSettings(
        tp=s["tensor_parallel_size"],
        pp=s["pipeline_parallel_size"],
        gpu_memory_utilization=s["gpu_memory_utilization"],
        max_num_batched_tokens=s["max_num_batched_tokens"],
        max_num_seqs=s["max_num_seqs"],
        enforce_eager=s["enforce_eager"],
        dtype=s["dtype"],
        quantization=s["quantization"],
    )
    facts = facts_from_config(VLLM["configs"][point["config"]])
    return facts, settings, round(VLLM["gpu"]["total_memory_gib"] * GiB)


@pytest.mark.parametrize("point", VLLM["points"], ids=[p["run"] for p in VLLM["points"]])
def test_vllm_weights_and_kv_pool_within_5_percent(point: dict[str, Any]) -> None:
    facts, settings, gpu = _vllm_case(point)
    workers = vllm_workers(facts, gpu, settings, vllm_profile(VLLM["version"]))
    assert len(workers) == settings.tp * settings.pp
    reported = point["reported_gib"]
    weights = workers[0].weights / GiB
    pool = vllm_kv_pool(workers) / GiB
    assert workers[0].budget / GiB == pytest.approx(reported["requested"], abs=0.01)
    assert weights == pytest.approx(reported["weights"], rel=0.05), f"weights {weights:.2f} GiB"
    assert pool == pytest.approx(reported["kv_cache"], rel=0.05), f"KV pool {pool:.2f} GiB"


def test_the_old_constant_misses_under_tensor_parallelism() -> None:
    """What the fixed 2.5 GiB overhead predicted for the same runs: right on one GPU partly by
    luck, well off with TP (NCCL adds ~2 GiB per GPU) and small pools (72B on two GPUs)."""
    worst_new, worst_old = 0.0, 0.0
    for point in VLLM["points"]:
        facts, settings, gpu = _vllm_case(point)
        workers = vllm_workers(facts, gpu, settings, vllm_profile(VLLM["version"]))
        actual = point["reported_gib"]["kv_cache"]
        old = (workers[0].budget - workers[0].weights - 2.5 * GiB) / GiB
        worst_old = max(worst_old, abs(old - actual) / actual)
        worst_new = max(worst_new, abs(vllm_kv_pool(workers) / GiB - actual) / actual)
    assert worst_new < 0.02 < 0.05 < worst_old


def test_vllm_target_version_takes_cuda_graphs_from_the_pool() -> None:
    """vLLM 0.32 (the plan's target) subtracts its CUDA-graph estimate from the KV pool
    (default since 0.21); --enforce-eager captures none. The 0.32 plan of Llama 3.1 8B on an
    H100 is 0.19's measured pool less that estimate."""
    point = next(p for p in VLLM["points"] if p["run"] == "meta-llama-llama-3-1-8b---h100-80gb--tp1pp1dp1--4096")
    facts, settings, gpu = _vllm_case(point)
    old = vllm_kv_pool(vllm_workers(facts, gpu, settings, vllm_profile("0.19.0")))
    new_profile = vllm_profile("0.32.0")
    new = vllm_kv_pool(vllm_workers(facts, gpu, settings, new_profile))
    assert old - new == new_profile.cuda_graphs
    eager = VllmSettings(**{**settings.__dict__, "enforce_eager": True})
    assert vllm_kv_pool(vllm_workers(facts, gpu, eager, new_profile)) == old
    with pytest.raises(ValueError, match="no GPU memory profile for vLLM 0.5.0"):
        vllm_profile("0.5.0")

    # through the planner: the same model on one declared 79.19 GiB GPU at 0.95
    spec = parse_spec_text(
        "name: l\nsource:\n  repo: meta-llama/Llama-3.1-8B-Instruct\nengine: vllm\n"
        "resources: {context_length: 4096}\nvllm:\n  gpu_memory_utilization: 0.95\n",
        "l.yaml",
    )
    plan = make_plan(spec, facts, Inventory([Gpu(0, gpu)], 16, 64 * GiB, "declared"))
    [d] = plan.devices
    assert d.kv_cache_bytes == new
    assert d.kv_cache_bytes / GiB == pytest.approx(point["reported_gib"]["kv_cache"] - 0.85, rel=0.05)
    assert set(d.overhead_parts) == {"activation", "non_torch", "cuda_graphs"}


def test_max_num_batched_tokens_and_seqs_move_the_activation_peak() -> None:
    point = VLLM["points"][0]  # CodeLlama 7B: its forward pass, not the sampler, sets the peak
    facts, settings, gpu = _vllm_case(point)
    profile = vllm_profile("0.19.0")
    base = vllm_workers(facts, gpu, settings, profile)[0].activation
    more = VllmSettings(**{**settings.__dict__, "max_num_batched_tokens": 16384})
    assert vllm_workers(facts, gpu, more, profile)[0].activation == pytest.approx(2 * base, rel=0.01)
    llama, s2, _ = _vllm_case(next(p for p in VLLM["points"] if p["config"] == "meta-llama/Llama-3.1-8B-Instruct"))
    few = VllmSettings(**{**s2.__dict__, "max_num_seqs": 256})
    assert vllm_workers(llama, gpu, few, profile)[0].activation < vllm_workers(llama, gpu, s2, profile)[0].activation


# ----------------------------------------------------------------------------- llama.cpp


def test_layer_placement_follows_llama_cpp() -> None:
    """get_layer_buft_list: blocks split by upper_bound on the cumulative shares, the output
    layer (index n_layer) with the last block's GPU; -ngl counts from the top."""
    even = llamacpp_layer_devices(32, 999, [1.0, 1.0])
    assert even[:17] == [0] * 17 and even[17:] == [1] * 16  # 17 blocks, then 15 + output
    partial = llamacpp_layer_devices(32, 20, [1.0])
    assert partial[:13] == [None] * 13 and partial[13:] == [0] * 20
    assert llamacpp_layer_devices(4, 0, [1.0]) == [None] * 5


MEASURED = [x for x in LLAMACPP["loads"] if x["model"].get("gguf") == "test-model"]
PUBLIC = [x for x in LLAMACPP["loads"] if x not in MEASURED]


@pytest.mark.parametrize("load", MEASURED, ids=[x["name"] for x in MEASURED])
def test_llamacpp_plan_matches_the_pinned_server_on_cpu(load: dict[str, Any], test_model) -> None:
    """Every term of the test model's CPU loads: the overhead that used to be planned at 160 MiB
    (64 reserve + a 96 MiB logits buffer) against ~15 MiB reported."""
    _check_load(load, gguf_facts(test_model.gguf), f"gguf: {test_model.gguf}")


@pytest.mark.parametrize("load", PUBLIC, ids=[x["name"] for x in PUBLIC])
def test_llamacpp_plan_per_gpu_matches_public_load_logs(load: dict[str, Any]) -> None:
    repo = load["model"]["config"]
    [config] = (HUB / f"models--{repo.replace('/', '--')}").glob("snapshots/*/config.json")
    _check_load(load, facts_from_config(json.loads(config.read_text())), f"repo: {repo}")


def _check_load(load: dict[str, Any], facts: ModelFacts, source: str) -> None:
    settings = "\n".join(f"  {k}: {v}" for k, v in load["settings"].items())
    quant = "" if facts.source_format == "gguf" else f"quantization: {load['model']['quantization']}\n"
    spec = parse_spec_text(f"name: m\nsource:\n  {source}\nengine: llamacpp\n{quant}llamacpp:\n{settings}\n", "m.yaml")
    gpus = [Gpu(i, 80 * GiB) for i in range(load["gpus"])]
    plan = make_plan(spec, facts, Inventory(gpus, 16, 64 * GiB, "declared"))
    planned = {d.device: d for d in plan.devices}
    assert set(planned) == set(load["reported_mib"]), "the plan's devices are the ones llama.cpp used"
    for device, bufs in load["reported_mib"].items():
        d = planned[device]
        rows = {
            "weights": (d.weights_bytes, bufs.get("model", 0.0), 0.02),
            "kv_cache": (d.kv_cache_bytes, bufs.get("kv", 0.0), 0.02),
            "overhead": (d.overhead_bytes, bufs.get("compute", 0.0) + bufs.get("output", 0.0), 0.10),
        }
        for term in load["terms_checked"]:
            planned_bytes, reported_mib, tolerance = rows[term]
            assert planned_bytes / MiB == pytest.approx(reported_mib, rel=tolerance, abs=0.05), (
                f"{device} {term}: planned {planned_bytes / MiB:.2f} MiB, llama.cpp {reported_mib:.2f} MiB"
            )
