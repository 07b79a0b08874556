"""The plan: engine, artifact, placement and bytes per device, decided before anything runs.

`make_plan(spec, facts, inventory)` is pure: it reads the spec, the model facts and the
hardware, runs the decision rules, and says for every device how many bytes the weights,
the KV cache and the overhead take, and whether that fits. When it does not fit it says by
how much and what would (more GPUs, a smaller quant, a shorter context).

Memory model (per device; the terms and their calibration are in cortex.memory):
- vLLM on GPUs: each worker's budget (gpu_memory_utilization x the GPU) less the weights as
  loaded, the activation peak, non-torch memory (NCCL under TP) and, from vLLM 0.21, CUDA
  graphs; what is left is the KV pool, the smallest over the workers;
- llama.cpp: tensors where llama.cpp puts them (token embedding in RAM, blocks and the output
  layer on the GPUs by -ngl and the tensor split), each block's KV cache with it, the compute
  buffer of the reserved graph, the host output buffer; plus a CUDA context per GPU;
- KV cache: 2 x layers x kv_heads x head_dim x bytes x tokens, sliding-window layers
  holding at most the window, MLA layers one latent per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cortex.decide import Decision, DecisionInput, decide, describe_fit, vllm_architectures
from cortex.facts import ModelFacts
from cortex.hardware import Inventory
from cortex.memory import (
    CUDA_CONTEXT_RESERVE,
    VllmSettings,
    llamacpp_compute_bytes,
    llamacpp_output_bytes,
    llamacpp_placement,
    vllm_kv_pool,
    vllm_profile,
    vllm_workers,
)
from cortex.quant import AUTO_LADDER, predict_gguf_bytes, weights_bytes
from cortex.spec import ModelSpec, format_bytes

GiB = 2**30
MiB = 2**20

VLLM_VERSION = "0.32.0"  # the vLLM release whose flags and architecture list Cortex targets
DEFAULT_CONTEXT_CAP = 8192  # context per request when the spec does not set one
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90  # vLLM's own default
CPU_RAM_SHARE = 0.90  # how much of the available RAM a CPU-only plan may use

# Bytes per device beyond weights and KV cache that cortex.memory does not model per term.
OVERHEAD = {
    "vllm_cpu": 512 * MiB,  # vLLM's CPU backend: torch runtime and activations (it reports no figure)
}
LLAMACPP_UBATCH = 512  # llama-server's default -ub
LLAMACPP_BATCH = 2048  # llama-server's default -b

# KV cache element sizes (bytes per element) for llama.cpp cache types.
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
VLLM_KV_BYTES = {"auto": 2.0, "bfloat16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}


class PlanError(Exception):
    """The spec cannot be planned as written; the message says what to change."""


@dataclass
class DevicePlan:
    device: str  # "cuda:0" ... or "cpu"
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int  # what the engine itself reports beyond weights and KV (cortex.actual compares it)
    capacity_bytes: int
    # memory the engine uses but reports in no buffer (llama.cpp: the CUDA context); counted in the total
    reserve_bytes: int = 0
    # the overhead's parts by name (activation, non_torch, cuda_graphs, compute, output), for display
    overhead_parts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


@dataclass
class ArtifactPlan:
    format: str  # "hf" | "gguf"
    quantization: str  # BF16 / F16 for HF checkpoints, the GGUF type otherwise
    predicted_bytes: int
    convert_from: str | None = None  # "hf" when a GGUF is made from an HF checkpoint


@dataclass
class Plan:
    engine: str
    engine_version: str
    decision: Decision
    artifact: ArtifactPlan
    devices: list[DevicePlan]
    context: int  # tokens per request
    parallel: int  # requests served at once (llama.cpp slots; vLLM: what fits in the KV pool)
    quantization: str | None = None  # the GGUF type for llama.cpp
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    ngl: int | None = None
    tensor_split: list[float] | None = None
    context_total: int | None = None  # llama.cpp -c: all slots together
    kv_cache_type: str = "f16"
    cpu_kv_cache_gib: int | None = None  # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    warnings: list[str] = field(default_factory=list)
    # extra_args the allow-list refuses, passed because the spec set unsafe_extra_args: shown loudly
    unsafe_extra_args: list[str] = field(default_factory=list)
    shortfall: str | None = None  # why it does not fit, by how much
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "engine_version": self.engine_version,
            "quantization": self.quantization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "ngl": self.ngl,
            "tensor_split": self.tensor_split,
            "context": self.context,
            "context_total": self.context_total,
            "parallel": self.parallel,
            "kv_cache_type": self.kv_cache_type,
            "cpu_kv_cache_gib": self.cpu_kv_cache_gib,
            "devices": [d.to_json() for d in self.devices],
            "fits": self.fits,
            "shortfall": self.shortfall,
            "suggestions": self.suggestions,
            "warnings": self.warnings,
            "unsafe_extra_args": self.unsafe_extra_args,
        }


# --------------------------------------------------------------------------- helpers


def request_context(spec: ModelSpec, facts: ModelFacts) -> int:
    ctx = spec.resources.context_length or min(facts.max_context, DEFAULT_CONTEXT_CAP)
    if ctx > facts.max_context:
        raise PlanError(
            f"resources.context_length {ctx} is longer than the model's maximum ({facts.max_context}); "
            f"use at most {facts.max_context}"
        )
    return ctx


def sixteen_bit_bytes(facts: ModelFacts) -> int:
    """Weights as vLLM loads them: 2 bytes a parameter, or the checkpoint's own size when pre-quantized."""
    if facts.quantized and facts.weights_bytes_on_disk:
        return facts.weights_bytes_on_disk
    return facts.params_total * 2


def _valid_tp(n: int, facts: ModelFacts) -> bool:
    return facts.n_heads % n == 0


# --------------------------------------------------------------------------- vLLM


@dataclass
class _VllmLayout:
    tp: int
    pp: int
    util: float
    devices: list[DevicePlan]
    max_sequences: int  # full-length sequences the KV pool holds


def vllm_memory_settings(spec: ModelSpec, tp: int) -> VllmSettings:
    v = spec.vllm
    return VllmSettings(
        tp=tp,
        pp=v.pipeline_parallel_size or 1,
        gpu_memory_utilization=v.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION,
        max_num_batched_tokens=v.max_num_batched_tokens,
        max_num_seqs=v.max_num_seqs,
        enforce_eager=bool(v.enforce_eager),
        dtype=v.dtype,
        quantization=v.quantization,
    )


def _vllm_kv_element_bytes(spec: ModelSpec) -> float:
    """Bytes per KV cache element for vllm.kv_cache_dtype (auto: the model's 16-bit dtype)."""
    return VLLM_KV_BYTES.get(spec.vllm.kv_cache_dtype or "auto", 2.0)


def _vllm_layout(spec: ModelSpec, facts: ModelFacts, inv: Inventory, tp: int, max_len: int) -> _VllmLayout:
    settings = vllm_memory_settings(spec, tp)
    pp, util = settings.pp, settings.gpu_memory_utilization
    per_seq = facts.kv_cache_bytes(max_len, _vllm_kv_element_bytes(spec))
    shards = tp * pp
    gpus = inv.gpus[:shards]
    profile = vllm_profile(VLLM_VERSION)
    # each GPU as vLLM's profiler sizes it; vLLM gives every worker the smallest pool
    workers = [vllm_workers(facts, g.memory_bytes, settings, profile)[i] for i, g in enumerate(gpus)]
    pool = vllm_kv_pool(workers)
    devices = [
        DevicePlan(
            f"cuda:{g.index}",
            w.weights,
            pool,
            w.overhead,
            w.budget,
            overhead_parts={"activation": w.activation, "non_torch": w.non_torch, "cuda_graphs": w.cuda_graphs},
        )
        for g, w in zip(gpus, workers)
    ]
    # the pool holds tokens for the model's layers on this GPU: per_seq / shards of them
    max_seqs = pool * shards // per_seq if per_seq and pool > 0 else 0
    # vLLM needs room for at least one full-length sequence to start.
    if max_seqs < 1:
        for d in devices:
            d.kv_cache_bytes = math.ceil(per_seq / shards)
    return _VllmLayout(tp, pp, util, devices, max_seqs)


def _plan_vllm(spec: ModelSpec, facts: ModelFacts, inv: Inventory, decision: Decision, ctx: int) -> Plan:
    v = spec.vllm
    max_len = v.max_model_len or ctx
    weights = sixteen_bit_bytes(facts)
    dtype = (
        "BF16" if facts.dtype in ("bfloat16", "auto") else "F16" if facts.dtype == "float16" else facts.dtype.upper()
    )
    artifact = ArtifactPlan(
        "hf", (facts.quantized or dtype).upper() if facts.quantized else dtype, facts.weights_bytes_on_disk or weights
    )
    if facts.source_format == "gguf":
        raise PlanError("vLLM cannot serve a GGUF source here; use engine: llamacpp or auto")

    if not inv.gpus:  # vLLM's CPU backend: weights and KV cache in RAM
        kv_need = facts.kv_cache_bytes(max_len, _vllm_kv_element_bytes(spec)) * spec.resources.concurrency
        kv_gib = max(1, math.ceil(kv_need / GiB))
        dev = DevicePlan("cpu", weights, kv_gib * GiB, OVERHEAD["vllm_cpu"], int(inv.ram_bytes * CPU_RAM_SHARE))
        plan = Plan(
            "vllm",
            VLLM_VERSION,
            decision,
            artifact,
            [dev],
            ctx,
            spec.resources.concurrency,
            tensor_parallel_size=1,
            max_model_len=max_len,
            cpu_kv_cache_gib=kv_gib,
            kv_cache_type=v.kv_cache_dtype or "auto",
        )
        plan.warnings.append("no GPU: vLLM runs on its CPU backend (slow; llama.cpp is the better CPU engine)")
        if not dev.fits:
            plan.shortfall = (
                f"needs {format_bytes(dev.total_bytes)} of RAM, {format_bytes(dev.capacity_bytes)} available"
            )
        return plan

    if v.tensor_parallel_size:
        tp = v.tensor_parallel_size
        if tp * (v.pipeline_parallel_size or 1) > len(inv.gpus):
            raise PlanError(
                f"vllm.tensor_parallel_size {tp} x pipeline {v.pipeline_parallel_size or 1} needs more GPUs than "
                f"the {len(inv.gpus)} available; lower it or add GPUs (resources.gpus)"
            )
        layout = _vllm_layout(spec, facts, inv, tp, max_len)
    else:
        pp = v.pipeline_parallel_size or 1
        candidates = [n for n in (1, 2, 4, 8, 16) if n * pp <= len(inv.gpus) and _valid_tp(n, facts)]
        if not candidates:
            raise PlanError(f"no tensor-parallel size fits {len(inv.gpus)} GPUs and {facts.n_heads} attention heads")
        layout = None
        for n in candidates:
            layout = _vllm_layout(spec, facts, inv, n, max_len)
            if layout.max_sequences >= 1 and all(d.fits for d in layout.devices):
                break
    assert layout is not None
    plan = Plan(
        "vllm",
        VLLM_VERSION,
        decision,
        artifact,
        layout.devices,
        ctx,
        parallel=min(layout.max_sequences, v.max_num_seqs or 256) if layout.max_sequences else 0,
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        gpu_memory_utilization=layout.util,
        max_model_len=max_len,
        kv_cache_type=v.kv_cache_dtype or "auto",
    )
    if layout.max_sequences < 1 or not plan.fits:
        per_gpu_need = plan.devices[0].total_bytes
        cap = plan.devices[0].capacity_bytes
        plan.shortfall = (
            f"each GPU needs {format_bytes(per_gpu_need)} (weights {format_bytes(plan.devices[0].weights_bytes)}, "
            f"one {max_len}-token sequence of KV cache, overhead) but vLLM may use {format_bytes(cap)} "
            f"({layout.util:.2f} of {format_bytes(inv.gpus[0].memory_bytes)}): short by {format_bytes(per_gpu_need - cap)}"
        )
        plan.suggestions += _vllm_suggestions(spec, facts, inv, max_len, layout)
    elif layout.max_sequences < spec.resources.concurrency:
        plan.warnings.append(
            f"the KV cache holds {layout.max_sequences} full {max_len}-token sequences at once, fewer than "
            f"resources.concurrency {spec.resources.concurrency}: longer requests will queue"
        )
    return plan


def _vllm_suggestions(
    spec: ModelSpec, facts: ModelFacts, inv: Inventory, max_len: int, layout: _VllmLayout
) -> list[str]:
    out = []
    mem = inv.gpus[0].memory_bytes
    for n in (2, 4, 8, 16):
        if n <= layout.tp or not _valid_tp(n, facts):
            continue
        more = Inventory([type(inv.gpus[0])(i, mem) for i in range(n)], inv.cpu_cores, inv.ram_bytes, "declared")
        trial = _vllm_layout(spec, facts, more, n, max_len)
        if trial.max_sequences >= 1 and all(d.fits for d in trial.devices):
            out.append(f"more GPUs: {n} x {format_bytes(mem)} with tensor_parallel_size {n}")
            break
    for length in (max_len // 2, max_len // 4, 4096, 2048):
        if 256 <= length < max_len:
            trial = _vllm_layout(spec, facts, inv, layout.tp, length)
            if trial.max_sequences >= 1 and all(d.fits for d in trial.devices):
                out.append(f"a shorter context: vllm.max_model_len {length}")
                break
    out.append("llama.cpp with a GGUF quantization (engine: llamacpp, quantization: auto picks the best that fits)")
    return out


# --------------------------------------------------------------------------- llama.cpp


def _llamacpp_weights(facts: ModelFacts, quant: str) -> int:
    if facts.source_format == "gguf":
        return facts.weights_bytes_on_disk or 0
    return weights_bytes(facts.tensors, quant, n_gqa=facts.n_gqa, n_expert=max(1, facts.n_experts))


def _llamacpp_kv(spec: ModelSpec, facts: ModelFacts, total_ctx: int, parallel: int) -> tuple[int, str]:
    lc = spec.llamacpp
    k = CACHE_TYPE_BYTES[lc.cache_type_k or "f16"]
    vb = CACHE_TYPE_BYTES[lc.cache_type_v or "f16"]
    kv = facts.kv_cache_bytes(total_ctx, (k + vb) / 2, sequences=parallel)
    kind = (
        lc.cache_type_k or "f16"
        if (lc.cache_type_k or "f16") == (lc.cache_type_v or "f16")
        else f"{lc.cache_type_k or 'f16'}/{lc.cache_type_v or 'f16'}"
    )
    return kv, kind


def _llamacpp_devices(
    spec: ModelSpec,
    facts: ModelFacts,
    inv: Inventory,
    quant: str,
    total_ctx: int,
    parallel: int,
    split: list[float] | None,
) -> tuple[list[DevicePlan], int]:
    """Per-device bytes as llama.cpp places them (cortex.memory), and the -ngl used."""
    lc = spec.llamacpp
    ngl = lc.ngl if lc.ngl is not None else (999 if inv.gpus else 0)
    k = CACHE_TYPE_BYTES[lc.cache_type_k or "f16"]
    vb = CACHE_TYPE_BYTES[lc.cache_type_v or "f16"]
    batch = min(lc.batch_size or LLAMACPP_BATCH, total_ctx)
    ubatch = min(lc.ubatch_size or LLAMACPP_UBATCH, batch)
    n_kv = -(-(total_ctx // max(1, parallel)) // 256) * 256  # cells per stream, padded as llama.cpp pads
    flash = lc.flash_attention not in ("off", False)
    output = llamacpp_output_bytes(facts, parallel)
    ram = int(inv.ram_bytes * CPU_RAM_SHARE)
    if not inv.gpus:
        kv, _ = _llamacpp_kv(spec, facts, total_ctx, parallel)
        compute = llamacpp_compute_bytes(facts, ubatch, n_kv, flash_attention=flash)
        weights = _llamacpp_weights(facts, quant)
        return [
            DevicePlan("cpu", weights, kv, compute + output, ram, overhead_parts={"compute": compute, "output": output})
        ], 0
    shares = split or [g.memory_bytes for g in inv.gpus]
    placed = llamacpp_placement(
        facts,
        quant,
        len(inv.gpus),
        shares,
        ngl,
        kv_tokens=total_ctx,
        kv_element_bytes=(k + vb) / 2,
        sequences=parallel,
    )
    gpu_compute = llamacpp_compute_bytes(facts, ubatch, n_kv, flash_attention=flash)
    logits = 4 * facts.vocab_size * parallel  # the output device's graph ends in the logits
    out_gpu = next((i for i in range(len(inv.gpus) - 1, -1, -1) if placed.layers[i + 1]), None)
    devices = []
    cpu_compute = (
        gpu_compute
        if placed.layers[0]
        else llamacpp_compute_bytes(facts, ubatch, n_kv, flash_attention=flash, host_for_gpus=True)
    )
    devices.append(
        DevicePlan(
            "cpu",
            placed.weights[0],
            placed.kv_cache[0],
            cpu_compute + output,
            ram,
            overhead_parts={"compute": cpu_compute, "output": output},
        )
    )
    for i, g in enumerate(inv.gpus):
        compute = (gpu_compute if placed.layers[i + 1] else 0) + (logits if i == out_gpu else 0)
        devices.append(
            DevicePlan(
                f"cuda:{g.index}",
                placed.weights[i + 1],
                placed.kv_cache[i + 1],
                compute,
                g.memory_bytes,
                reserve_bytes=CUDA_CONTEXT_RESERVE,
                overhead_parts={"compute": compute},
            )
        )
    return devices, ngl


def _plan_llamacpp(spec: ModelSpec, facts: ModelFacts, inv: Inventory, decision: Decision, ctx: int) -> Plan:
    lc = spec.llamacpp
    parallel = lc.parallel or spec.resources.concurrency
    total_ctx = lc.context_size or ctx * parallel
    per_slot = total_ctx // parallel
    if per_slot > facts.max_context:
        raise PlanError(
            f"llamacpp.context_size {total_ctx} over {parallel} slots gives {per_slot} tokens per slot, "
            f"more than the model's {facts.max_context}"
        )
    _, kv_kind = _llamacpp_kv(spec, facts, total_ctx, parallel)
    if lc.tensor_split and inv.gpus and len(lc.tensor_split) != len(inv.gpus):
        raise PlanError(
            f"llamacpp.tensor_split has {len(lc.tensor_split)} shares for {len(inv.gpus)} GPUs; give one share per GPU"
        )

    if facts.source_format == "gguf":
        have = facts.dtype
        if spec.quantization not in ("auto", have):
            raise PlanError(
                f"the GGUF source is already {have}; quantization must be auto or {have} "
                "(re-quantizing a quantized GGUF loses quality: start from the HF checkpoint instead)"
            )
        ladder = [have]
    elif spec.quantization != "auto":
        ladder = [spec.quantization]
    else:
        ladder = AUTO_LADDER

    chosen = None
    tried: list[tuple[str, list[DevicePlan], int]] = []
    for q in ladder:
        devices, ngl = _llamacpp_devices(spec, facts, inv, q, total_ctx, parallel, lc.tensor_split)
        tried.append((q, devices, ngl))
        if all(d.fits for d in devices):
            chosen = tried[-1]
            break
    if chosen is None:
        chosen = tried[-1]
    quant, devices, ngl = chosen
    if facts.source_format == "gguf":
        predicted = sum(_file_sizes(facts)) or (facts.weights_bytes_on_disk or 0) + (facts.metadata_bytes or 0)
        artifact = ArtifactPlan("gguf", quant, predicted)
    else:
        predicted = predict_gguf_bytes(
            facts.tensors,
            quant,
            metadata_bytes=facts.metadata_bytes or 0,
            n_gqa=facts.n_gqa,
            n_expert=max(1, facts.n_experts),
        )
        artifact = ArtifactPlan("gguf", quant, predicted, convert_from="hf")
    split = None
    if inv.gpus:
        shares = lc.tensor_split or [g.memory_bytes for g in inv.gpus]
        split = [round(x / sum(shares), 4) for x in shares]
    plan = Plan(
        "llamacpp",
        _llamacpp_version(),
        decision,
        artifact,
        devices,
        per_slot,
        parallel,
        quantization=quant,
        ngl=ngl,
        tensor_split=split,
        context_total=total_ctx,
        kv_cache_type=kv_kind,
    )
    if not plan.fits:
        worst = max(devices, key=lambda d: d.total_bytes - d.capacity_bytes)
        plan.shortfall = (
            f"{worst.device} needs {format_bytes(worst.total_bytes)} at {quant} (weights {format_bytes(worst.weights_bytes)}, "
            f"KV {format_bytes(worst.kv_cache_bytes)}, overhead {format_bytes(worst.overhead_bytes)}) "
            f"but has {format_bytes(worst.capacity_bytes)}: short by {format_bytes(worst.total_bytes - worst.capacity_bytes)}"
        )
        plan.suggestions += _llamacpp_suggestions(spec, facts, inv, quant, total_ctx, parallel)
    return plan


def _file_sizes(facts: ModelFacts) -> list[int]:
    from pathlib import Path

    sizes = []
    for f in facts.files:
        p = Path(f)
        if p.is_absolute() and p.exists():
            sizes.append(p.stat().st_size)
    return sizes


def _llamacpp_suggestions(
    spec: ModelSpec, facts: ModelFacts, inv: Inventory, quant: str, total_ctx: int, parallel: int
) -> list[str]:
    out = []

    def fits(inventory: Inventory, q: str, ctx: int) -> bool:
        devices, _ = _llamacpp_devices(spec, facts, inventory, q, ctx, parallel, None)
        return all(d.fits for d in devices)

    if facts.source_format == "hf":
        for q in AUTO_LADDER[AUTO_LADDER.index(quant) + 1 if quant in AUTO_LADDER else 0 :]:
            if fits(inv, q, total_ctx):
                out.append(f"a smaller quantization: {q}")
                break
    if inv.gpus:
        mem = inv.gpus[0].memory_bytes
        for n in (2, 4, 8, 16):
            if n <= len(inv.gpus):
                continue
            more = Inventory([type(inv.gpus[0])(i, mem) for i in range(n)], inv.cpu_cores, inv.ram_bytes, "declared")
            if fits(more, quant, total_ctx):
                out.append(f"more GPUs: {n} x {format_bytes(mem)}")
                break
    for c in (total_ctx // 2, total_ctx // 4):
        if c >= 256 * parallel and fits(inv, quant, c):
            out.append(f"a shorter context: llamacpp.context_size {c} ({c // parallel} per slot)")
            break
    if inv.gpus:
        out.append("partial offload: set llamacpp.ngl below the layer count to keep some layers in RAM (slower)")
    return out


def _llamacpp_version() -> str:
    from cortex.toolchain import TOOLCHAIN_VERSION

    return TOOLCHAIN_VERSION


# --------------------------------------------------------------------------- entry point


def fits_16bit(spec: ModelSpec, facts: ModelFacts, inv: Inventory, ctx: int) -> tuple[bool, str]:
    if facts.source_format == "gguf":
        return False, "a GGUF source has no FP16/BF16 checkpoint"
    if not inv.gpus:
        return False, f"no GPU memory on this host (0 B for {format_bytes(sixteen_bit_bytes(facts))} of 16-bit weights)"
    max_len = spec.vllm.max_model_len or ctx
    best = None
    for n in (1, 2, 4, 8, 16):
        if n > len(inv.gpus) or not _valid_tp(n, facts):
            continue
        layout = _vllm_layout(spec, facts, inv, n, max_len)
        best = layout
        if layout.max_sequences >= 1 and all(d.fits for d in layout.devices):
            d = layout.devices[0]
            return True, (
                f"16-bit weights fit with tensor parallel {n}: {format_bytes(d.weights_bytes)} per GPU, "
                f"KV pool for {layout.max_sequences} full {max_len}-token sequences"
            )
    if best is None:
        return False, "no tensor-parallel size fits the GPUs"
    d = best.devices[0]
    per_seq = facts.kv_cache_bytes(max_len, _vllm_kv_element_bytes(spec)) // (best.tp * best.pp)
    return False, describe_fit(
        d.weights_bytes * len(best.devices),
        per_seq * len(best.devices),
        d.overhead_bytes * len(best.devices),
        d.capacity_bytes * len(best.devices),
    )


def make_plan(spec: ModelSpec, facts: ModelFacts, inventory: Inventory) -> Plan:
    ctx = request_context(spec, facts)
    ok16, why16 = fits_16bit(spec, facts, inventory, ctx)
    x = DecisionInput(
        facts=facts,
        concurrency=spec.resources.concurrency,
        vllm_version=VLLM_VERSION,
        vllm_architectures=vllm_architectures(VLLM_VERSION),
        fits_16bit=ok16,
        fits_16bit_reason=why16,
    )
    decision = decide(x, pinned=spec.engine)
    if decision.engine == "vllm":
        if facts.source_format == "hf" and facts.architecture not in x.vllm_architectures:
            raise PlanError(
                f"engine vllm: {facts.architecture} is not in vLLM {VLLM_VERSION}'s model registry; "
                "use engine: auto or llamacpp"
            )
        plan = _plan_vllm(spec, facts, inventory, decision, ctx)
    else:
        plan = _plan_llamacpp(spec, facts, inventory, decision, ctx)
    settings = spec.vllm if plan.engine == "vllm" else spec.llamacpp
    if settings.unsafe_extra_args:
        from cortex.engines.extra_args import unsafe_extra_args

        plan.unsafe_extra_args = unsafe_extra_args(settings.extra_args, plan.engine)
    return plan
