"""Block-quantized weights: the one layout every quantized shard, reader and kernel agrees on.

A linear weight W [N, K] (HF orientation, [out, in]) is cut along K into blocks of `block`
values. Each block has a float32 scale, an integer zero point and, optionally, a float32 offset:

    W[n, k] = scale[n, b] * (q[n, k] - zero[n, b]) + offset[n, b],    b = k // block

`q` holds `bits`-bit unsigned integers (4 or 8). This is ONNX Runtime's `MatMulNBits` layout
(scale, uint8 zero point) plus the offset term, which its kernel cannot hold but which costs
one tiny matmul (block sums of the input times the offsets): with it, GGUF's Q4_1, Q4_K and
Q5_K ("d * q + m" style) map exactly, not through a requantization.

In a shard file a weight `w` is stored as safetensors tensors (never pickled):
    w.q       uint8 [N, K // block, block * bits // 8]   packed: element 2j in the low nibble for 4 bits
    w.scale   float32 [N, K // block]
    w.zero    uint8 [N, K // block]
    w.offset  float32 [N, K // block]   (only when some offset is non-zero)
    w.layout  int32 [3] = bits, block, K
so a tensor-parallel cut along N slices every tensor's first axis, and a cut along K (o_proj's
and down_proj's inputs) slices the block axis: a cut must fall on a block boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

#: the precisions a shard can be written in (`--quantize`)
QUANTIZE_CHOICES = ("q4", "q8", "none")
SUFFIXES = ("q", "scale", "zero", "offset", "layout")


class QuantizationError(ValueError):
    """A quantized tensor that cannot be read, cut or run as asked; the text says why."""


@dataclass
class BlockQuantized:
    """W = scale * (q - zero) + offset, blockwise along the input dimension (see the module docstring)."""

    q: np.ndarray  # uint8 [N, K], unpacked values in [0, 2**bits)
    scale: np.ndarray  # float32 [N, K // block]
    zero: np.ndarray  # uint8 [N, K // block]
    offset: np.ndarray | None  # float32 [N, K // block] or None (all zero)
    bits: int
    block: int

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"only 4- and 8-bit blocks are supported, not {self.bits}-bit")
        n, k = self.q.shape
        if self.block < 16 or self.block & (self.block - 1) or k % self.block:
            raise QuantizationError(f"block size {self.block} must be a power of two >= 16 dividing the row ({k})")
        blocks = (n, k // self.block)
        for name in ("scale", "zero") + (("offset",) if self.offset is not None else ()):
            if getattr(self, name).shape != blocks:
                raise QuantizationError(f"{name} has shape {getattr(self, name).shape}, expected {blocks}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes as stored in a shard."""
        n, k = self.q.shape
        per_block = 4 + 1 + (4 if self.offset is not None else 0)
        return n * k * self.bits // 8 + n * (k // self.block) * per_block

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] (the reference the kernels are checked against)."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.block, self.block).astype(np.float32)
        w = (q - self.zero[..., None].astype(np.float32)) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return torch.from_numpy(np.ascontiguousarray(w.reshape(n, k), dtype=np.float32))


def pack(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """uint8 [N, K] values -> [N, K // block, block * bits // 8] (MatMulNBits' packing)."""
    n, k = q.shape
    blocks = q.reshape(n, k // block, block)
    if bits == 8:
        return np.ascontiguousarray(blocks, dtype=np.uint8)
    return np.ascontiguousarray(blocks[..., 0::2] | (blocks[..., 1::2] << 4), dtype=np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: [N, nb, blob] -> uint8 [N, nb * block]."""
    n, nb, blob = packed.shape
    if bits == 8:
        return packed.reshape(n, nb * blob)
    out = np.empty((n, nb, blob * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out.reshape(n, nb * blob * 2)


def to_shard_tensors(name: str, weight: BlockQuantized) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized weight (see the module docstring)."""
    out = {
        f"{name}.q": torch.from_numpy(pack(weight.q, weight.bits, weight.block)),
        f"{name}.scale": torch.from_numpy(np.ascontiguousarray(weight.scale, dtype=np.float32)),
        f"{name}.zero": torch.from_numpy(np.ascontiguousarray(weight.zero, dtype=np.uint8)),
        f"{name}.layout": torch.tensor([weight.bits, weight.block, weight.q.shape[1]], dtype=torch.int32),
    }
    if weight.offset is not None:
        out[f"{name}.offset"] = torch.from_numpy(np.ascontiguousarray(weight.offset, dtype=np.float32))
    return out


@dataclass
class PackedWeight:
    """A quantized weight as it sits in a loaded shard: packed torch views, ready for a kernel."""

    q: torch.Tensor  # uint8 [N, nb, blob]
    scale: torch.Tensor  # float32 [N, nb]
    zero: torch.Tensor  # uint8 [N, nb]
    offset: torch.Tensor | None
    bits: int
    block: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def nbytes(self) -> int:
        parts = (self.q, self.scale, self.zero) + ((self.offset,) if self.offset is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: what the kernels compute with, written out (tests, embedding rows)."""
        return dequantize_rows(self, slice(None))

    def to_block_quantized(self) -> BlockQuantized:
        offset = None if self.offset is None else self.offset.numpy()
        return BlockQuantized(unpack(self.q.numpy(), self.bits), self.scale.numpy(), self.zero.numpy(), offset,
                              self.bits, self.block)


def dequantize_rows(weight: PackedWeight, rows: slice | torch.Tensor) -> torch.Tensor:
    """float32 rows of the weight (an embedding lookup reads only the rows of its tokens)."""
    packed = weight.q[rows]
    if weight.bits == 8:
        q = packed.to(torch.float32)
    else:
        q = torch.stack(((packed & 0x0F), (packed >> 4)), dim=-1).reshape(*packed.shape[:-1], -1).to(torch.float32)
    w = (q - weight.zero[rows].to(torch.float32).unsqueeze(-1)) * weight.scale[rows].unsqueeze(-1)
    if weight.offset is not None:
        w = w + weight.offset[rows].unsqueeze(-1)
    return w.reshape(w.shape[0], -1)


def is_quantized(tensors: Mapping[str, torch.Tensor], name: str) -> bool:
    return f"{name}.layout" in tensors


def packed_weight(tensors: Mapping[str, torch.Tensor], name: str) -> PackedWeight:
    """The quantized weight `name` from a shard's tensors, checked for consistent shapes."""
    layout = tensors[f"{name}.layout"]
    if layout.dtype != torch.int32 or layout.shape != (3,):
        raise QuantizationError(f"{name}.layout must be int32 [bits, block, K]")
    bits, block, k = (int(v) for v in layout.tolist())
    q, scale, zero = tensors[f"{name}.q"], tensors[f"{name}.scale"], tensors[f"{name}.zero"]
    offset = tensors.get(f"{name}.offset")
    n = q.shape[0] if q.ndim == 3 else -1
    expected = (n, k // block if block else -1, block * bits // 8)
    if bits not in (4, 8) or block <= 0 or k % block or tuple(q.shape) != expected or q.dtype != torch.uint8:
        raise QuantizationError(f"{name}: packed weight of shape {list(q.shape)} does not match bits={bits} "
                                f"block={block} K={k}")
    for part, dtype in ((scale, torch.float32), (zero, torch.uint8)) + (((offset, torch.float32),) if offset is not None else ()):
        if tuple(part.shape) != expected[:2] or part.dtype != dtype:
            raise QuantizationError(f"{name}: per-block tensors must be {dtype} {list(expected[:2])}")
    return PackedWeight(q, scale, zero, offset, bits, block, k)


def slice_packed(tensors: Mapping[str, torch.Tensor], name: str, rows: tuple[int, int] | None = None,
                 columns: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A tensor-parallel cut of one quantized weight: rows [r0, r1) and/or input columns [c0, c1).

    Columns must fall on block boundaries (the caller's plan guarantees it; checked here)."""
    w = packed_weight(tensors, name)
    r = slice(*rows) if rows else slice(None)
    b = slice(None)
    k = w.in_features
    if columns is not None:
        c0, c1 = columns
        if c0 % w.block or c1 % w.block:
            raise QuantizationError(f"{name}: a cut at input columns {c0}..{c1} splits its {w.block}-wide blocks")
        b, k = slice(c0 // w.block, c1 // w.block), c1 - c0
    out = {
        f"{name}.q": w.q[r, b].contiguous(),
        f"{name}.scale": w.scale[r, b].contiguous(),
        f"{name}.zero": w.zero[r, b].contiguous(),
        f"{name}.layout": torch.tensor([w.bits, w.block, k], dtype=torch.int32),
    }
    if w.offset is not None:
        out[f"{name}.offset"] = w.offset[r, b].contiguous()
    return out


def quantized_names(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The base names of the quantized weights among a shard's tensors."""
    return {key[: -len(".layout")] for key in tensors if key.endswith(".layout")}
