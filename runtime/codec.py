"""Tensor codec: torch.Tensor <-> raw bytes + dtype + shape (+ uint8 quantization).

This is the one place where tensors become bytes and back. It knows nothing of
protobuf: `encode` returns the keyword arguments of a `Tensor` message and `decode`
reads any object with the same attribute names, so `runtime` stays free of networking
and every caller (node, coordinator, tests) shares the same validation.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

#: wire name -> torch dtype. bfloat16 has no numpy dtype; it travels as its raw 2-byte words.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
TORCH_TO_WIRE: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in WIRE_DTYPES.items()}
#: a numpy view type of the same width for each wire dtype, used to rebuild tensors without copies.
_NUMPY_VIEW: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


class TensorDecodeError(ValueError):
    """A tensor message that cannot be turned back into a tensor; the text says why."""


class TensorMessage(Protocol):
    dtype: str
    shape: Any
    data: bytes
    quantized: bool
    scale: float
    zero_point: int
    orig_dtype: str


@dataclass(frozen=True)
class Quantized:
    """An affine uint8 tensor: real = scale * (q - zero_point)."""

    q: torch.Tensor
    scale: float
    zero_point: int
    orig_dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return ((self.q.to(torch.float32) - self.zero_point) * self.scale).to(self.orig_dtype)


def quantize_uint8(x: torch.Tensor) -> Quantized:
    """Min/max affine quantization to 8 bits; error is at most half a step (scale / 2)."""
    xf = x.detach().to(torch.float32)
    lo = min(float(xf.min()), 0.0) if xf.numel() else 0.0
    hi = max(float(xf.max()), 0.0) if xf.numel() else 0.0
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(round(-lo / scale))
    zero_point = max(0, min(255, zero_point))
    q = torch.clamp(torch.round(xf / scale) + zero_point, 0, 255).to(torch.uint8)
    return Quantized(q=q, scale=float(np.float32(scale)), zero_point=zero_point, orig_dtype=x.dtype)


def encode(tensor: torch.Tensor | Quantized) -> dict[str, Any]:
    """Keyword arguments for a `Tensor` message holding `tensor` bit-exactly."""
    if isinstance(tensor, Quantized):
        fields = encode(tensor.q)
        fields.update(
            quantized=True,
            scale=tensor.scale,
            zero_point=tensor.zero_point,
            orig_dtype=TORCH_TO_WIRE[tensor.orig_dtype],
        )
        return fields
    wire = TORCH_TO_WIRE.get(tensor.dtype)
    if wire is None:
        raise TypeError(f"cannot send a {tensor.dtype} tensor; supported: {', '.join(WIRE_DTYPES)}")
    # Every message of a decode step comes through here: only the torch calls a tensor needs (each
    # costs microseconds on a node whose caches went cold while it waited for the message).
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_cpu:
        t = t.cpu()
    if wire == "bfloat16":
        t = t.view(torch.int16)
    # numpy's tobytes() writes C order from any strides: no separate contiguous() copy needed
    return {"dtype": wire, "shape": list(tensor.shape), "data": t.numpy().tobytes()}


def _checked(msg: TensorMessage) -> tuple[str, list[int], bytes]:
    """(dtype, shape, data) of a message whose byte count matches its shape and dtype.

    A handful of Python calls whatever the rank or size (this runs for every tensor of every
    Forward), and `data` is read once: each read of a protobuf bytes field is a fresh copy.
    """
    dtype = msg.dtype
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is None:
        raise TensorDecodeError(
            f"unknown tensor dtype {dtype!r}; expected one of {', '.join(WIRE_DTYPES)}"
        )
    shape = list(map(int, msg.shape))
    if shape and min(shape) < 0:
        raise TensorDecodeError(f"tensor shape {shape} has a negative dimension")
    data = msg.data
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise TensorDecodeError(
            f"tensor of dtype {dtype} and shape {shape} needs {expected} bytes but the message "
            f"carries {len(data)}"
        )
    return dtype, shape, data


def decode_raw(msg: TensorMessage) -> torch.Tensor:
    """The tensor exactly as sent (still uint8 if quantized). Raises TensorDecodeError."""
    dtype, shape, data = _checked(msg)
    if not data:  # no elements (np.frombuffer refuses an empty buffer on older numpy)
        return torch.empty(shape, dtype=WIRE_DTYPES[dtype])
    # One copy into a writable bytearray that the tensor then owns, viewed through numpy (cheaper
    # calls than torch.frombuffer + reshape). The wire is little-endian: a big-endian host converts.
    view = _NUMPY_VIEW[dtype]
    array = np.frombuffer(bytearray(data), dtype=view).reshape(shape)
    if not _LITTLE_ENDIAN_HOST:
        array = array.astype(view.newbyteorder("="))
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _quantized(msg: TensorMessage) -> Quantized:
    """A quantized message as uint8 plus its parameters, every one checked. Raises TensorDecodeError."""
    q = decode_raw(msg)
    if msg.dtype != "uint8":
        raise TensorDecodeError(f"a quantized tensor must travel as uint8, not {msg.dtype}")
    orig = msg.orig_dtype or "float32"
    if orig not in WIRE_DTYPES or not WIRE_DTYPES[orig].is_floating_point:
        raise TensorDecodeError(f"a quantized tensor must restore to a float dtype, not {orig!r}")
    scale = msg.scale
    if not math.isfinite(scale) or scale <= 0:
        raise TensorDecodeError(f"quantization scale must be a positive finite number, not {scale}")
    zero_point = msg.zero_point
    if not 0 <= zero_point <= 255:
        raise TensorDecodeError(f"quantization zero point must be in 0..255, not {zero_point}")
    return Quantized(q, float(scale), int(zero_point), WIRE_DTYPES[orig])


def decode(msg: TensorMessage) -> torch.Tensor:
    """The tensor a message holds, dequantized if it was quantized. Raises TensorDecodeError."""
    if getattr(msg, "quantized", False):
        return _quantized(msg).dequantize()
    return decode_raw(msg)


def decode_quantized(msg: TensorMessage) -> Quantized:
    """Keep a quantized message as uint8 plus its parameters (for executors that dequantize late).
    Checked exactly as `decode` checks it, without decoding or dequantizing it a second time."""
    if not getattr(msg, "quantized", False):
        raise TensorDecodeError("expected a quantized tensor")
    return _quantized(msg)
