"""Memory as each engine places it: the terms behind the plan's bytes per device.

vLLM (per GPU worker), as vLLM's own profiler counts it at start (v1 `gpu_worker.py`
`determine_available_memory`): the KV pool is the budget (`gpu_memory_utilization` x the
GPU's memory) less the weights as loaded, the activation peak of the profiling run, the
non-torch memory that run added (NCCL and custom all-reduce buffers under tensor
parallelism), and, from vLLM 0.21 on, its CUDA-graph estimate. The CUDA context predates
the profile and sits outside the budget. Each term's constants are fitted to vLLM's own
startup logs (`cortex/data/memory/vllm-*.json`, with their source) and keyed by version in
VLLM_PROFILES:
- activation peak = max(forward, sampler): the forward pass over `max_num_batched_tokens`
  (FFN intermediates), or the sampler's dummy run over `max_num_seqs` rows of fp32 logits and
  its working copies (dominant for vocabularies of 100K+);
- non-torch = a small constant on one GPU, ~2.1 GiB per GPU under tensor parallelism;
- weights = 16-bit (or fp32) bytes a parameter, split by TP and by pipeline stage
  (embeddings on the first stage, the LM head on the last); runtime fp8 keeps embeddings and
  the head at 16 bits; pre-quantized checkpoints load at their file size (MXFP4 ~7% above it).

llama.cpp (per device), as `llama_model::load_tensors` in src/llama-model.cpp places tensors:
the input layer (token embedding) always stays on the CPU; with -ngl N the last N of the
n_layer + 1 "layers" (the repeating blocks, then the output layer) go to the GPUs, split by the
cumulative tensor-split shares (`upper_bound(splits, il / act_gpu_layers)`); a tied output
(no `output.weight`) is a copy of the token embedding on the output layer's device. Each
block's KV cache lives with the block. Compute buffers are fitted to the pinned
llama-server's logs (`cortex/data/memory/llamacpp-*.json`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType

from cortex.facts import ModelFacts
from cortex.quant import assign_types, tensor_bytes

GiB = 2**30
MiB = 2**20

# --------------------------------------------------------------------------- vLLM


@dataclass(frozen=True)
class VllmMemoryProfile:
    """How one vLLM version accounts GPU memory at start; the constants are fitted to the
    calibration data named in `calibrated_on` (cortex/data/memory/)."""

    version: str
    calibrated_on: str  # the vLLM version whose measured startup logs fitted these constants
    cudagraphs_in_budget: bool  # the CUDA-graph estimate is taken from the KV pool (vLLM >= 0.21)
    sampler_bytes_per_seq_vocab: float = 14.0  # fp32 logits + the sampler's copies, per (seq, vocab)
    sampler_bytes_per_token_hidden: float = 6.0  # hidden states held while sampling
    forward_bytes_per_token_intermediate: float = 7.0  # gate/up/act intermediates (sharded by TP)
    forward_bytes_per_token_hidden: float = 6.0
    non_torch_one_gpu: int = round(0.25 * GiB)
    non_torch_pipeline: int = round(0.07 * GiB)  # TP 1, PP > 1
    non_torch_tp_base: int = round(1.99 * GiB)  # TP > 1: NCCL + custom all-reduce buffers
    non_torch_tp_per_rank: int = round(0.045 * GiB)
    cuda_graphs: int = round(0.85 * GiB)  # vLLM's own estimate, median over the calibration runs
    mxfp4_load_factor: float = 1.07  # MXFP4 checkpoints load 5-10% above their file size


_V019 = VllmMemoryProfile("0.19.0", calibrated_on="0.19.0", cudagraphs_in_budget=False)
VLLM_PROFILES: dict[str, VllmMemoryProfile] = {
    "0.19.0": _V019,
    # 0.32's gpu_worker.py subtracts its CUDA-graph estimate from the KV pool
    # (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS defaults to 1 "since v0.21.0"); no 0.32 GPU
    # startup logs are at hand, so the other terms keep 0.19's measured constants.
    "0.32.0": replace(_V019, version="0.32.0", cudagraphs_in_budget=True),
}


def vllm_profile(version: str) -> VllmMemoryProfile:
    try:
        return VLLM_PROFILES[version]
    except KeyError:
        raise ValueError(
            f"no GPU memory profile for vLLM {version} (have {', '.join(VLLM_PROFILES)}); "
            "add one to cortex/memory.py VLLM_PROFILES with its calibration data"
        ) from None


def vllm_scheduler_defaults(gpu_memory_bytes: int) -> tuple[int, int]:
    """vLLM's own (max_num_batched_tokens, max_num_seqs) for its OpenAI server, by GPU size
    (engine/arg_utils.py: H100/H200-class 8192 and 1024, B200-class 16384, others 2048 and 256)."""
    if gpu_memory_bytes >= 160 * GiB:
        return 16384, 1024
    if gpu_memory_bytes >= 70 * GiB:
        return 8192, 1024
    return 2048, 256


@dataclass(frozen=True)
class VllmSettings:
    """The settings that move vLLM's memory terms."""

    tp: int = 1
    pp: int = 1
    gpu_memory_utilization: float = 0.90
    max_num_batched_tokens: int | None = None  # None: vLLM's default for the GPU
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    dtype: str | None = None  # auto / bfloat16 / float16 / float32
    quantization: str | None = None  # runtime quantization (fp8, ...)


@dataclass(frozen=True)
class VllmWorkerMemory:
    """One GPU worker's terms, in bytes."""

    stage: int  # pipeline stage
    budget: int  # gpu_memory_utilization x the GPU
    weights: int
    activation: int
    non_torch: int
    cuda_graphs: int  # taken from the KV pool (0 where the version does not, or enforce_eager)

    @property
    def overhead(self) -> int:
        return self.activation + self.non_torch + self.cuda_graphs

    @property
    def kv_pool(self) -> int:
        return max(0, self.budget - self.weights - self.overhead)


def _weight_bytes_per_param(facts: ModelFacts, s: VllmSettings) -> float:
    dtype = (s.dtype or "auto").lower()
    if dtype in ("float32", "float"):
        return 4.0
    if dtype == "auto" and facts.dtype in ("float32",):
        return 4.0
    return 2.0


def _embedding_params(facts: ModelFacts) -> tuple[int, int]:
    """(input embedding, LM head) parameters; a tied head still has its own rows on the last stage."""
    emb = facts.vocab_size * facts.hidden_size
    return emb, emb


def vllm_stage_weights(facts: ModelFacts, s: VllmSettings, profile: VllmMemoryProfile) -> list[int]:
    """Weights per GPU of each pipeline stage (TP splits every stage evenly)."""
    if facts.quantized and facts.weights_bytes_on_disk:
        factor = profile.mxfp4_load_factor if facts.quantized == "mxfp4" else 1.0
        total = facts.weights_bytes_on_disk * factor
        return [math.ceil(total / (s.tp * s.pp))] * s.pp
    bpp = _weight_bytes_per_param(facts, s)
    emb, head = _embedding_params(facts)
    body = max(0, facts.params_total - emb - (0 if facts.tie_embeddings else head))
    body_bytes = body * (1.0 if (s.quantization or "").startswith("fp8") else bpp)
    if s.pp == 1:
        total = body_bytes + emb * bpp + (head * bpp if facts.tie_embeddings is False else 0)
        return [math.ceil(total / s.tp)]
    # vLLM's get_pp_indices: layers split evenly, the remainder to the later stages
    per, extra = divmod(facts.n_layers, s.pp)
    out = []
    for stage in range(s.pp):
        layers = per + (1 if stage >= s.pp - extra else 0)
        b = body_bytes * layers / facts.n_layers
        if stage == 0:
            b += emb * bpp
        if stage == s.pp - 1:
            b += head * bpp
        out.append(math.ceil(b / s.tp))
    return out


def vllm_activation(
    facts: ModelFacts, s: VllmSettings, profile: VllmMemoryProfile, gpu_memory_bytes: int, *, last_stage: bool = True
) -> int:
    tokens_default, seqs_default = vllm_scheduler_defaults(gpu_memory_bytes)
    tokens = s.max_num_batched_tokens or tokens_default
    seqs = s.max_num_seqs or seqs_default
    inter = facts.intermediate_size or 4 * facts.hidden_size
    if facts.is_moe:  # the routed experts' intermediates, for the active experts
        inter = max(inter, (facts.intermediate_size or 0) * max(1, facts.n_experts_active))
    forward = tokens * (
        profile.forward_bytes_per_token_intermediate * inter / s.tp
        + profile.forward_bytes_per_token_hidden * facts.hidden_size
    )
    sampler = 0.0
    if last_stage:
        sampler = (
            profile.sampler_bytes_per_seq_vocab * seqs * facts.vocab_size
            + profile.sampler_bytes_per_token_hidden * tokens * facts.hidden_size
        )
    return math.ceil(max(forward, sampler))


def vllm_non_torch(s: VllmSettings, profile: VllmMemoryProfile) -> int:
    if s.tp > 1:
        return profile.non_torch_tp_base + profile.non_torch_tp_per_rank * s.tp
    if s.pp > 1:
        return profile.non_torch_pipeline
    return profile.non_torch_one_gpu


def vllm_workers(
    facts: ModelFacts, gpu_memory_bytes: int, s: VllmSettings, profile: VllmMemoryProfile
) -> list[VllmWorkerMemory]:
    """One entry per GPU (TP ranks of each stage in order), as vLLM's profiler would size it.
    vLLM gives every worker the smallest pool of them all; `vllm_kv_pool` says which."""
    budget = int(gpu_memory_bytes * s.gpu_memory_utilization)
    weights = vllm_stage_weights(facts, s, profile)
    graphs = profile.cuda_graphs if profile.cudagraphs_in_budget and not s.enforce_eager else 0
    out = []
    for stage in range(s.pp):
        act = vllm_activation(facts, s, profile, gpu_memory_bytes, last_stage=stage == s.pp - 1)
        for _ in range(s.tp):
            out.append(VllmWorkerMemory(stage, budget, weights[stage], act, vllm_non_torch(s, profile), graphs))
    return out


def vllm_kv_pool(workers: list[VllmWorkerMemory]) -> int:
    """The KV pool every worker gets: vLLM takes the smallest across workers."""
    return min(w.kv_pool for w in workers) if workers else 0


# --------------------------------------------------------------------------- llama.cpp

_BLOCK = re.compile(r"blk\.(\d+)\.")
_OUTPUT_TENSORS = ("output.", "output_norm.", "cls.", "cls_out.")
CUDA_CONTEXT_RESERVE = 512 * MiB  # CUDA context + cuBLAS workspace per GPU: not in llama.cpp's buffers


def llamacpp_tensor_bytes(facts: ModelFacts, quant: str) -> dict[str, int]:
    """Bytes of each tensor as llama.cpp holds it: the GGUF's own types for a GGUF source,
    llama-quantize's per-tensor choice for a GGUF Cortex makes."""
    if facts.tensor_types:
        return {
            t.name: tensor_bytes(GGMLQuantizationType(facts.tensor_types[t.name]), t.elements)
            for t in facts.tensors
            if t.name in facts.tensor_types
        }
    types = assign_types(facts.tensors, quant, n_gqa=facts.n_gqa, n_expert=max(1, facts.n_experts))
    return {t.name: tensor_bytes(types[t.name], t.elements) for t in facts.tensors}


def llamacpp_layer_devices(n_layer: int, ngl: int, shares: list[float]) -> list[int | None]:
    """The device of each of llama.cpp's n_layer + 1 layers (the blocks, then the output layer):
    a GPU index, or None for the CPU. Mirrors `get_layer_buft_list` in src/llama-model.cpp."""
    n_gpus = len(shares)
    if n_gpus == 0:
        return [None] * (n_layer + 1)
    total = sum(shares)
    splits, acc = [], 0.0
    for x in shares:
        acc += x
        splits.append(acc / total)
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act_gpu_layers = min(ngl, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or (il - i_gpu_start) >= act_gpu_layers:
            out.append(None)
            continue
        x = float(il - i_gpu_start) / act_gpu_layers
        out.append(min(n_gpus - 1, sum(1 for sp in splits if sp <= x)))  # std::upper_bound
    return out


@dataclass(frozen=True)
class LlamacppPlacement:
    """Bytes per device, index 0 the CPU (host RAM), then one per GPU."""

    weights: list[int]
    kv_cache: list[int]
    layers: list[int]  # blocks per device (the output layer not counted)


def llamacpp_placement(
    facts: ModelFacts,
    quant: str,
    n_gpus: int,
    shares: list[float],
    ngl: int,
    *,
    kv_tokens: int,
    kv_element_bytes: float,
    sequences: int = 1,
    kv_offload: bool = True,
) -> LlamacppPlacement:
    """Weights and KV cache per device for -ngl `ngl` and the tensor-split `shares`."""
    sizes = llamacpp_tensor_bytes(facts, quant)
    devs = llamacpp_layer_devices(facts.n_layers, ngl, shares if n_gpus else [])
    weights = [0] * (n_gpus + 1)
    layers = [0] * (n_gpus + 1)

    def slot(dev: int | None) -> int:
        return 0 if dev is None else dev + 1

    for d in devs[:-1]:
        layers[slot(d)] += 1
    out_slot = slot(devs[-1])
    for name, size in sizes.items():
        m = _BLOCK.match(name)
        if m:
            weights[slot(devs[min(int(m.group(1)), facts.n_layers - 1)])] += size
        elif name.startswith(_OUTPUT_TENSORS):
            weights[out_slot] += size
        elif name.startswith("rope_freqs"):
            weights[slot(devs[0])] += size  # created with layer 0, duplicated (no copy) for the others
        else:  # token_embd and the input layer's other tensors
            weights[0] += size
    if "output.weight" not in sizes and "token_embd.weight" in sizes and out_slot != 0:
        weights[out_slot] += sizes["token_embd.weight"]  # tied head: a copy on the output device
    kv = [0] * (n_gpus + 1)
    per_layer = _kv_per_layer(facts, kv_tokens, kv_element_bytes, sequences)
    for il, d in enumerate(devs[:-1]):
        kv[slot(d) if kv_offload else 0] += per_layer[il]
    return LlamacppPlacement(weights, kv, layers)


def _kv_per_layer(facts: ModelFacts, tokens: int, element_bytes: float, sequences: int) -> list[int]:
    """Each block's KV cache (facts.kv_cache_bytes, block by block): sliding-window blocks,
    spread evenly over the depth, hold at most the window per sequence."""
    n = facts.n_layers
    per = facts.kv_bytes_per_token_layer(element_bytes)
    sliding = {(i * n) // facts.sliding_layers for i in range(facts.sliding_layers)} if facts.sliding_layers else set()
    window_cells = min(tokens, (facts.sliding_window or tokens) * max(1, sequences))
    return [int((window_cells if i in sliding else tokens) * per) for i in range(n)]


@dataclass(frozen=True)
class LlamacppComputeModel:
    """Compute and output buffers of the pinned llama-server, fitted to its logs
    (cortex/data/memory/llamacpp-*.json)."""

    bytes_per_token_intermediate: float = 12.0  # f32 FFN intermediates per ubatch token
    bytes_per_token_hidden: float = 16.0  # f32 hidden states / residuals per ubatch token
    mask_bytes: float = 2.0  # the f16 KQ mask: n_kv x n_ubatch
    host_bytes_per_token_hidden: float = 12.0  # with GPUs: the CPU's share (embeddings read on the CPU)


LLAMACPP_COMPUTE = LlamacppComputeModel()


def llamacpp_compute_bytes(
    facts: ModelFacts, ubatch: int, n_kv: int, *, flash_attention: bool = True, host_for_gpus: bool = False
) -> int:
    """One device's compute buffer: the worst-case graph llama.cpp reserves for a ubatch of
    `ubatch` tokens against `n_kv` cache cells (per stream). `host_for_gpus`: the CPU's small
    buffer when the blocks run on GPUs."""
    m = LLAMACPP_COMPUTE
    if host_for_gpus:
        return math.ceil(m.host_bytes_per_token_hidden * ubatch * facts.hidden_size)
    inter = facts.intermediate_size or 4 * facts.hidden_size
    per_token = m.bytes_per_token_intermediate * inter + m.bytes_per_token_hidden * facts.hidden_size
    if flash_attention:
        return math.ceil(ubatch * per_token + m.mask_bytes * ubatch * n_kv)
    # without flash attention the f32 KQ matrix of every head (and its mask) dominates; the
    # allocator reuses half the FFN's room for it
    return math.ceil(ubatch * n_kv * (4 * facts.n_heads + 2 * m.mask_bytes) + ubatch * per_token / 2)


def llamacpp_output_bytes(facts: ModelFacts, n_seq: int) -> int:
    """The host output buffer: one row of fp32 logits per sequence."""
    return 4 * facts.vocab_size * max(1, n_seq)
