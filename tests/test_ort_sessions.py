"""The process's ONNX Runtime thread policy (`runtime.ort_sessions`), in a fresh interpreter: ORT's
shared pool can be created once per process, and every session after it must use it."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from edgeweave.runtime.ort_sessions import pool_threads, session_options

graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

def run(threads):
    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist()

seen = [pool_threads(), run(1), pool_threads(), run(2), pool_threads(), run(1), run(3), pool_threads()]
# a session that bypassed the policy after the pool exists is refused by ORT: the reason for one policy
try:
    ort.InferenceSession(model, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    bypass = "accepted"
except Exception:
    bypass = "refused"
print(json.dumps({"seen": seen, "bypass": bypass}))
"""


def test_first_multithreaded_session_creates_the_shared_pool_and_all_later_ones_share_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seen"] == [1, [0.0, 2.0], 1, [0.0, 2.0], 2, [0.0, 2.0], [0.0, 2.0], 2]
    assert result["bypass"] == "refused"
