"""Hostile requests against a real node: every answer is a reply or a clear gRPC status, never a
crash, a hang or an INTERNAL error, and the node keeps serving its members afterwards."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeweave.coordinator.client import NodeClient
from edgeweave.proto import pb
from edgeweave.runtime.codec import encode

CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.DATA_LOSS}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(local_node):
    with NodeClient(local_node.addresses[0], timeout=10) as c:
        c.load("fuzz-echo", "echo", {}, {})
        yield c


def _tensor_messages():
    good = st.builds(lambda n: pb.Tensor(**encode(torch.arange(n, dtype=torch.float32))), st.integers(0, 64))
    bad = st.builds(
        pb.Tensor,
        dtype=st.sampled_from(["float32", "int64", "complex64", "", "bfloat16"]),
        shape=st.lists(st.integers(-2, 5), max_size=3),
        data=st.binary(max_size=64),
        quantized=st.booleans(),
        scale=st.floats(allow_nan=True, width=32),
        zero_point=st.integers(-5, 300),
    )
    return st.lists(st.one_of(good, bad), max_size=3)


def _expect_clear(exc: grpc.RpcError) -> None:
    assert exc.code() in CLEAR, f"unclear status {exc.code()}: {exc.details()}"
    assert exc.details() and len(exc.details()) > 10


@FUZZ
@given(
    job=st.sampled_from(["fuzz-echo", "", "missing-job", "../etc"]),
    op=st.sampled_from(["echo", "attn", "mlp", "reset", "", "\x00"]),
    layer=st.integers(-(2**31), 2**31 - 1),
    position=st.integers(-(2**40), 2**40),
    tensors=_tensor_messages(),
)
def test_forward_stream_fuzz(client, job, op, layer, position, tensors):
    request = pb.ForwardRequest(job_id=job, seq=7, op=op, layer=layer, position=position, tensors=tensors)
    try:
        replies = list(client.stub.Forward(iter([request]), timeout=10))
    except grpc.RpcError as exc:
        _expect_clear(exc)
        return
    assert job == "fuzz-echo" and op == "echo"
    assert [r.seq for r in replies] == [7] and len(replies[0].tensors) == len(tensors)


@FUZZ
@given(
    kind=st.sampled_from(["echo", "tp_llm", "onnx", "python", ""]),
    config=st.one_of(st.just("{}"), st.just("[1]"), st.just("{bad json"), st.text(max_size=40),
                     st.just('{"model": {"hidden_size": -1}, "rank": 0}')),
    shards=st.lists(st.tuples(st.text(max_size=12), st.text(alphabet="0123456789abcdef", max_size=64)), max_size=2),
)
def test_load_fuzz(client, kind, config, shards):
    request = pb.LoadRequest(job_id="fuzz-load", kind=kind, config_json=config,
                             shards=[pb.ShardRef(name=n, sha256=d) for n, d in shards])
    try:
        client.stub.Load(request, timeout=10)
    except grpc.RpcError as exc:
        _expect_clear(exc)


@FUZZ
@given(
    name=st.one_of(st.just("ok.bin"), st.just("../../escape"), st.just("a/b"), st.text(max_size=10)),
    chunks=st.lists(st.tuples(st.integers(0, 64), st.binary(max_size=32)), min_size=0, max_size=4),
    claim=st.sampled_from(["right", "wrong", "garbage"]),
    size_delta=st.integers(-3, 3),
)
def test_put_shard_fuzz(client, name, chunks, claim, size_delta):
    payload = b"".join(data for _, data in chunks)
    digest = {"right": hashlib.sha256(payload).hexdigest(), "wrong": hashlib.sha256(b"x" + payload).hexdigest(),
              "garbage": "not-a-digest"}[claim]
    size = max(0, len(payload) + size_delta)
    messages = [pb.ShardChunk(name=name, sha256=digest, size=size, offset=off, data=d) for off, d in chunks]
    try:
        reply = client.stub.PutShard(iter(messages), timeout=10)
    except grpc.RpcError as exc:
        _expect_clear(exc)
        return
    # accepted only when everything was consistent
    assert claim == "right" and size == len(payload) and reply.sha256 == digest


def test_node_still_serves_after_fuzzing(client):
    assert client.health().status == "SERVING"
    stream = client.open_stream()
    try:
        out, _ = stream.call("fuzz-echo", "echo", [torch.ones(3)])
    finally:
        stream.close()
    assert torch.equal(out[0], torch.ones(3))
