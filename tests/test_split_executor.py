"""The "onnx" executor in process: runs a graph shard, quantizes on request, refuses bad input clearly."""

from __future__ import annotations

import pytest
import torch

from edgeweave.runtime.codec import Quantized, quantize_uint8
from edgeweave.runtime.executor import ExecutorInputError, executor_class
from edgeweave.runtime.ort_sessions import pool_threads
from edgeweave.splitting.onnx_export import export_onnx


@pytest.fixture(scope="module")
def conv_graph(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("onnx") / "g.onnx"
    export_onnx(model, torch.zeros(1, 2, 5, 5), path)
    return model, path


def make(path, **config):
    return executor_class("onnx")({"graph": "g", "threads": 1, **config}, {"g": path}, 0)


def test_runs_float_and_quantized_inputs(conv_graph):
    model, path = conv_graph
    executor = make(path)
    x = torch.rand(4, 2, 5, 5)
    (y,) = executor.forward("run", 0, 0, "", [x])
    with torch.no_grad():
        assert torch.allclose(y, model(x), atol=1e-5)
    q = quantize_uint8(x)
    (yq,) = executor.forward("run", 0, 0, "", [q])
    with torch.no_grad():
        assert torch.allclose(yq, model(q.dequantize()), atol=1e-5)
    # the threads it really runs with: 1, or the process's shared ORT pool once one exists
    assert executor.details()["threads"] == pool_threads() and executor.stats()["runs"] == 2


def test_quantized_output_is_within_half_a_step(conv_graph):
    model, path = conv_graph
    x = torch.rand(1, 2, 5, 5)
    (out,) = make(path, quantize_output=True).forward("run", 0, 0, "", [x])
    assert isinstance(out, Quantized) and out.q.dtype == torch.uint8
    with torch.no_grad():
        assert (out.dequantize() - model(x)).abs().max() <= out.scale / 2 + 1e-6


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([torch.rand(1, 3, 5, 5)], r"shape \['N', 2, 5, 5\]"),
        ([torch.rand(2, 5, 5)], "must have shape"),
        ([torch.rand(1, 2, 5, 5).double()], r"tensor\(float\)"),
        ([torch.rand(1, 2, 5, 5)] * 2, "takes 1 input"),
    ],
)
def test_bad_inputs_get_a_sentence(conv_graph, tensors, message):
    with pytest.raises(ExecutorInputError, match=message):
        make(conv_graph[1]).forward("run", 0, 0, "", tensors)


def test_bad_op_and_config(conv_graph, tmp_path):
    with pytest.raises(ExecutorInputError, match="only knows op 'run'"):
        make(conv_graph[1]).forward("attn", 0, 0, "", [torch.rand(1, 2, 5, 5)])
    with pytest.raises(ExecutorInputError, match="must name one of its shards"):
        executor_class("onnx")({"graph": "missing"}, {"g": conv_graph[1]}, 0)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(ExecutorInputError, match="not a loadable ONNX graph"):
        executor_class("onnx")({"graph": "g"}, {"g": junk}, 0)
