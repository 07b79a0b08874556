"""Model facts: what a model is, read from its config.json or its GGUF header.

`ModelFacts` is everything the decision rules and the memory planner need: architecture,
parameter counts (total and active for MoE), attention shape (GQA, sliding window, MLA),
context, dtype, tied embeddings, and the tensor list in GGUF naming so sizes can be
predicted per tensor. Sources:

- a local HF folder: config.json alone is enough; safetensors headers or the index, when
  present, give the exact parameter count;
- a GGUF file: its metadata through the `gguf` reader (split sets read as one model);
- an HF repo: the Hub cache first (the HF cache, or a `hub/` folder beside the spec laid out
  the same way), else the Hub API for config.json and safetensors metadata, no weights.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cortex.fileio import UnreadableFile, atomic_write_bytes, read_regular_file
from cortex.gguf_header import GgufHeader
from cortex.quant import FILE_TYPE_NAMES, TensorInfo


class FactsError(Exception):
    """The model could not be inspected; the message says what is missing and what to do."""


class ModelFileError(FactsError):
    """A model file is missing, not a regular file, too large, or malformed (config.json,
    tokenizer.json, a safetensors or GGUF header): bad input, as an invalid spec is."""


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}
SPLIT_RE = re.compile(r"(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf\Z", re.ASCII)

# What the readers accept. A file past these is corrupt or hostile, and says so; the bounds are
# far above real models (Llama 3.1 405B: 126 layers, 16384 hidden, 128 heads, 128k vocab).
MAX_CONFIG_BYTES = 16 << 20  # config.json, model.safetensors.index.json
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json (large vocabularies are tens of MiB)
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit
MAX_GGUF_HEADER = 256 << 20  # metadata + tensor table (tokenizer included); the Hub fetch stops there too
LIMITS = {  # field: (lowest, highest)
    "layers": (1, 4096),
    "hidden": (1, 1 << 20),
    "heads": (1, 1 << 14),
    "head_dim": (1, 1 << 16),
    "ffn": (1, 1 << 24),
    "vocab": (1, 1 << 24),
    "context": (1, 1 << 31),
    "experts": (0, 1 << 12),
    "rank": (0, 1 << 16),
    "window": (0, 1 << 31),
    "bytes": (1, 1 << 50),
}


def _whole(value: Any, what: str, limit: str) -> int:
    """`value` as an int within LIMITS[limit], or a FactsError naming `what`."""
    lo, hi = LIMITS[limit]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise ModelFileError(f"{what} is {_short(value)}, not a whole number")
    v = int(value)
    if not lo <= v <= hi:
        raise ModelFileError(f"{what} is {v:,}; a model has {lo:,} to {hi:,}, so the file is corrupt")
    return v


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:55] + "...'"


def _read(path: Path, what: str, limit: int, *, whole: bool = True) -> bytes:
    try:
        return read_regular_file(path, limit=limit, whole=whole)
    except UnreadableFile as e:
        raise ModelFileError(f"{path}: cannot read {what}: {e}") from None


def read_json(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object from a regular file of at most `limit` bytes, or a FactsError naming the file."""
    try:
        data = json.loads(_read(path, what, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:  # json nests by recursion: '[[[[...' thousands deep
        raise ModelFileError(f"{path}: {what} is nested too deeply to be JSON Cortex reads") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: {what} holds a JSON {type(data).__name__}, not an object")
    return data


@dataclass
class ModelFacts:
    architecture: str  # HF class name (LlamaForCausalLM) or GGUF general.architecture (llama)
    model_type: str  # HF model_type or GGUF architecture
    source_format: str  # "hf" | "gguf"
    params_total: int
    params_active: int
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: str  # bfloat16 / float16 / ... for HF; the GGUF file type name (Q8_0, ...) for GGUF
    tie_embeddings: bool = False
    intermediate_size: int | None = None
    n_experts: int = 0  # 0 = dense
    n_experts_active: int = 0
    sliding_window: int | None = None
    sliding_layers: int = 0  # how many layers use the sliding window
    mla_kv_lora_rank: int | None = None  # MLA: one latent of this size (+ rope dims) per token
    mla_rope_dim: int = 0
    quantized: str | None = None  # a pre-quantized checkpoint's method (mxfp4, awq, fp8, ...)
    weights_bytes_on_disk: int | None = None  # sum of the weight files, when known
    metadata_bytes: int | None = None  # GGUF: header + metadata; HF: estimated for conversion
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)
    # GGUF source: each tensor's ggml type (GGMLQuantizationType value) by name, for placement per device
    tensor_types: dict[str, int] = field(default_factory=dict, repr=False)
    files: list[str] = field(default_factory=list)  # weight files (GGUF: the split set, in order)
    notes: list[str] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def n_gqa(self) -> int:
        return max(1, self.n_heads // max(1, self.n_kv_heads))

    @property
    def is_mla(self) -> bool:
        return self.mla_kv_lora_rank is not None

    def kv_bytes_per_token_layer(self, element_bytes: float) -> float:
        """K+V bytes one token costs in one full-attention layer."""
        if self.mla_kv_lora_rank is not None:  # is_mla
            return (self.mla_kv_lora_rank + self.mla_rope_dim) * element_bytes
        return 2 * self.n_kv_heads * self.head_dim * element_bytes

    def kv_cache_bytes(self, tokens: int, element_bytes: float, *, sequences: int = 1) -> int:
        """KV cache for `tokens` cells in all (sequences) together; sliding layers keep at most the
        window per sequence."""
        per = self.kv_bytes_per_token_layer(element_bytes)
        full_layers = self.n_layers - self.sliding_layers
        total = full_layers * tokens * per
        if self.sliding_layers:
            window_cells = min(tokens, (self.sliding_window or tokens) * max(1, sequences))
            total += self.sliding_layers * window_cells * per
        return int(total)

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("tensors", "tensor_types")}
        d["tensor_count"] = len(self.tensors)
        return d


# --------------------------------------------------------------------------- HF config


def _cfg(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` config.json sets (top level, then `text_config`); for a name it leaves
    out, the model family's default as transformers defines it (data/family_defaults.json); else
    `default`. A name set to null counts as set: null is the config's own word (derive it)."""
    for n in names:
        if config.get(n) is not None:
            return config[n]
    text = config.get("text_config")
    if isinstance(text, dict):
        for n in names:
            if text.get(n) is not None:
                return text[n]
    family = _family(config).get("config", {})
    for n in names:
        if family.get(n) is not None and not _names_field(config, n):
            return family[n]
    return default


def _names_field(config: dict[str, Any], name: str) -> bool:
    text = config.get("text_config")
    return name in config or (isinstance(text, dict) and name in text)


@functools.cache
def family_defaults() -> dict[str, dict[str, Any]]:
    """model_type -> {"config": transformers' defaults, "layout": weights the modeling code adds}."""
    families: dict[str, dict[str, Any]] = json.loads(
        resources.files("cortex.data").joinpath("family_defaults.json").read_text()
    )["families"]
    return families


def _family(config: dict[str, Any]) -> dict[str, Any]:
    """The family entry for a config: its text model's (`text_config.model_type`) over its own."""
    table = family_defaults()
    merged: dict[str, Any] = {"config": {}, "layout": {}}
    text = config.get("text_config")
    types = [config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None]
    for t in types:
        entry = table.get(t) if isinstance(t, str) else None
        if entry:
            merged["config"].update(entry.get("config", {}))
            merged["layout"].update(entry.get("layout", {}))
    return merged


def _layout(config: dict[str, Any], flag: str) -> bool:
    return bool(_family(config)["layout"].get(flag, False))


def _cint(c: dict[str, Any], *names: str, limit: str, default: Any = None, where: str = "config.json") -> int:
    """A whole-number field of config.json (or its text_config), within LIMITS[limit]."""
    value = _cfg(c, *names, default=default)
    if value is None:
        raise ModelFileError(f"{where}: has no {names[0]}; Cortex needs it to size the model")
    return _whole(value, f"{where}: {names[0]}", limit)


def tensors_from_config(c: dict[str, Any], where: str = "config.json") -> list[TensorInfo]:
    """The GGUF tensor list convert_hf_to_gguf writes for a decoder-only transformer, derived
    from config.json (llama-like dense and MoE layouts, with the extra weights a family's modeling
    code adds: Qwen2's q/k/v bias, Gemma 2/3's post-norms, Phi-3's fused projections, gpt-oss's
    biases and sinks, DeepSeek's MLA). Shapes in ggml order (ne0 first).
    Every number is checked against LIMITS first (FactsError naming `where` and the field)."""
    h = _cint(c, "hidden_size", "n_embd", "d_model", limit="hidden", where=where)
    n_layers = _cint(c, "num_hidden_layers", "n_layer", "num_layers", limit="layers", where=where)
    n_heads = _cint(c, "num_attention_heads", "n_head", limit="heads", where=where)
    n_kv = _cint(c, "num_key_value_heads", default=n_heads, limit="heads", where=where)
    hd = _cint(c, "head_dim", default=max(1, h // n_heads), limit="head_dim", where=where)
    ff = _cint(c, "intermediate_size", "ffn_dim", default=4 * h, limit="ffn", where=where)
    vocab = _cint(c, "vocab_size", limit="vocab", where=where)
    n_exp = _cint(c, "num_local_experts", "num_experts", "n_routed_experts", default=0, limit="experts", where=where)
    moe_ff = _cint(c, "moe_intermediate_size", default=ff, limit="ffn", where=where)
    tied = bool(_cfg(c, "tie_word_embeddings", default=False))
    bias = bool(_cfg(c, "attention_bias", default=False))
    qkv_bias = bias or _layout(c, "qkv_bias")  # Qwen2: q/k/v always carry a bias, the output never
    mlp_bias = bool(_cfg(c, "mlp_bias", default=False))
    post_norms, qk_norm = _layout(c, "post_norms"), _layout(c, "qk_norm")
    kv_lora = _cint(c, "kv_lora_rank", default=0, limit="rank", where=where) or None
    first_dense = _cint(c, "first_k_dense_replace", default=0, limit="rank", where=where)
    shared = _cint(c, "n_shared_experts", default=0, limit="experts", where=where)

    t: list[TensorInfo] = [TensorInfo("token_embd.weight", (h, vocab))]
    for i in range(n_layers):
        p = f"blk.{i}."
        t.append(TensorInfo(p + "attn_norm.weight", (h,)))
        if kv_lora:  # MLA (DeepSeek V2/V3 style)
            q_lora = _cint(c, "q_lora_rank", default=0, limit="rank", where=where)
            rope = _cint(c, "qk_rope_head_dim", default=64, limit="rank", where=where)
            nope = _cint(c, "qk_nope_head_dim", default=128, limit="rank", where=where)
            vdim = _cint(c, "v_head_dim", default=128, limit="rank", where=where)
            if q_lora:
                t += [
                    TensorInfo(p + "attn_q_a.weight", (h, int(q_lora))),
                    TensorInfo(p + "attn_q_a_norm.weight", (int(q_lora),)),
                    TensorInfo(p + "attn_q_b.weight", (int(q_lora), n_heads * (nope + rope))),
                ]
            else:
                t.append(TensorInfo(p + "attn_q.weight", (h, n_heads * (nope + rope))))
            # the converter splits kv_b into k_b (transposed) and v_b for the absorbed MLA kernels
            t += [
                TensorInfo(p + "attn_kv_a_mqa.weight", (h, int(kv_lora) + rope)),
                TensorInfo(p + "attn_kv_a_norm.weight", (int(kv_lora),)),
                TensorInfo(p + "attn_k_b.weight", (nope, int(kv_lora), n_heads)),
                TensorInfo(p + "attn_v_b.weight", (int(kv_lora), vdim, n_heads)),
                TensorInfo(p + "attn_output.weight", (n_heads * vdim, h)),
            ]
        else:
            if _layout(c, "fused_qkv"):  # Phi-3: one qkv_proj, kept fused in the GGUF
                t.append(TensorInfo(p + "attn_qkv.weight", (h, (n_heads + 2 * n_kv) * hd)))
            else:
                t += [
                    TensorInfo(p + "attn_q.weight", (h, n_heads * hd)),
                    TensorInfo(p + "attn_k.weight", (h, n_kv * hd)),
                    TensorInfo(p + "attn_v.weight", (h, n_kv * hd)),
                ]
            t.append(TensorInfo(p + "attn_output.weight", (n_heads * hd, h)))
            if qkv_bias:
                t += [
                    TensorInfo(p + "attn_q.bias", (n_heads * hd,)),
                    TensorInfo(p + "attn_k.bias", (n_kv * hd,)),
                    TensorInfo(p + "attn_v.bias", (n_kv * hd,)),
                ]
            if bias:
                t.append(TensorInfo(p + "attn_output.bias", (h,)))
            if qk_norm:  # Gemma 3: RMSNorm over each head's q and k
                t += [TensorInfo(p + "attn_q_norm.weight", (hd,)), TensorInfo(p + "attn_k_norm.weight", (hd,))]
        if _layout(c, "attn_sinks"):  # gpt-oss: one learned sink logit per head
            t.append(TensorInfo(p + "attn_sinks.weight", (n_heads,)))
        if post_norms:  # Gemma 2/3: norms after attention and after the FFN too
            t.append(TensorInfo(p + "post_attention_norm.weight", (h,)))
        t.append(TensorInfo(p + "ffn_norm.weight", (h,)))
        if n_exp > 1 and i >= first_dense:
            t.append(TensorInfo(p + "ffn_gate_inp.weight", (h, n_exp)))
            t += [
                TensorInfo(p + "ffn_gate_exps.weight", (h, moe_ff, n_exp)),
                TensorInfo(p + "ffn_up_exps.weight", (h, moe_ff, n_exp)),
                TensorInfo(p + "ffn_down_exps.weight", (moe_ff, h, n_exp)),
            ]
            if _layout(c, "moe_bias"):  # gpt-oss: biases on the router and the experts
                t += [
                    TensorInfo(p + "ffn_gate_inp.bias", (n_exp,)),
                    TensorInfo(p + "ffn_gate_exps.bias", (moe_ff, n_exp)),
                    TensorInfo(p + "ffn_up_exps.bias", (moe_ff, n_exp)),
                    TensorInfo(p + "ffn_down_exps.bias", (h, n_exp)),
                ]
            if shared:
                sff = moe_ff * shared
                t += [
                    TensorInfo(p + "ffn_gate_shexp.weight", (h, sff)),
                    TensorInfo(p + "ffn_up_shexp.weight", (h, sff)),
                    TensorInfo(p + "ffn_down_shexp.weight", (sff, h)),
                ]
        elif _layout(c, "fused_gate_up"):  # Phi-3: gate_up_proj stays one ffn_up of twice the width
            t += [TensorInfo(p + "ffn_up.weight", (h, 2 * ff)), TensorInfo(p + "ffn_down.weight", (ff, h))]
        else:
            t += [
                TensorInfo(p + "ffn_gate.weight", (h, ff)),
                TensorInfo(p + "ffn_up.weight", (h, ff)),
                TensorInfo(p + "ffn_down.weight", (ff, h)),
            ]
            if mlp_bias:
                t += [
                    TensorInfo(p + "ffn_gate.bias", (ff,)),
                    TensorInfo(p + "ffn_up.bias", (ff,)),
                    TensorInfo(p + "ffn_down.bias", (h,)),
                ]
        if post_norms:
            t.append(TensorInfo(p + "post_ffw_norm.weight", (h,)))
    t.append(TensorInfo("output_norm.weight", (h,)))
    if not tied:
        t.append(TensorInfo("output.weight", (h, vocab)))
    return t


def _sliding(c: dict[str, Any], n_layers: int, where: str = "config.json") -> tuple[int | None, int]:
    window = _cfg(c, "sliding_window")
    if not window or _cfg(c, "use_sliding_window") is False:
        return None, 0
    window = _whole(window, f"{where}: sliding_window", "window")
    layer_types = _cfg(c, "layer_types")
    if isinstance(layer_types, list):
        return window, min(n_layers, sum(1 for x in layer_types if "sliding" in str(x)))
    pattern = _cfg(c, "sliding_window_pattern", "_sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:  # gemma, gpt-oss: every pattern-th layer is global
        return window, n_layers - n_layers // pattern
    first = _cfg(c, "max_window_layers")
    if isinstance(first, int) and not isinstance(first, bool):  # qwen2: the layers from max_window_layers on slide
        return window, max(0, n_layers - min(first, n_layers))
    return window, n_layers  # mistral v0.1 style: every layer slides


def facts_from_config(
    config: dict[str, Any],
    *,
    params_exact: int | None = None,
    weights_bytes: int | None = None,
    metadata_bytes: int | None = None,
    files: list[str] | None = None,
    where: str = "config.json",
) -> ModelFacts:
    if not isinstance(config, dict):
        raise ModelFileError(f"{where}: holds a JSON {type(config).__name__}, not an object")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs):
        raise ModelFileError(
            f"{where}: has no `architectures` list of class names; it does not describe a model Cortex can serve"
        )
    for key in ("text_config", "quantization_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ModelFileError(f"{where}: {key} is a {type(config[key]).__name__}, not an object")
    tensors = tensors_from_config(config, where)
    n_layers = _cint(config, "num_hidden_layers", "n_layer", "num_layers", limit="layers", where=where)
    h = _cint(config, "hidden_size", "n_embd", "d_model", limit="hidden", where=where)
    n_heads = _cint(config, "num_attention_heads", "n_head", limit="heads", where=where)
    n_kv = _cint(config, "num_key_value_heads", default=n_heads, limit="heads", where=where)
    n_exp = _cint(
        config, "num_local_experts", "num_experts", "n_routed_experts", default=0, limit="experts", where=where
    )
    n_act = _cint(
        config, "num_experts_per_tok", "experts_per_token", "moe_topk", default=0, limit="experts", where=where
    )
    computed = sum(t.elements for t in tensors)
    expert_params = sum(t.elements for t in tensors if "_exps." in t.name)
    active = computed - expert_params + (expert_params * n_act // n_exp if n_exp > 1 else 0)
    total = params_exact or computed
    window, sliding_layers = _sliding(config, n_layers, where)
    dtype = str(_cfg(config, "torch_dtype", "dtype", default="bfloat16"))
    qc = config.get("quantization_config") or {}
    kv_lora = _cint(config, "kv_lora_rank", default=0, limit="rank", where=where) or None
    vocab = _cint(config, "vocab_size", limit="vocab", where=where)
    notes = []
    if params_exact and abs(params_exact - computed) / params_exact > 0.02:
        notes.append(
            f"parameter count from weights ({params_exact:,}) differs from the config-derived layout ({computed:,})"
        )
    if metadata_bytes is None:
        # tokenizer vocabulary and merges dominate GGUF metadata (~28 bytes a token)
        metadata_bytes = 28 * vocab + 64 * 1024
    return ModelFacts(
        architecture=archs[0],
        model_type=str(config.get("model_type", archs[0])),
        source_format="hf",
        params_total=total,
        params_active=active if n_exp > 1 else total,
        n_layers=n_layers,
        hidden_size=h,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=_cint(config, "head_dim", default=max(1, h // n_heads), limit="head_dim", where=where),
        vocab_size=vocab,
        max_context=_cint(
            config,
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
            default=2048,
            limit="context",
            where=where,
        ),
        dtype=dtype,
        tie_embeddings=bool(_cfg(config, "tie_word_embeddings", default=False)),
        intermediate_size=_cfg(config, "intermediate_size"),
        n_experts=n_exp if n_exp > 1 else 0,
        n_experts_active=n_act if n_exp > 1 else 0,
        sliding_window=window,
        sliding_layers=sliding_layers,
        mla_kv_lora_rank=int(kv_lora) if kv_lora else None,
        mla_rope_dim=int(_cfg(config, "qk_rope_head_dim", default=0) or 0) if kv_lora else 0,
        quantized=qc.get("quant_method") if qc else None,
        weights_bytes_on_disk=weights_bytes,
        metadata_bytes=metadata_bytes,
        tensors=tensors,
        files=files or [],
        notes=notes,
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    head = _read(path, "the safetensors file", 8, whole=False)
    if len(head) < 8:
        raise ModelFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= MAX_SAFETENSORS_HEADER:
        raise ModelFileError(f"{path}: not a safetensors file (header length {n:,})")
    raw = _read(path, "the safetensors file", 8 + n, whole=False)[8:]
    if len(raw) < n:
        raise ModelFileError(f"{path}: safetensors header claims {n:,} bytes but the file ends first; is it truncated?")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
        ):
            raise ModelFileError(f"{path}: safetensors tensor {_short(name)} has no valid shape (a list of sizes)")
    return header


def _count_params(header: dict[str, Any]) -> int:
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= d
        total += n
    return total


def _tokenizer_metadata_bytes(folder: Path) -> int | None:
    tok = folder / "tokenizer.json"
    if not tok.exists() and not tok.is_symlink():
        return None
    data = read_json(tok, "tokenizer.json", MAX_TOKENIZER_BYTES)

    def part(parent: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any, where: str) -> Any:
        value = parent.get(key)
        if value is None:
            return default
        if not isinstance(value, kinds):
            raise ModelFileError(
                f"{tok}: {where}{key} is a {type(value).__name__}; a tokenizer.json has "
                f"{' or '.join(k.__name__ for k in kinds)} there"
            )
        return value

    model = part(data, "model", (dict,), {}, "")
    vocab = part(model, "vocab", (dict, list), {}, "model.")
    merges = part(model, "merges", (list,), [], "model.")
    added = part(data, "added_tokens", (list,), [], "")

    def text(x: Any) -> str:  # a token: a string, or (Unigram) [token, score]
        if isinstance(x, list) and x:
            x = x[0]
        if isinstance(x, dict):
            x = x.get("content", "")
        if not isinstance(x, str):
            raise ModelFileError(f"{tok}: a token is {_short(x)}, not a string")
        return x

    size = sum(8 + len(text(k).encode()) + 4 + 4 for k in vocab)  # token string, type, score
    size += sum(
        8 + len((m if isinstance(m, str) else " ".join(text([x]) for x in m)).encode())
        for m in merges
        if isinstance(m, (str, list))
    )
    size += sum(8 + len(text(a).encode()) for a in added)
    return size + 32 * 1024  # chat template, general.* and hparams


def hf_dir_facts(folder: Path) -> ModelFacts:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            raise ModelFileError(
                f"{folder}: not a folder; source.path names an HF checkpoint folder (config.json, *.safetensors)"
            )
    except OSError as e:
        why = (
            "is a symlink loop"
            if e.errno == errno.ELOOP
            else "no such folder"
            if e.errno == errno.ENOENT
            else e.strerror
        )
        raise ModelFileError(f"{folder}: cannot read the HF checkpoint folder: {why}") from None
    if not cfg_path.exists() and not cfg_path.is_symlink():
        raise ModelFileError(f"{folder}: no config.json; an HF checkpoint folder needs one (is this the right folder?)")
    config = read_json(cfg_path, "config.json")
    shards = sorted(folder.glob("*.safetensors"))
    params = None
    weights = None
    if shards:
        params = sum(_count_params(_safetensors_header(p)) for p in shards)
        weights = sum(p.stat().st_size for p in shards)
    else:
        index = folder / "model.safetensors.index.json"
        if index.exists() or index.is_symlink():
            meta = read_json(index, "the safetensors index").get("metadata") or {}
            if not isinstance(meta, dict):
                raise ModelFileError(f"{index}: metadata is a {type(meta).__name__}, not an object")
            if meta.get("total_size"):
                weights = _whole(meta["total_size"], f"{index}: metadata.total_size", "bytes")
                per = DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)
                params = weights // per
    return facts_from_config(
        config,
        params_exact=params,
        weights_bytes=weights,
        metadata_bytes=_tokenizer_metadata_bytes(folder),
        files=[p.name for p in shards],
        where=str(cfg_path),
    )


# --------------------------------------------------------------------------- GGUF


def gguf_split_set(path: Path) -> list[Path]:
    """All files of a split GGUF (`x-00001-of-00003.gguf`), in order; `[path]` for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    if not 1 <= int(m.group("i")) <= n:
        raise ModelFileError(f"{path}: part {int(m.group('i'))} of {n} is no part of a split set")
    parts = (path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1))
    found, missing = [], []
    for part in parts:
        found.append(part)
        if not part.exists():
            missing.append(part.name)
            if len(missing) == 3:  # enough to act on; a hostile `-of-99999` costs no 99,999 lookups
                break
    if missing:
        raise ModelFileError(
            f"{path}: split GGUF is missing {', '.join(missing)}"
            f"{' and maybe more' if len(missing) == 3 else ''} (all {n} parts must sit together)"
        )
    return found


def read_local_gguf_header(path: Path) -> GgufHeader:
    """The header of a local GGUF file, read from its first bytes (4 MiB, doubling up to
    MAX_GGUF_HEADER); a FactsError naming the file for anything that is not a readable GGUF."""
    from cortex.gguf_header import GgufHeaderError, HeaderTooShort, read_gguf_header

    size = 4 << 20
    while True:
        buf = _read(path, "the GGUF file", size, whole=False)
        try:
            return read_gguf_header(buf)
        except GgufHeaderError as e:
            raise ModelFileError(f"{path}: not a readable GGUF file ({e})") from None
        except HeaderTooShort:
            if len(buf) < size:
                raise ModelFileError(
                    f"{path}: not a readable GGUF file (it ends inside its header: truncated or corrupt)"
                ) from None
            if size >= MAX_GGUF_HEADER:
                raise ModelFileError(
                    f"{path}: GGUF header larger than {MAX_GGUF_HEADER >> 20} MiB; the file is corrupt"
                ) from None
            size *= 2


def gguf_facts(path: Path) -> ModelFacts:
    path = Path(path)
    parts = gguf_split_set(path)
    headers = [read_local_gguf_header(p) for p in parts]
    tensors = [t for h in headers for t in h.tensors]
    data_bytes = sum(h.data_bytes for h in headers)
    file_bytes = sum(p.stat().st_size for p in parts)
    meta = headers[0].metadata
    if not meta.get("general.architecture"):
        raise ModelFileError(f"{path}: GGUF has no general.architecture")
    facts = facts_from_gguf_metadata(meta, tensors, data_bytes, max(0, file_bytes - data_bytes), where=str(path))
    facts.files = [str(p) for p in parts]
    facts.tensor_types = {name: int(t) for h in headers for name, t in h.types.items()}
    return facts


def facts_from_gguf_metadata(
    meta: dict[str, Any], tensors: list[TensorInfo], data_bytes: int, metadata_bytes: int, where: str = "GGUF"
) -> ModelFacts:
    """Facts from GGUF key/values and the tensor table (from the gguf reader or a header).
    Every number is checked against LIMITS (FactsError naming `where` and the key)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch or len(arch) > 64:
        raise ModelFileError(f"{where}: general.architecture is {_short(arch)}, not an architecture name")

    def kv(name: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{name}")
        return default if v is None else v

    def num(name: str, limit: str, default: Any = None) -> int:
        v = kv(name, default)
        if v is None:
            raise ModelFileError(
                f"{where}: has no {arch}.{name}; llama.cpp cannot load an architecture ({arch!r}) without it"
            )
        if isinstance(v, list):  # per-layer arrays (e.g. head counts) -> the largest
            if not v or len(v) > LIMITS["layers"][1]:
                raise ModelFileError(f"{where}: {arch}.{name} is a list of {len(v)} values, not one per layer")
            return max(_whole(x, f"{where}: {arch}.{name}", limit) for x in v)
        return _whole(v, f"{where}: {arch}.{name}", limit)

    n_layers = num("block_count", "layers")
    n_heads = num("attention.head_count", "heads")
    n_kv = num("attention.head_count_kv", "heads", n_heads)
    h = num("embedding_length", "hidden")
    n_exp = num("expert_count", "experts", 0)
    n_act = num("expert_used_count", "experts", 0)
    params = sum(t.elements for t in tensors)
    expert_params = sum(t.elements for t in tensors if "_exps." in t.name)
    window = num("attention.sliding_window", "window", 0) or None
    pattern = kv("attention.sliding_window_pattern")
    sliding_layers = 0
    if window:
        if isinstance(pattern, list):
            sliding_layers = min(n_layers, sum(1 for x in pattern if x))
        elif arch == "gpt-oss":  # alternates sliding and full attention
            sliding_layers = n_layers // 2
        else:
            sliding_layers = n_layers
    ftype = meta.get("general.file_type")
    if ftype is not None and (isinstance(ftype, bool) or not isinstance(ftype, int)):
        raise ModelFileError(f"{where}: general.file_type is {_short(ftype)}, not a number")
    kv_lora = num("attention.kv_lora_rank", "rank", 0) or None
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise ModelFileError(f"{where}: tokenizer.ggml.tokens is a {type(tokens).__name__}, not a list of tokens")
    ffn = kv("feed_forward_length")
    return ModelFacts(
        architecture=arch,
        model_type=arch,
        source_format="gguf",
        params_total=params,
        params_active=params - expert_params + (expert_params * n_act // n_exp if n_exp > 1 else 0),
        n_layers=n_layers,
        hidden_size=h,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=num("attention.key_length", "head_dim", max(1, h // n_heads)),
        vocab_size=len(tokens) if tokens else num("vocab_size", "vocab", 1),
        max_context=num("context_length", "context", 2048),
        dtype=FILE_TYPE_NAMES.get(ftype, f"type {ftype}") if ftype is not None else "unknown",
        tie_embeddings=not any(t.name == "output.weight" for t in tensors),
        intermediate_size=num("feed_forward_length", "ffn") if ffn is not None and not isinstance(ffn, list) else None,
        n_experts=n_exp if n_exp > 1 else 0,
        n_experts_active=n_act if n_exp > 1 else 0,
        sliding_window=window,
        sliding_layers=sliding_layers,
        mla_kv_lora_rank=kv_lora,
        mla_rope_dim=num("rope.dimension_count", "rank", 0) if kv_lora else 0,
        weights_bytes_on_disk=data_bytes,
        metadata_bytes=metadata_bytes,
        tensors=tensors,
    )


# --------------------------------------------------------------------------- HF repo


def hub_cache_dirs(spec_dir: Path | None) -> list[Path | None]:
    """Where to look for Hub files before the network: a `hub/` folder beside the spec (a warm
    cache shipped with the specs, in the HF cache layout), then the user's HF cache (None)."""
    dirs: list[Path | None] = []
    if spec_dir is not None and (spec_dir / "hub").is_dir():
        dirs.append(spec_dir / "hub")
    dirs.append(None)
    return dirs


def _cached_file(repo: str, filename: str, revision: str, cache_dirs: list[Path | None]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for d in cache_dirs:
        found = try_to_load_from_cache(repo, filename, cache_dir=d, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def hf_repo_facts(repo: str, revision: str = "main", *, spec_dir: Path | None = None) -> ModelFacts:
    """Facts for an HF repo without downloading weights: config.json (+ safetensors index) from
    the cache, or from the Hub (config.json and safetensors header metadata only)."""
    cache_dirs = hub_cache_dirs(spec_dir)
    cfg = _cached_file(repo, "config.json", revision, cache_dirs)
    if cfg is not None:
        return hf_dir_facts(cfg.parent)
    from cortex import hub

    try:
        path, params, files = hub.remote_config(repo, revision, token=hub.token_from_env())
    except hub.HubError as e:
        raise FactsError(str(e)) from None
    config = read_json(path, "config.json")
    return facts_from_config(config, params_exact=params, files=files)


def gguf_repo_facts(repo: str, filename: str, revision: str = "main", *, spec_dir: Path | None = None) -> ModelFacts:
    """Facts for a GGUF file inside an HF repo: the file itself from the Hub cache, else its
    header (metadata + tensor table: the first megabytes, no weights) from the cache, else the
    header fetched from the Hub with HTTP range requests and kept as `<file>.header`."""
    cache_dirs = hub_cache_dirs(spec_dir)
    full = _cached_file(repo, filename, revision, cache_dirs)
    if full is not None:
        return gguf_facts(full)
    header = _cached_file(repo, filename + ".header", revision, cache_dirs)
    if header is None:
        header = _header_cache_path(repo, filename, revision)
        if not header.is_file():
            from cortex.hub import is_offline

            if is_offline():
                raise FactsError(
                    f"{repo}/{filename}@{revision}: neither the file nor its header is in the Hub cache and "
                    "HF_HUB_OFFLINE is set; run once with network access (cortex plan or cortex prepare)"
                )
            _fetch_gguf_header(repo, filename, revision, header)
    return gguf_header_facts(header, filename)


def _header_cache_path(repo: str, filename: str, revision: str) -> Path:
    from cortex.settings import cache_root

    return cache_root() / "gguf-headers" / repo / revision / (filename + ".header")


def _fetch_gguf_header(repo: str, filename: str, revision: str, dest: Path) -> None:
    """Download just enough of a GGUF from the Hub to read its header (4 MiB, doubling)."""
    from cortex import hub
    from cortex.gguf_header import HeaderTooShort, read_gguf_header

    token = hub.token_from_env()
    size = 4 * 2**20
    while size <= 256 * 2**20:
        try:
            data = hub.read_range(repo, filename, revision, size, token=token)
        except hub.HubError as e:
            raise FactsError(f"could not read the GGUF header from the Hub: {e}") from None
        try:
            header = read_gguf_header(data)
        except HeaderTooShort:
            if len(data) < size:  # the whole file came back and it still ends inside the header
                raise ModelFileError(f"{repo}/{filename}@{revision}: the file ends inside its GGUF header") from None
            size *= 2
            continue
        except ValueError as e:
            raise ModelFileError(f"{repo}/{filename}@{revision}: {e}") from None
        atomic_write_bytes(dest, data[: header.header_bytes])
        return
    raise ModelFileError(f"{repo}/{filename}@{revision}: GGUF header larger than 256 MiB; is this a GGUF file?")


def gguf_header_facts(header_path: Path, filename: str) -> ModelFacts:
    """Facts from the first bytes of a GGUF (metadata and tensor table, no tensor data)."""
    from cortex.gguf_header import GgufHeaderError, HeaderTooShort, read_gguf_header

    try:
        header = read_gguf_header(_read(header_path, "the cached GGUF header", MAX_GGUF_HEADER))
    except (GgufHeaderError, HeaderTooShort) as e:
        raise ModelFileError(f"{header_path}: not a readable GGUF header ({e}); delete it to fetch it again") from None
    if not header.metadata.get("general.architecture"):
        raise ModelFileError(f"{header_path}: GGUF header has no general.architecture")
    facts = facts_from_gguf_metadata(
        header.metadata, header.tensors, header.data_bytes, header.header_bytes, where=str(header_path)
    )
    facts.files = [filename]
    facts.tensor_types = {name: int(t) for name, t in header.types.items()}
    return facts


def facts_for_source(source: Any, *, spec_dir: Path | None = None) -> ModelFacts:
    """Facts for a spec's `source`, whatever its kind; no weights are downloaded."""
    kind = source.kind
    if kind == "hf_dir":
        return hf_dir_facts(Path(source.path))
    if kind == "gguf_file":
        return gguf_facts(Path(source.gguf))
    if kind == "gguf_repo":
        return gguf_repo_facts(source.repo, source.gguf, source.revision, spec_dir=spec_dir)
    return hf_repo_facts(source.repo, source.revision, spec_dir=spec_dir)
