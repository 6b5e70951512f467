"""Write safetensors files whose data section is laid out for readers that take byte ranges of the file.

`safetensors.torch.save_file` orders tensors by dtype, then by name, so the blocks of q, k and v
(`wk.q`, `wk.zero`, `wq.q`, ...) end up interleaved. ONNX Runtime can read a weight straight from
a file (ONNX external data: a file, an offset, a length) instead of from a copy in the graph,
which saves a node two copies of every weight (`runtime.ort_quantized`), but only when a fused
group's tensors (q|k|v, gate|up) are one contiguous range. This writer keeps the format exactly
(8-byte header length, JSON header padded to 8 bytes, data without holes, readable by
`safetensors.safe_open`) and picks the order:

    wider dtypes first (every tensor stays aligned to its element size, as safetensors' own
    writer guarantees), then by the kind of tensor (all `.q`, then `.scale`, ...), then by
    projection in `PROJECTIONS` order (wq, wk, wv, wo, w_gate, w_up, w_down), then by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from edgeweave.runtime.layer_compute import PROJECTIONS
from edgeweave.runtime.quantized import SUFFIXES

#: torch dtype -> safetensors dtype name (those `runtime.safetensors_read` reads back)
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def data_order(names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order of the data section (see the module docstring)."""

    def key(name: str) -> tuple[int, int, int, str]:
        stem, _, suffix = name.rpartition(".")
        kind = SUFFIXES.index(suffix) if stem and suffix in SUFFIXES else len(SUFFIXES)
        projection = PROJECTIONS.index(stem) if stem in PROJECTIONS else len(PROJECTIONS)
        return -tensors[name].element_size(), kind, projection, name

    return sorted(names, key=key)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` as safetensors, in `data_order`. Written in place: callers that
    need atomicity write to a temporary name and rename."""
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which a safetensors shard cannot hold")
    order = data_order(list(tensors), tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors' writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)  # no copy: numpy's buffer straight to the file
