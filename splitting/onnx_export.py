"""Export split halves to ONNX (TorchScript exporter, dynamic batch) and check them with onnxruntime.

The device and the server run ONNX graphs, never Python code they were sent; this is where
torch modules become those graphs. `check_onnx` compares onnxruntime with torch on a sample.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgeweave.runtime.ort_sessions import session_options

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class OnnxMismatchError(AssertionError):
    """onnxruntime and torch disagree on an exported graph beyond the tolerance."""


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path | None = None) -> bytes:
    """Serialized ONNX of `module` (eval mode, batch dimension dynamic); also written to `path` if given."""
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        module.train(was_training)
    data = buffer.getvalue()
    import onnx  # here, not at the top: its import (~0.8 s) would slow every `edgeweave` command

    onnx.checker.check_model(onnx.load_from_string(data))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def check_onnx(graph: bytes, module: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| on `example`; raises OnnxMismatchError above `atol`."""
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    module.eval()
    with torch.no_grad():
        want = module(example).numpy()
    if got.shape != want.shape:
        raise OnnxMismatchError(f"onnx output shape {got.shape} differs from torch {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if diff > atol:
        raise OnnxMismatchError(f"onnx and torch differ by {diff:.2e} (> {atol:.0e})")
    return diff
