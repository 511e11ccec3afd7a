"""Read a GGUF file's metadata and tensor shapes without loading the weights.

`gguf.GGUFReader` parses every vocabulary array into Python objects (about a
minute for a 262k-token vocab on these cores); this reader walks the header
with `struct` and skips large arrays, so it takes milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# GGUF value types -> struct format (None: string / array handled specially)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
SMALL_ARRAY = 64

# llama.cpp `general.file_type` values -> quantization names.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


class GGUFError(Exception):
    """The file is not a readable GGUF."""


class GGUFTruncated(GGUFError):
    """The header is whole but the file ends before its tensor data does (a cut download)."""


@dataclass(slots=True)
class GGUFInfo:
    """Metadata of one GGUF file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int] = field(default_factory=dict)
    parameter_count: int = 0
    tensor_count: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    def arch(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key, e.g. `context_length` -> `gemma3.context_length`."""
        return self.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int:
        return int(self.arch("context_length", 0) or 0)

    @property
    def embedding_length(self) -> int:
        return int(self.arch("embedding_length", 0) or 0)

    @property
    def quantization(self) -> str:
        ft = self.get("general.file_type")
        return FILE_TYPES.get(int(ft), f"type{ft}") if ft is not None else "unknown"

    @property
    def chat_template(self) -> str | None:
        tpl = self.get("tokenizer.chat_template")
        return str(tpl) if tpl else None

    @property
    def size_label(self) -> str:
        label = self.get("general.size_label")
        if label:
            return str(label)
        n = self.parameter_count
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def model_facts(meta: GGUFInfo) -> dict[str, Any]:
    """What a GGUF file says about its model, as `ModelInfo` fields (for /api/show, /api/tags, ps).

    Shared by the in-box engine and managed upstreams that serve a GGUF path.
    """
    metadata = {k: v for k, v in meta.metadata.items() if not k.startswith("tokenizer.ggml.")}
    metadata["size_label"] = meta.size_label
    metadata["context_length_train"] = meta.context_length
    return {
        "architecture": meta.architecture, "family": meta.architecture,
        "parameter_count": meta.parameter_count, "quantization": meta.quantization,
        "chat_template": meta.chat_template, "metadata": metadata,
    }


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        return self.unpack(SCALARS[vtype])


def _tensor_bytes(ttype: int, n_elements: int) -> int:
    """Bytes of one tensor; 0 for a type this gguf version does not know (only its offset is checked)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # lazy: pulls in numpy

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return 0
    return n_elements // block * size


def read_gguf(path: str | Path, *, whole: bool = True) -> GGUFInfo:
    """Parse the header of a GGUF file (metadata, tensor shapes).

    With `whole` (the default) a file that ends before its last tensor is a
    `GGUFTruncated`; `whole=False` reads just a downloaded head of one.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(path, mm, whole)
    except (OSError, ValueError) as exc:
        raise GGUFError(f"{path}: cannot read: {exc}") from None
    except (struct.error, KeyError, IndexError) as exc:
        raise GGUFError(f"{path}: not a valid GGUF file ({exc})") from None


def _parse(path: Path, mm: Any, whole: bool) -> GGUFInfo:
    if mm[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    c = _Cursor(mm)
    c.pos = 4
    version = c.unpack("I")
    if version < 2:
        raise GGUFError(f"{path}: GGUF version {version} is too old")
    n_tensors = c.unpack("Q")
    n_kv = c.unpack("Q")
    meta: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string()
        vtype = c.unpack("I")
        if vtype != ARRAY:
            meta[key] = c.value(vtype)
            continue
        itype = c.unpack("I")
        count = c.unpack("Q")
        lengths[key] = count
        if count <= SMALL_ARRAY:
            meta[key] = [c.value(itype) for _ in range(count)]
        elif itype == STRING:
            pos, buf, u64 = c.pos, c.buf, struct.Struct("<Q").unpack_from
            for _ in range(count):  # hot loop: 262k vocab strings
                pos += 8 + u64(buf, pos)[0]
            c.pos = pos
        else:
            c.pos += count * struct.calcsize("<" + SCALARS[itype])
    params = 0
    data_end = 0  # relative to the start of the tensor data
    for _ in range(n_tensors):
        c.skip_string()
        n_dims = c.unpack("I")
        n = 1
        for _ in range(n_dims):
            n *= c.unpack("Q")
        ttype, offset = c.unpack("I"), c.unpack("Q")
        params += n
        data_end = max(data_end, offset + _tensor_bytes(ttype, n))
    align = int(meta.get("general.alignment", 32) or 32)
    need = -(-c.pos // align) * align + data_end
    if whole and len(mm) < need:
        raise GGUFTruncated(f"{path}: the file is cut short: it has {len(mm)} bytes, its tensors end at byte {need}")
    return GGUFInfo(path=path, version=version, metadata=meta, array_lengths=lengths,
                    parameter_count=params, tensor_count=n_tensors)
