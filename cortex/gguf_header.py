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
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class HeaderTooShort(Exception):
    """The bytes end before the header does; fetch more of the file."""


@dataclass
class GgufHeader:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    types: dict[str, GGMLQuantizationType]
    data_bytes: int  # tensor data that follows the header
    header_bytes: int  # bytes up to the (aligned) start of tensor data


def read_gguf_header(buf: bytes) -> GgufHeader:
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

    def string() -> str:
        return take(unpack("<Q")).decode("utf-8", errors="replace")

    def value(vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return string()
        if vtype == GGUFValueType.ARRAY:
            item_type = unpack("<I")
            return [value(item_type) for _ in range(unpack("<Q"))]
        return unpack(_SCALAR[vtype])

    if take(4) != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = unpack("<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors = unpack("<Q")
    n_kv = unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(unpack("<I"))
    tensors: list[TensorInfo] = []
    types: dict[str, GGMLQuantizationType] = {}
    data_bytes = 0
    for _ in range(n_tensors):
        name = string()
        dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
        ttype = GGMLQuantizationType(unpack("<I"))
        unpack("<Q")  # offset
        t = TensorInfo(name, dims)
        tensors.append(t)
        types[name] = ttype
        block, size = GGML_QUANT_SIZES[ttype]
        data_bytes += t.elements // block * size
    align = int(meta.get("general.alignment", 32))
    header_bytes = -(-pos // align) * align
    return GgufHeader(meta, tensors, types, data_bytes, header_bytes)
