"""The "onnx" executor: runs one ONNX graph shard (a split head or tail) with onnxruntime.

Config: {"graph": shard name of the .onnx file, "quantize_output": bool, "threads": int}.
Op "run": inputs in the graph's input order (float tensors, or Quantized ones, which are
dequantized first) -> outputs, quantized to uint8 when `quantize_output` (the BottleFit
bottleneck a device sends) or float otherwise. Inputs are checked against the graph's
declared shapes and dtypes so a wrong tensor gets a sentence, not an onnxruntime trace.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgeweave.runtime.codec import Quantized, quantize_uint8
from edgeweave.runtime.executor import Executor, ExecutorInputError, TensorLike
from edgeweave.runtime.ort_sessions import pool_threads, session_options

#: onnxruntime type string -> torch dtype we accept for it.
ORT_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_providers() -> list[str]:
    """Accelerated providers where this onnxruntime build has them, CPU always last."""
    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


class OnnxExecutor(Executor):
    kind = "onnx"

    def __init__(self, config, shards, memory_budget, file_checks=None):
        super().__init__(config, shards, memory_budget, file_checks)
        graph = config.get("graph")
        if not isinstance(graph, str) or graph not in shards:
            raise ExecutorInputError(
                f"onnx job config 'graph' must name one of its shards ({', '.join(sorted(shards)) or 'none sent'}), "
                f"got {graph!r}"
            )
        threads = config.get("threads") or usable_cores()
        if not isinstance(threads, int) or threads < 1:
            raise ExecutorInputError(f"onnx job config 'threads' must be a positive integer, got {threads!r}")
        self.quantize_output = bool(config.get("quantize_output", False))
        try:  # the process's ORT thread policy: `runtime.ort_sessions`
            self.session = ort.InferenceSession(str(shards[graph]), session_options(threads),
                                                providers=choose_providers())
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ExecutorInputError(f"shard {graph!r} is not a loadable ONNX graph: {exc}") from None
        self.threads = pool_threads()
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.runs = 0
        self.compute_s = 0.0
        self._lock = threading.Lock()

    def details(self) -> dict[str, Any]:
        return {
            "inputs": [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in self.inputs],
            "outputs": self.output_names,
            "providers": self.session.get_providers(),
            "threads": self.threads,
            "quantize_output": self.quantize_output,
        }

    def _feed(self, tensors: list[TensorLike]) -> dict[str, np.ndarray]:
        if len(tensors) != len(self.inputs):
            raise ExecutorInputError(f"this graph takes {len(self.inputs)} input tensor(s), got {len(tensors)}")
        feed = {}
        for spec, tensor in zip(self.inputs, tensors, strict=True):
            if isinstance(tensor, Quantized):
                tensor = tensor.dequantize()
            want = ORT_TYPES.get(spec.type)
            if want is None or tensor.dtype != want:
                raise ExecutorInputError(f"input {spec.name!r} must be {spec.type}, got a {tensor.dtype} tensor")
            shape = list(tensor.shape)
            if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d != got for d, got in zip(spec.shape, shape, strict=False)
            ):
                expected = ["N" if not isinstance(d, int) else d for d in spec.shape]
                raise ExecutorInputError(f"input {spec.name!r} must have shape {expected}, got {shape}")
            feed[spec.name] = tensor.contiguous().numpy()
        return feed

    def forward(self, op, layer, position, session, tensors, rows=None):
        if rows:
            raise ExecutorInputError("the onnx executor takes no batch rows (it keeps no sessions)")
        if op != "run":
            raise ExecutorInputError(f"the onnx executor only knows op 'run', not {op!r}")
        feed = self._feed(tensors)
        start = time.perf_counter()
        with self._lock:
            outputs = self.session.run(self.output_names, feed)
        self.compute_s += time.perf_counter() - start
        self.runs += 1
        result: list[TensorLike] = []
        for out in outputs:
            tensor = torch.from_numpy(np.ascontiguousarray(out))
            result.append(quantize_uint8(tensor) if self.quantize_output and tensor.is_floating_point() else tensor)
        return result

    def stats(self) -> dict[str, Any]:
        return {"runs": self.runs, "onnx_compute_s": round(self.compute_s, 6)}

    def close(self) -> None:
        self.session = None
