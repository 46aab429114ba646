"""A safetensors file read from its header, without torch: names, shapes, dtypes and metadata, values only where
asked (an alpha scalar), and a NaN/inf check over the raw bytes. `tools/inspect_file.py` describes a LoRA or an
embedding this way in a fraction of a second; the readers in adapters.py and embeddings.py take these tensors
as they take torch's (they look at names and shapes, and read alphas with `.item()`).

The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header mapping
each name to {dtype, shape, data_offsets} (plus `__metadata__`), then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import ModelError

#: safetensors dtype -> (the torch dtype's name, bytes per element, numpy dtype of the raw element)
DTYPES = {
    "F64": ("float64", 8, "<f8"), "F32": ("float32", 4, "<f4"), "F16": ("float16", 2, "<f2"),
    "BF16": ("bfloat16", 2, "<u2"), "F8_E4M3": ("float8_e4m3fn", 1, "u1"), "F8_E5M2": ("float8_e5m2", 1, "u1"),
    "I64": ("int64", 8, "<i8"), "I32": ("int32", 4, "<i4"), "I16": ("int16", 2, "<i2"), "I8": ("int8", 1, "i1"),
    "U8": ("uint8", 1, "u1"), "BOOL": ("bool", 1, "u1"),
}
#: exponent bits of the formats numpy cannot hold: all ones means inf or NaN (E4M3 has no inf: 0x7f is its NaN)
NONFINITE_BITS = {"BF16": (0x7F80, 0x7F80), "F8_E5M2": (0x7C, 0x7C), "F8_E4M3": (0x7F, 0x7F)}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class Dtype:
    name: str

    def __str__(self) -> str:
        return f"torch.{self.name}"  # as torch prints it: describe_file strips the prefix either way

    @property
    def is_floating_point(self) -> bool:
        return self.name.startswith(("float", "bfloat"))


@dataclass(frozen=True)
class HeaderTensor:
    """What the header says about one tensor; the few torch.Tensor methods the readers call."""

    path: Path
    dtype_code: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def dtype(self) -> Dtype:
        return Dtype(DTYPES[self.dtype_code][0])

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return DTYPES[self.dtype_code][1]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def reshape(self, *shape) -> HeaderTensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else tuple(shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.numel() // known if s == -1 else s for s in shape)
        return HeaderTensor(self.path, self.dtype_code, shape, self.start, self.end)

    def raw(self) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        return np.frombuffer(data, dtype=DTYPES[self.dtype_code][2])

    def item(self) -> float:
        """The value of a one-element tensor (an alpha)."""
        if self.numel() != 1:
            raise ValueError(f"a tensor of {self.numel()} elements has no single value")
        value = self.raw()[0]
        if self.dtype_code == "BF16":  # the upper half of a float32
            return float(np.array([int(value) << 16], dtype="<u4").view("<f4")[0])
        return float(value)


def read_header(path: str | Path) -> tuple[dict[str, HeaderTensor], dict[str, str]]:
    """(tensors, metadata) from a safetensors header; a one-line ModelError for a file that is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file (truncated or corrupt? {e})") from None
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info.get("dtype") not in DTYPES or 8 + n + end > size:
            raise ModelError(f"{path}: tensor '{name}' is not readable ({info.get('dtype')}, ends past the file: "
                             "truncated or corrupt?)")
        tensors[name] = HeaderTensor(path, info["dtype"], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    return tensors, {str(k): str(v) for k, v in meta.items()}


def first_nonfinite(tensors: dict[str, HeaderTensor]) -> tuple[str, int] | None:
    """(name, count) of the first floating tensor holding NaN or inf, read from its raw bytes."""
    for name, t in tensors.items():
        if not t.is_floating_point() or not t.numel():
            continue
        raw = t.raw()
        if t.dtype_code in NONFINITE_BITS:
            mask, bits = NONFINITE_BITS[t.dtype_code]
            bad = int(np.count_nonzero((raw & mask) == bits))
        else:
            bad = int(np.count_nonzero(~np.isfinite(raw)))
        if bad:
            return name, bad
    return None
