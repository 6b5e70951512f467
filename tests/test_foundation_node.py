"""A real node daemon (subprocess, real gRPC): codec over the wire, malformed input, shard store, jobs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
import torch

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.proto import pb
from edgeweave.runtime.codec import Quantized, quantize_uint8

JOB = "echo-test"


@pytest.fixture(scope="module")
def client(local_node):
    with NodeClient(local_node.addresses[0], timeout=30) as c:
        c.load(JOB, "echo", {}, {})
        yield c


@pytest.fixture(scope="module")
def stream(client):
    with client.open_stream(reply_timeout=60) as s:
        yield s


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so NaN/-0.0 compare exactly."""
    widths = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(widths[t.element_size()]) if t.dtype != torch.bool else t


SPECIAL = [0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 1e-30, 6e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool])
def test_every_dtype_round_trips_bit_exact(stream, dtype):
    if dtype.is_floating_point:
        special = torch.tensor(SPECIAL, dtype=dtype)
        cases = [special, torch.randn(3, 5, 7).to(dtype), torch.randn(4, 6).to(dtype).t()]  # incl. non-contiguous
    elif dtype is torch.bool:
        cases = [torch.rand(5, 9) > 0.5]
    else:
        info = torch.iinfo(dtype)
        cases = [torch.tensor([info.min, -1 if info.min < 0 else 0, 0, 1, info.max], dtype=dtype),
                 torch.randint(0, 100, (2, 3, 4), dtype=dtype)]
    cases += [torch.empty(0, 5, dtype=dtype), torch.zeros((), dtype=dtype)]
    out, reply = stream.call(JOB, "echo", cases)
    assert len(out) == len(cases)
    for sent, got in zip(cases, out, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(_bits(sent), _bits(got))
    assert reply.compute_s >= 0


@pytest.mark.slow
def test_64_mib_tensor_both_directions(stream):
    x = torch.randn(16, 1024, 1024)  # 64 MiB of float32
    (y,), _ = stream.call(JOB, "echo", [x], timeout=120)
    assert torch.equal(x, y)


def test_quantized_round_trip_within_one_step(stream):
    x = torch.randn(8, 576) * 3
    q = quantize_uint8(x)
    (deq,), _ = stream.call(JOB, "echo", [q])
    assert deq.dtype == x.dtype
    assert (deq - x).abs().max().item() <= q.scale * 0.5 + 1e-6
    (raw,), _ = stream.call(JOB, "echo", [q], raw=True)
    assert isinstance(raw, Quantized)
    assert torch.equal(raw.q, q.q) and raw.scale == q.scale and raw.zero_point == q.zero_point


def test_pipelined_sends_come_back_in_order(stream):
    xs = [torch.full((2,), float(i)) for i in range(20)]
    seqs = [stream.send(JOB, "echo", [x]) for x in xs]
    for seq, x in zip(seqs, xs, strict=True):
        (y,), reply = stream.recv()
        assert reply.seq == seq and torch.equal(x, y)


MALFORMED = {
    "byte count mismatch": (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "needs 24 bytes"),
    "unknown dtype": (pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown tensor dtype"),
    "negative dim": (pb.Tensor(dtype="float32", shape=[-1, 4], data=b""), "negative dimension"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tensor_is_invalid_argument_and_node_survives(client, case):
    tensor, sentence = MALFORMED[case]
    request = pb.ForwardRequest(job_id=JOB, seq=1, op="echo", tensors=[tensor])
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Forward(iter([request]), timeout=30))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert sentence in info.value.details()
    assert client.health().status == "SERVING"
    with client.open_stream(reply_timeout=30) as fresh:
        (y,), _ = fresh.call(JOB, "echo", [torch.arange(3)])
    assert torch.equal(y, torch.arange(3))


def test_unknown_job_and_bad_op_have_clear_statuses(client):
    with client.open_stream(reply_timeout=30) as s, pytest.raises(NodeError) as info:
        s.call("no-such-job", "echo", [torch.ones(1)])
    assert info.value.code is grpc.StatusCode.NOT_FOUND and "no-such-job" in info.value.message
    with client.open_stream(reply_timeout=30) as s, pytest.raises(NodeError) as info:
        s.call(JOB, "attn", [torch.ones(1)])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "only knows ops 'echo' and 'work'" in info.value.message
    with pytest.raises(NodeError) as info:
        client.load("j", "no-such-kind", {}, {})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "unknown job kind" in info.value.message
    with pytest.raises(NodeError) as info:
        client.job_stats("never-loaded")
    assert info.value.code is grpc.StatusCode.NOT_FOUND


def test_info_health_profile(client, local_node):
    info = client.info()
    assert info.name == local_node.names[0] and len(info.node_id) == 32
    assert info.resources.cpu_count >= 1 and info.resources.available_memory > 0
    assert "torch" in info.resources.backends and JOB in info.jobs
    profile = client.profile(matmul_size=128, budget_s=0.2)
    assert profile.matmul_gflops > 0 and profile.memory_bandwidth_gbps > 0 and profile.disk_read_mbps > 0


# -- shards ----------------------------------------------------------------------------------

def _shard_dir(local_node) -> Path:
    return local_node.base_dir / local_node.names[0] / "shards"


def test_put_shard_is_idempotent_and_verified(client, local_node, tmp_path):
    path = tmp_path / "layer.000.safetensors"
    path.write_bytes(torch.randn(300_000).numpy().tobytes())  # ~1.2 MB: two chunks
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    progress: list[int] = []
    first = client.put_shard(path, "layer.000", progress=lambda sent, total: progress.append(sent))
    assert (first.sha256, first.size, first.already_present) == (digest, path.stat().st_size, False)
    assert progress[-1] == path.stat().st_size
    assert (_shard_dir(local_node) / digest).read_bytes() == path.read_bytes()
    assert client.has_shards([digest, "0" * 64]) == {digest}
    # a second upload (even bypassing the client's HasShards check) writes nothing
    again = client.stub.PutShard(iter([pb.ShardChunk(name="x", sha256=digest, size=first.size, data=b"")]), timeout=10)
    assert again.already_present and again.sha256 == digest
    # ... but only for the same bytes: a stored digest with another announced size is refused
    with pytest.raises(grpc.RpcError) as info:
        _put_raw(client, [pb.ShardChunk(name="x", sha256=digest, size=first.size + 1, data=b"")])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "real size" in info.value.details()
    assert client.ensure_shards({"layer.000": path}) == {"layer.000": digest}
    details = client.load("with-shard", "echo", {}, {"layer.000": digest})
    assert details == {}
    assert client.load("with-shard", "echo", {}, {"layer.000": digest}) == {}  # idempotent
    client.unload("with-shard")


def _put_raw(client, chunks):
    return client.stub.PutShard(iter(chunks), timeout=10)


def test_corrupted_shard_is_refused_and_not_stored(client, local_node):
    data = b"good bytes" * 1000
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(grpc.RpcError) as info:
        _put_raw(client, [pb.ShardChunk(name="w", sha256=wrong, size=len(data), offset=0, data=data)])
    assert info.value.code() is grpc.StatusCode.DATA_LOSS and "nothing was stored" in info.value.details()
    assert client.has_shards([wrong]) == set()
    assert not any(p.name.startswith(wrong[:16]) or p.suffix == ".part" for p in _shard_dir(local_node).iterdir())


def test_non_contiguous_chunks_and_short_uploads_are_refused(client):
    data = b"x" * 100
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(grpc.RpcError) as info:
        _put_raw(client, [pb.ShardChunk(name="n", sha256=digest, size=100, offset=0, data=data[:50]),
                          pb.ShardChunk(offset=60, data=data[60:])])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "contiguous" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _put_raw(client, [pb.ShardChunk(name="n", sha256=digest, size=100, offset=0, data=data[:50])])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "announced" in info.value.details()
    assert client.has_shards([digest]) == set()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "sp ace"])
def test_bad_shard_names_are_refused(client, name):
    data = b"abc"
    with pytest.raises(grpc.RpcError) as info:
        _put_raw(client, [pb.ShardChunk(name=name, sha256=hashlib.sha256(data).hexdigest(), size=3, data=data)])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "not allowed" in info.value.details()


def test_load_with_missing_shard_names_the_digest(client):
    missing = "ab" * 32
    with pytest.raises(NodeError) as info:
        client.load("needs-missing", "echo", {}, {"layer.001": missing})
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and missing in info.value.message
