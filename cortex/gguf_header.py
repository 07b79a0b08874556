"""Read a GGUF header (key/values and tensor table) from its first bytes alone.

The `gguf` package's reader maps a whole file; a GGUF on the Hub is tens of gigabytes, and
its header is a few megabytes at the start. This reads the header from bytes (a ranged
download, or a cached `<file>.header`), using the `gguf` package's own type constants.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from cortex.quant import TensorInfo

GGUF_MAGIC = b"GGUF"
_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


# Bounds a real header stays far below; past them the header is corrupt or hostile.
MAX_KV = 100_000  # key/value pairs (a model has a few dozen)
MAX_TENSORS = 200_000  # tensors (the largest MoE models have a few thousand)
MAX_STRINGS = 4_000_000  # strings in all (tokens + merges of a 256k vocabulary are about 600k)
MAX_ARRAY_DEPTH = 4  # arrays of arrays (llama.cpp writes none deeper than 1)
MAX_DIMS = 4  # GGML_MAX_DIMS


class HeaderTooShort(Exception):
    """The bytes end before the header does; fetch more of the file."""


class GgufHeaderError(ValueError):
    """The header is not a GGUF header Cortex can read; the message says what is wrong."""


@dataclass
class GgufHeader:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    types: dict[str, GGMLQuantizationType]
    data_bytes: int  # tensor data that follows the header
    header_bytes: int  # bytes up to the (aligned) start of tensor data


def read_gguf_header(buf: bytes) -> GgufHeader:
    """The header in `buf`; HeaderTooShort when `buf` ends inside it, GgufHeaderError when it
    is malformed (unknown types, duplicate keys, counts or nesting past the bounds above)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise HeaderTooShort(f"GGUF header needs more than {len(buf)} bytes")
        b = buf[pos : pos + n]
        pos += n
        return b

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    strings = 0

    def string() -> str:
        nonlocal strings
        strings += 1
        if strings > MAX_STRINGS:
            raise GgufHeaderError(f"header holds more than {MAX_STRINGS:,} strings; it is corrupt")
        return take(unpack("<Q")).decode("utf-8", errors="replace")

    def value(vtype: int, key: str, depth: int = 0) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise GgufHeaderError(f"key {key!r} has unknown value type {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GgufHeaderError(f"key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            item_type = unpack("<I")
            count = unpack("<Q")
            if count > len(buf) - pos:  # every item takes at least one byte
                raise HeaderTooShort(f"key {key!r} claims {count:,} items")
            if item_type in _SCALAR:  # numbers in one unpack: a long array costs no Python loop
                fmt = _SCALAR[GGUFValueType(item_type)]
                return list(struct.unpack(f"<{count}{fmt[1]}", take(count * struct.calcsize(fmt))))
            return [value(item_type, key, depth + 1) for _ in range(count)]
        return unpack(_SCALAR[vtype])

    if take(4) != GGUF_MAGIC:
        raise GgufHeaderError("not a GGUF file (bad magic)")
    version = unpack("<I")
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} is not one Cortex reads (2 or 3)")
    n_tensors = unpack("<Q")
    n_kv = unpack("<Q")
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise GgufHeaderError(f"header claims {n_kv:,} keys and {n_tensors:,} tensors; it is corrupt")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        if key in meta:
            raise GgufHeaderError(f"key {key!r} appears twice")
        meta[key] = value(unpack("<I"), key)
    tensors: list[TensorInfo] = []
    types: dict[str, GGMLQuantizationType] = {}
    data_bytes = 0
    for _ in range(n_tensors):
        name = string()
        if name in types:
            raise GgufHeaderError(f"tensor {name!r} appears twice")
        n_dims = unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufHeaderError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = tuple(unpack("<Q") for _ in range(n_dims))
        raw_type = unpack("<I")
        try:
            ttype = GGMLQuantizationType(raw_type)
            block, size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise GgufHeaderError(f"tensor {name!r} has unknown type {raw_type}") from None
        unpack("<Q")  # offset
        t = TensorInfo(name, dims)
        tensors.append(t)
        types[name] = ttype
        data_bytes += t.elements // block * size
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 30 or align & (align - 1):
        raise GgufHeaderError(f"general.alignment {align!r} is not a power of two")
    header_bytes = -(-pos // align) * align
    return GgufHeader(meta, tensors, types, data_bytes, header_bytes)
