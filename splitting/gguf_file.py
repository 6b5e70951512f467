"""A GGUF file's metadata and tensor directory, parsed in tens of milliseconds.

Why not `gguf.GGUFReader`: it builds a numpy memmap view for every part of every metadata value,
so a tokenizer's ~100k strings (SmolLM2's vocabulary and merges) took 2.8 s on a quiet x86 core,
several times that on a Pi, at every coordinator start. The format is simple (a header, typed
key/value pairs, tensor infos, aligned data; ggml's docs/gguf.md), so this reads the header with
`struct` and leaves the tensor bytes memory-mapped. The `gguf` package stays the authority on
quantization types, block sizes and dequantization.

`GGUFFile.fields` maps each key to a plain Python value (str, int, float, bool, or a list of them);
`GGUFFile.tensors` are `GGUFTensor`s whose `data` is what `gguf.quants.dequantize` takes: a typed
array for F32/F16/F64/integers, else uint8 rows of blocks. Malformed files raise `GGUFError`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

#: GGUF value type -> (struct code, numpy dtype) of its scalars (little-endian)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "<u1"), 1: ("b", "<i1"), 2: ("H", "<u2"), 3: ("h", "<i2"), 4: ("I", "<u4"), 5: ("i", "<i4"),
    6: ("f", "<f4"), 7: ("?", "?"), 10: ("Q", "<u8"), 11: ("q", "<i8"), 12: ("d", "<f8"),
}
_STRING, _ARRAY = 8, 9
#: element types whose data is a typed array (not rows of quantized blocks), as gguf's reader gives them
_TYPED = {
    gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands; the text says where and why."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: the fastest-varying dimension first (reversed from torch's)
    n_elements: int
    n_bytes: int
    data: np.ndarray  # a read-only view of the mapped file


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buffer: memoryview) -> None:
        self.buf, self.pos = buffer, 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise GGUFError(f"the file ends at byte {len(self.buf)}, inside a value at byte {self.pos}")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.take(struct.calcsize(code)))
        return value

    def string(self) -> str:
        raw = self.take(self.scalar("Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"a string before byte {self.pos} is not UTF-8") from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in one tight loop (a vocabulary is ~50-150k of them)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > end:
                    raise GGUFError(f"the file ends at byte {end}, inside a string at byte {pos}")
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except struct.error:
            raise GGUFError(f"the file ends at byte {end}, inside a string array") from None
        except UnicodeDecodeError:
            raise GGUFError(f"a string before byte {pos} is not UTF-8") from None
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, count = self.scalar("I"), self.scalar("Q")
            if element == _STRING:
                return self.strings(count)
            if element in _SCALARS:
                dtype = np.dtype(_SCALARS[element][1])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if element == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise GGUFError(f"unknown GGUF array element type {element} at byte {self.pos}")
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind][0])
        raise GGUFError(f"unknown GGUF value type {kind} at byte {self.pos}")


class GGUFFile:
    """The parsed header of one GGUF file; tensor data stays mapped (nothing is read until used)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFError("the file is empty") from None
        cursor = _Cursor(memoryview(self._map))
        if bytes(cursor.take(4)) != MAGIC:
            raise GGUFError("it does not start with the GGUF magic")
        self.version = cursor.scalar("I")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            order = " (a big-endian file)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFError(f"GGUF version {self.version}{order} is not supported; supported: "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))} little-endian")
        n_tensors, n_fields = cursor.scalar("Q"), cursor.scalar("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cursor.string()
            self.fields[key] = cursor.value(cursor.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.scalar("I")
            if n_dims > 8:
                raise GGUFError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = np.frombuffer(cursor.take(8 * n_dims), dtype="<u8").copy()
            infos.append((name, dims, cursor.scalar("I"), cursor.scalar("Q")))
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment must be a power of two, not {alignment!r}")
        self.data_offset = -(-cursor.pos // alignment) * alignment
        self.tensors = [self._tensor(*info) for info in infos]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise GGUFError("it names a tensor twice")

    def _tensor(self, name: str, dims: np.ndarray, raw_type: int, offset: int) -> GGUFTensor:
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        n_elements = int(np.prod(dims, dtype=np.uint64)) if len(dims) else 1
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        if shape and shape[-1] % block:
            raise GGUFError(f"tensor {name!r}: rows of {shape[-1]} are not whole {kind.name} blocks of {block}")
        n_bytes = n_elements // block * type_size
        start = self.data_offset + offset
        if start + n_bytes > len(self._map):
            raise GGUFError(f"tensor {name!r} runs past the end of the file")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=n_bytes, offset=start)
        if kind in _TYPED:
            data = raw.view(_TYPED[kind]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else raw
        return GGUFTensor(name, kind, dims, n_elements, n_bytes, data)
