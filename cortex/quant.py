"""GGUF quantization types and how llama-quantize picks a type for each tensor.

Bits per weight are per tensor, not per file: k-quants need rows that are a multiple of 256,
and llama-quantize gives some tensors more bits by name and layer. `predict_gguf_bytes`
follows llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the types Cortex
offers, so a predicted size is the size llama-quantize writes, not a nominal bpw product.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# name -> (the file type's default tensor type, nominal bits per weight from llama.cpp's table)
GGUF_TYPES: dict[str, tuple[T, float]] = {
    "F32": (T.F32, 32.0),
    "F16": (T.F16, 16.0),
    "BF16": (T.BF16, 16.0),
    "Q8_0": (T.Q8_0, 8.5),
    "Q6_K": (T.Q6_K, 6.56),
    "Q5_K_M": (T.Q5_K, 5.70),
    "Q5_K_S": (T.Q5_K, 5.57),
    "Q5_0": (T.Q5_0, 5.5),
    "Q5_1": (T.Q5_1, 6.0),
    "Q4_K_M": (T.Q4_K, 4.89),
    "Q4_K_S": (T.Q4_K, 4.67),
    "Q4_0": (T.Q4_0, 4.5),
    "Q4_1": (T.Q4_1, 5.0),
    "IQ4_XS": (T.IQ4_XS, 4.46),
    "IQ4_NL": (T.IQ4_NL, 4.5),
    "Q3_K_L": (T.Q3_K, 4.27),
    "Q3_K_M": (T.Q3_K, 3.91),
    "Q3_K_S": (T.Q3_K, 3.50),
    "Q2_K": (T.Q2_K, 3.16),
    "MXFP4": (T.MXFP4, 4.25),
}

# What `quantization: auto` tries, best quality first. F16/BF16 are not offered by auto:
# Q8_0 is near-lossless at half the size (the seed's GPT-OSS recipe); pin F16 to get it.
AUTO_LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]

# llama.cpp's LLAMA_FTYPE numbers, as written to general.file_type.
FILE_TYPE_IDS = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "BF16": 32,
    "MXFP4": 38,
}
FILE_TYPE_NAMES = {v: k for k, v in FILE_TYPE_IDS.items()}

# Fallbacks when a row length is not a multiple of the type's block (llama-quant.cpp,
# tensor_type_fallback, as vendored by the pinned llama-cpp-python).
_FALLBACK = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.IQ4_XS: T.IQ4_NL,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a GGUF file names it: `blk.3.attn_v.weight`, shape in ggml order (ne0 first)."""

    name: str
    shape: tuple[int, ...]  # ne[0] is the row length (the HF weight's last dimension)

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def tensor_bytes(ttype: T, elements: int) -> int:
    block, size = GGML_QUANT_SIZES[ttype]
    return elements // block * size


def canonical_type(name: str) -> str:
    canon = {t.upper(): t for t in GGUF_TYPES}
    try:
        return canon[name.upper()]
    except KeyError:
        raise ValueError(f"{name!r} is not a GGUF type; use one of {', '.join(GGUF_TYPES)}") from None


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _is_quantizable(t: TensorInfo) -> bool:
    name = t.name
    if not name.endswith("weight") or len(t.shape) < 2:
        return False
    skip = ("_norm.weight", "ffn_gate_inp.weight", "pos_embd", "token_types", "attn_sinks", "rope_freqs")
    return not any(s in name for s in skip)


def _is_attn_v_like(name: str) -> bool:
    """llama-quant.cpp's category_is_attn_v: the fused attn_qkv and MLA's attn_kv_b get attn_v's
    extra bits and share its layer counter (its own attn_qkv branch comes after and never runs)."""
    return "attn_v.weight" in name or "attn_qkv.weight" in name or "attn_kv_b.weight" in name


def _block_index(name: str) -> int | None:
    """3 for `blk.3.ffn_down_exps.weight`; None for a tensor outside the blocks."""
    head, _, rest = name.partition(".")
    number = rest.partition(".")[0]
    return int(number) if head == "blk" and number.isdigit() else None


def assign_types(
    tensors: list[TensorInfo], ftype: str, *, n_gqa: int = 1, n_expert: int = 1, source_type: T = T.F16
) -> dict[str, T]:
    """The tensor type llama-quantize writes for each tensor of an F16/BF16 GGUF at `ftype`."""
    ftype = canonical_type(ftype)
    default, _ = GGUF_TYPES[ftype]
    has_output = any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum(1 for t in tensors if _is_attn_v_like(t.name))
    # llama.cpp spreads the extra ffn_down bits over the model's layers (hparams.n_layer); in a
    # MoE model (n_expert > 1) a tensor's layer is its block number, as a model with a dense first
    # layer and shared experts has more ffn_down tensors than layers
    n_ffn_down = len({b for t in tensors if (b := _block_index(t.name)) is not None})
    i_attn_v = 0
    i_ffn_down = 0
    out: dict[str, T] = {}
    for t in tensors:
        if not _is_quantizable(t):
            out[t.name] = T.F32 if len(t.shape) < 2 or t.name.endswith("_norm.weight") else source_type
            continue
        if ftype in ("F16", "BF16", "F32"):
            out[t.name] = default
            continue
        new = default
        name = t.name
        if ftype == "MXFP4":
            # llama.cpp's MXFP4_MOE: the experts (3D, one slice per expert) in MXFP4, all else Q8_0
            out[t.name] = T.MXFP4 if len(t.shape) > 2 and t.shape[2] > 1 else T.Q8_0
            continue
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            block = GGML_QUANT_SIZES[new][0]
            if t.shape[0] % block != 0:
                new = T.Q8_0
            elif new != T.Q8_0:
                new = T.Q6_K
        elif name == "token_embd.weight":
            pass
        elif _is_attn_v_like(name):
            if ftype == "Q2_K":
                new = T.Q4_K if n_gqa >= 4 else T.Q3_K
            elif ftype == "Q3_K_M":
                new = T.Q5_K if i_attn_v < 2 else T.Q4_K
            elif ftype == "Q3_K_L":
                new = T.Q5_K
            elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                new = T.Q5_K
            elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
                new = T.Q6_K
            elif ftype == "Q4_K_S" and i_attn_v < 4:
                new = T.Q5_K
            if n_expert == 8:
                new = T.Q8_0
            i_attn_v += 1
        elif "attn_k.weight" in name:
            if n_expert == 8:
                new = T.Q8_0
        elif "ffn_down" in name:
            i, n = ((_block_index(name) or 0) if n_expert > 1 else i_ffn_down), n_ffn_down
            if ftype == "Q2_K":
                new = T.Q3_K
            elif ftype == "Q3_K_M":
                new = T.Q5_K if i < n // 16 else T.Q4_K
            elif ftype == "Q3_K_L":
                new = T.Q5_K
            elif ftype == "Q4_K_M" and _use_more_bits(i, n):
                new = T.Q6_K
            elif ftype in ("IQ4_NL", "IQ4_XS") and i < n // 8:
                new = T.Q5_K
            elif ftype == "Q5_K_M" and _use_more_bits(i, n):
                new = T.Q6_K
            elif ftype == "Q4_K_S" and i < n // 8:
                new = T.Q5_K
            i_ffn_down += 1
        elif "attn_output.weight" in name:
            if n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M"):
                    new = T.Q5_K
            elif ftype == "Q2_K":
                new = T.Q3_K
            elif ftype == "Q3_K_M":
                new = T.Q4_K
            elif ftype == "Q3_K_L":
                new = T.Q5_K
        block = GGML_QUANT_SIZES[new][0]
        if t.shape[0] % block != 0:
            new = _FALLBACK.get(new, T.F16)
            if t.shape[0] % GGML_QUANT_SIZES[new][0] != 0:
                new = T.F16
        out[t.name] = new
    return out


GGUF_ALIGNMENT = 32


def predict_gguf_bytes(
    tensors: list[TensorInfo],
    ftype: str,
    *,
    metadata_bytes: int,
    n_gqa: int = 1,
    n_expert: int = 1,
) -> int:
    """Bytes of the GGUF file llama-quantize (or convert_hf_to_gguf for F16/BF16) writes."""
    types = assign_types(tensors, ftype, n_gqa=n_gqa, n_expert=n_expert)
    total = metadata_bytes
    for t in tensors:
        # each tensor info: name (8 + len), n_dims (4), dims (8 each), type (4), offset (8)
        total += 8 + len(t.name) + 4 + 8 * len(t.shape) + 4 + 8
        size = tensor_bytes(types[t.name], t.elements)
        total += -(-size // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return total


def weights_bytes(tensors: list[TensorInfo], ftype: str, *, n_gqa: int = 1, n_expert: int = 1) -> int:
    """Bytes of tensor data alone (what lands in device memory)."""
    types = assign_types(tensors, ftype, n_gqa=n_gqa, n_expert=n_expert)
    return sum(tensor_bytes(types[t.name], t.elements) for t in tensors)
