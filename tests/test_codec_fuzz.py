"""Hostile tensor messages: decode either returns the declared tensor or raises TensorDecodeError."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.proto import pb
from edgeweave.runtime.codec import ITEMSIZE, WIRE_DTYPES, TensorDecodeError, decode, encode

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
