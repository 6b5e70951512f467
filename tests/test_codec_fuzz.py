"""Hostile tensor messages: decode either returns the declared tensor or raises TensorDecodeError."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.proto import pb
from edgeweave.runtime.codec import (
    ITEMSIZE,
    WIRE_DTYPES,
    TensorDecodeError,
    decode,
    decode_quantized,
    encode,
    quantize_uint8,
)

dtype_names = st.one_of(st.sampled_from(sorted(WIRE_DTYPES)), st.text(max_size=12))
shapes = st.lists(st.integers(min_value=-3, max_value=9), max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    dtype=dtype_names,
    shape=shapes,
    data=st.binary(max_size=600),
    quantized=st.booleans(),
    scale=st.floats(allow_nan=True, allow_infinity=True, width=32),
    zero_point=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    orig=dtype_names,
)
def test_decode_never_crashes(dtype, shape, data, quantized, scale, zero_point, orig):
    msg = pb.Tensor(
        dtype=dtype, shape=shape, data=data, quantized=quantized, scale=scale, zero_point=zero_point, orig_dtype=orig
    )
    try:
        tensor = decode(msg)
    except TensorDecodeError as exc:
        assert str(exc)  # a sentence, never empty
        return
    assert list(tensor.shape) == shape
    assert len(data) == math.prod(shape) * ITEMSIZE[dtype]


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(sorted(WIRE_DTYPES)),
    shape=st.lists(st.integers(min_value=0, max_value=6), max_size=3),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_round_trip_bit_exact(dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * ITEMSIZE[dtype],), dtype=torch.uint8, generator=gen)
    if dtype == "bool":
        raw = raw % 2
    tensor = raw.view(WIRE_DTYPES[dtype]).reshape(shape)
    back = decode(pb.Tensor(**encode(tensor)))
    assert back.dtype == tensor.dtype
    assert torch.equal(back.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))  # bitwise, NaNs included


def test_decoded_tensor_is_writable_and_owns_its_memory():
    """The coordinator sums partials in place into a decoded reply: that must not warn or touch the message."""
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = pb.Tensor(**encode(x))
    y = decode(msg)
    y += 1
    assert torch.equal(y, x + 1)
    assert torch.equal(decode(msg), x)  # the message's bytes are unchanged


def test_strided_and_grad_tensors_encode_as_their_contiguous_values():
    """encode copies through numpy's C-order tobytes, not a torch contiguous(): views with any
    strides (transposed, sliced, expanded, bfloat16) and tensors needing grad travel as their values."""
    base = torch.randn(4, 6)
    cases = [base.t(), base[1:, ::2], torch.randn(1, 5).expand(3, 5), base.to(torch.bfloat16)[:, ::3],
             torch.randn(2, 3, requires_grad=True), torch.arange(10)[2:9:3], torch.tensor(2.5)]
    for t in cases:
        back = decode(pb.Tensor(**encode(t)))
        want = t.detach().contiguous()
        assert back.dtype == want.dtype and back.shape == want.shape
        assert torch.equal(back.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_decode_quantized_checks_like_decode_without_dequantizing():
    q = quantize_uint8(torch.randn(3, 8))
    msg = pb.Tensor(**encode(q))
    kept = decode_quantized(msg)
    assert torch.equal(kept.q, q.q) and (kept.scale, kept.zero_point, kept.orig_dtype) == (q.scale, q.zero_point, torch.float32)
    assert torch.equal(kept.dequantize(), decode(msg))
    msg.orig_dtype = ""  # decode restores float32 then; decode_quantized used to fail with a KeyError
    assert decode_quantized(msg).orig_dtype is torch.float32
    for bad in (dict(scale=0.0), dict(zero_point=256), dict(orig_dtype="int64"), dict(data=b"\0")):
        broken = pb.Tensor(**{**encode(q), **bad})
        try:
            decode(broken)
        except TensorDecodeError as exc:
            expected = str(exc)
        with pytest.raises(TensorDecodeError) as info:
            decode_quantized(broken)
        assert str(info.value) == expected
