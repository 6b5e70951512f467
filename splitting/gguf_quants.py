"""GGUF quantized tensors as `BlockQuantized` weights, exactly, and HF float weights quantized into the same layout.

A GGUF file's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K blocks are all of the form
`scale * (q - zero) + offset` per block of 16 or 32 values, so `decode` re-expresses them in
the runtime's one layout (see edgeweave.runtime.quantized) without a lossy requantization:
dequantizing the result gives bit for bit what `gguf.quants.dequantize` gives. The K-quants'
super-blocks of 256 become 8 (or 16) ordinary blocks whose scale is d * sc[j] (and offset
-dmin * m[j]), computed in float32 as llama.cpp does.

`quantize` is the other way in: a float weight from an HF checkpoint (`--quantize q4|q8`).

Everything is vectorized numpy over the whole tensor (no loop over blocks), so a 49152 x 576
embedding decodes in a fraction of a second. The gguf reader's memmapped bytes are only read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import gguf
import numpy as np
import torch

from edgeweave.runtime.quantized import BlockQuantized, QuantizationError

_T = gguf.GGMLQuantizationType

#: tensor types that are plain floats (read directly, not through `decode`)
FLOAT_TYPES = frozenset({_T.F32, _T.F16, _T.BF16})

_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | int, np.ndarray | None, int, int]
# (q [n_blocks, values], scale [n_blocks, sub], zero [n_blocks, sub] or a constant, offset or None, bits, block)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of every GGUF block, as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: low nibbles first, then high ones (the order ggml uses within a 32-run)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> two uint8 [n_blocks, 8] (get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), axis=-1)
    mn = np.concatenate((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), axis=-1)
    return sc, mn


def _q8_0(b: np.ndarray) -> _Decoded:
    # int8 v + 128 as a byte is the byte with its sign bit flipped
    return b[:, 2:] ^ np.uint8(0x80), _f16(b, 0), 128, None, 8, 32


def _q4_0(b: np.ndarray) -> _Decoded:
    return _nibbles(b[:, 2:18]), _f16(b, 0), 8, None, 4, 32


def _q4_1(b: np.ndarray) -> _Decoded:
    return _nibbles(b[:, 4:20]), _f16(b, 0), 0, _f16(b, 2), 4, 32


def _fifth_bit(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32-bit little-endian qh -> bit j (the 5th bit of element j) as uint8 [n_blocks, 32]."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q5_0(b: np.ndarray) -> _Decoded:
    q = _nibbles(b[:, 6:22]) | (_fifth_bit(b[:, 2:6]) << 4)
    return q, _f16(b, 0), 16, None, 8, 32


def _q5_1(b: np.ndarray) -> _Decoded:
    q = _nibbles(b[:, 8:24]) | (_fifth_bit(b[:, 4:8]) << 4)
    return q, _f16(b, 0), 0, _f16(b, 2), 8, 32


def _k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's per-32 scale d*sc[j] and offset -dmin*m[j], float32 [n_blocks, 8]."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * mn.astype(np.float32))


def _q4_k(b: np.ndarray) -> _Decoded:
    # per 64 values, 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 256)
    scale, offset = _k4_scales(b)
    return q, scale, 0, offset, 4, 32


def _q5_k(b: np.ndarray) -> _Decoded:
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    # bit i of qh byte l is the 5th bit of element 32 * i + l
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    scale, offset = _k4_scales(b)
    return (low | (high << 4)).reshape(-1, 256), scale, 0, offset, 8, 32


def _q6_k(b: np.ndarray) -> _Decoded:
    # per 128 values: 64 ql bytes (low nibbles = values 0..63, high = 64..127) and 32 qh bytes
    # (2-bit fields at shifts 0, 2, 4, 6 = values 0..31, 32..63, 64..95, 96..127)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql & 0x0F).reshape(-1, 256) | ((qh & 0x03).reshape(-1, 256) << 4)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return q, _f16(b, 208) * sc, 32, None, 8, 16


_DECODERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], _Decoded]] = {
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

#: GGUF tensor types that `decode` maps exactly onto `BlockQuantized`
SUPPORTED_TYPES = frozenset(_DECODERS)


def _type_name(qtype: object) -> str:
    return getattr(qtype, "name", str(qtype))


def decode(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> BlockQuantized:
    """A GGUF tensor's bytes (`ReaderTensor.data`) as the exact `BlockQuantized` weight of HF shape (N, K).

    Exact so that a GGUF model runs with the very weights llama.cpp would use; `raw` is never written."""
    with contextlib.suppress(ValueError):  # an unknown number is reported as unsupported below
        qtype = gguf.GGMLQuantizationType(qtype)
    decoder = _DECODERS.get(qtype)  # type: ignore[call-overload]
    if decoder is None:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        kind = "a float type, read it as a plain tensor" if qtype in FLOAT_TYPES else "not supported"
        raise QuantizationError(f"GGUF tensor type {_type_name(qtype)} is {kind}; block-quantized types supported: "
                                f"{supported}")
    n, k = (int(v) for v in shape)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n <= 0 or k <= 0 or k % block_size:
        raise QuantizationError(f"a {_type_name(qtype)} tensor of shape {(n, k)} is impossible: its rows must be a "
                                f"positive multiple of {block_size} values")
    data = np.asarray(raw)
    if data.dtype != np.uint8:
        raise QuantizationError(f"{_type_name(qtype)} data must be raw uint8 bytes, not {data.dtype}")
    expected = n * (k // block_size) * type_size
    if data.size != expected:
        raise QuantizationError(f"a {_type_name(qtype)} tensor of shape {(n, k)} needs {expected} bytes but "
                                f"{data.size} were given (truncated or mis-shaped data)")
    q, scale, zero, offset, bits, block = decoder(data.reshape(-1, type_size))
    blocks = (n, k // block)
    scale = np.ascontiguousarray(scale.reshape(blocks), dtype=np.float32)
    if isinstance(zero, int):
        zero = np.full(blocks, zero, dtype=np.uint8)
    if offset is not None:
        offset = np.ascontiguousarray(offset.reshape(blocks), dtype=np.float32) if np.any(offset) else None
    return BlockQuantized(np.ascontiguousarray(q.reshape(n, k), dtype=np.uint8), scale, zero, offset, bits, block)


def quantize(weight: torch.Tensor | np.ndarray, bits: int, block: int = 32) -> BlockQuantized:
    """A float weight [N, K] quantized blockwise (8 bits: symmetric; 4 bits: integer zero point, 0 exact).

    Round to nearest, so every element is within scale / 2 of the original."""
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise QuantizationError(f"only 2-D weights can be block-quantized, not shape {list(w.shape)}")
    if bits not in (4, 8):
        raise QuantizationError(f"only 4- and 8-bit quantization is supported, not {bits}-bit")
    n, k = w.shape
    if block < 16 or block & (block - 1) or k % block:
        raise QuantizationError(f"a row of {k} values cannot be cut into blocks of {block} "
                                "(a power of two >= 16 dividing the row)")
    if not np.isfinite(w).all():
        raise QuantizationError("the weight holds NaN or infinite values, which cannot be quantized")
    blocks = w.reshape(n, k // block, block)
    if bits == 8:
        scale = np.abs(blocks).max(axis=-1) / np.float32(127)
        scale[scale == 0] = 1.0  # an all-zero block: any scale keeps it exactly zero
        q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
        zero = np.full(scale.shape, 128, dtype=np.uint8)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0)
        hi = np.maximum(blocks.max(axis=-1), 0)
        scale = (hi - lo) / np.float32(15)
        scale[scale == 0] = 1.0
        zero_f = np.clip(np.rint(-lo / scale), 0, 15)
        q = np.clip(np.rint(blocks / scale[..., None]) + zero_f[..., None], 0, 15)
        zero = zero_f.astype(np.uint8)
    return BlockQuantized(q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), zero, None, bits, block)
