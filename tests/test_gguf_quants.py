"""GGUF blocks -> BlockQuantized must be exact, and the runtime's quantized layout must survive shards and cuts.

The reference is gguf-py's own dequantizer, on tensors written to and read back from a real .gguf file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgeweave.runtime.quantized import (
    BlockQuantized,
    QuantizationError,
    pack,
    packed_weight,
    slice_packed,
    to_shard_tensors,
    unpack,
)
from edgeweave.splitting.gguf_quants import FLOAT_TYPES, SUPPORTED_TYPES, decode, quantize

T = gguf.GGMLQuantizationType
#: types gguf-py can quantize itself; for the others (K-quants) we write random but valid blocks
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
#: byte offsets of the float16 fields (d, dmin, m) in each type's block: they must be finite
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
              T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
LAYOUT = {T.Q8_0: (8, 32), T.Q4_0: (4, 32), T.Q4_1: (4, 32), T.Q5_0: (8, 32), T.Q5_1: (8, 32),
          T.Q4_K: (4, 32), T.Q5_K: (8, 32), T.Q6_K: (8, 16)}
SHAPE = (64, 512)


def random_blocks(qtype: T, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random bytes [N, bytes_per_row] for `qtype` with finite float16 scale fields (every q and sc value occurs)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = shape
    blocks = rng.integers(0, 256, (n * k // block_size, type_size), dtype=np.uint8)
    for start in F16_FIELDS[qtype]:
        values = rng.uniform(-0.1, 0.1, (len(blocks), 1)).astype(np.float16)
        blocks[:, start : start + 2] = values.view(np.uint8)
    return blocks.reshape(n, -1)


def write_and_read(path: Path, qtype: T, shape: tuple[int, int]) -> gguf.ReaderTensor:
    """One tensor of `qtype` through a real .gguf file."""
    if qtype in QUANTIZABLE:
        weights = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        weights[:, :32] = 0  # an all-zero block
        raw = gguf.quants.quantize(weights, qtype)
    else:
        raw = random_blocks(qtype, shape)
    writer = gguf.GGUFWriter(str(path), "llama")
    # for uint8 data with raw_dtype, raw_shape is the *byte* shape [N, bytes_per_row]
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype
    return tensor


def check_exact(result: BlockQuantized, raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> None:
    assert result.shape == shape
    assert (result.bits, result.block) == LAYOUT[qtype]
    assert result.q.dtype == np.uint8 and int(result.q.max()) < 2**result.bits
    expected = gguf.quants.dequantize(raw, qtype).reshape(shape)
    np.testing.assert_array_equal(result.dequantize().numpy(), expected)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_decode_matches_gguf_through_a_file(tmp_path: Path, qtype: T) -> None:
    tensor = write_and_read(tmp_path / "model.gguf", qtype, SHAPE)
    shape = tuple(reversed(tensor.shape.tolist()))
    assert shape == SHAPE
    assert not tensor.data.flags.writeable  # the reader's memmap: decode must only read it
    check_exact(decode(tensor.data, tensor.tensor_type, shape), tensor.data, qtype, shape)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_decode_matches_gguf_on_random_blocks(qtype: T) -> None:
    """Random bytes reach values gguf's quantizers never write (int8 -128, every 6-bit scale and min)."""
    shape = (48, 768)
    raw = random_blocks(qtype, shape, seed=int(qtype))
    raw.flags.writeable = False
    check_exact(decode(raw, qtype, shape), raw, qtype, shape)


def test_k_quant_offsets_are_kept() -> None:
    result = decode(random_blocks(T.Q4_K, SHAPE), T.Q4_K, SHAPE)
    assert result.offset is not None and result.offset.shape == (64, 16)
    assert decode(random_blocks(T.Q8_0, SHAPE), T.Q8_0, SHAPE).offset is None


def test_float_and_supported_types() -> None:
    assert {T.F32, T.F16, T.BF16} <= FLOAT_TYPES
    assert not FLOAT_TYPES & SUPPORTED_TYPES
    assert set(LAYOUT) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_NL, T.F16], ids=lambda t: t.name)
def test_unsupported_type_is_refused(qtype: T) -> None:
    with pytest.raises(QuantizationError, match=qtype.name):
        decode(np.zeros((4, 1024), dtype=np.uint8), qtype, (4, 256))


def test_truncated_data_is_refused() -> None:
    raw = random_blocks(T.Q4_K, SHAPE)
    with pytest.raises(QuantizationError, match="bytes"):
        decode(raw[:, :-1], T.Q4_K, SHAPE)
    with pytest.raises(QuantizationError, match="bytes"):
        decode(raw.reshape(-1)[:-144], T.Q4_K, SHAPE)


def test_row_not_a_multiple_of_the_type_block_is_refused() -> None:
    with pytest.raises(QuantizationError, match="multiple of 256"):
        decode(np.zeros(4 * 576, dtype=np.uint8), T.Q4_K, (4, 576))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_quantize_round_trip_within_half_a_step(bits: int, block: int) -> None:
    rng = np.random.default_rng(bits * 100 + block)
    w = rng.standard_normal((32, 256)).astype(np.float32) * rng.uniform(0.01, 10, (32, 1)).astype(np.float32)
    w[:, 64:96] = np.abs(w[:, 64:96])  # blocks that are all positive: 0 must still be in range for 4 bits
    result = quantize(torch.from_numpy(w), bits, block)
    assert (result.bits, result.block, result.shape) == (bits, block, w.shape)
    assert int(result.q.max()) < 2**bits
    error = np.abs(result.dequantize().numpy() - w).reshape(32, -1, block)
    bound = result.scale[..., None] / 2 * (1 + 1e-5) + 1e-6
    assert (error <= bound).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_keeps_zeros_exact(bits: int) -> None:
    w = np.random.default_rng(bits).standard_normal((8, 128)).astype(np.float32)
    w[:, :32] = 0  # an all-zero block
    w[:, 40::7] = 0  # zeros inside non-zero blocks (4 bits: the integer zero point)
    deq = quantize(w, bits).dequantize().numpy()
    assert (deq[:, :32] == 0).all()
    assert (deq[:, 40::7] == 0).all()


def test_quantize_accepts_bfloat16() -> None:
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    result = quantize(w, 8)
    assert torch.allclose(result.dequantize(), w.float(), atol=float(result.scale.max()))


def test_quantize_refuses_bad_input() -> None:
    with pytest.raises(QuantizationError, match="blocks of 32"):
        quantize(np.zeros((4, 48), dtype=np.float32), 4)
    with pytest.raises(QuantizationError, match="bit"):
        quantize(np.zeros((4, 64), dtype=np.float32), 3)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(np.full((4, 64), np.nan, dtype=np.float32), 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 2**bits, (6, 128), dtype=np.uint8)
    packed = pack(q, bits, 32)
    assert packed.shape == (6, 4, 32 * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits), q)


def _weights() -> list[BlockQuantized]:
    w = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32)
    return [quantize(w, 4), quantize(w, 8, 64), decode(random_blocks(T.Q4_K, SHAPE), T.Q4_K, SHAPE),
            decode(random_blocks(T.Q6_K, SHAPE), T.Q6_K, SHAPE)]


@pytest.mark.parametrize("index", range(4), ids=["q4", "q8-block64", "Q4_K-offset", "Q6_K-block16"])
def test_shard_tensors_and_cuts(index: int) -> None:
    weight = _weights()[index]
    full = weight.dequantize()
    tensors = to_shard_tensors("w", weight)
    assert ("w.offset" in tensors) == (weight.offset is not None)
    packed = packed_weight(tensors, "w")
    assert torch.equal(packed.dequantize(), full)
    assert torch.equal(packed.to_block_quantized().dequantize(), full)

    c0, c1 = 2 * weight.block, 6 * weight.block
    cut = slice_packed(tensors, "w", rows=(8, 40), columns=(c0, c1))
    assert torch.equal(packed_weight(cut, "w").dequantize(), full[8:40, c0:c1])
    assert torch.equal(packed_weight(slice_packed(tensors, "w", rows=(0, 16)), "w").dequantize(), full[:16])
    with pytest.raises(QuantizationError, match="splits"):
        slice_packed(tensors, "w", columns=(c0 + 8, c1))
