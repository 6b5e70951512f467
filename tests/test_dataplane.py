"""The raw-TCP Forward data plane against a real (mutual-TLS) node daemon: bit-exact tensors,
bad input answered with a status while the node keeps serving, plaintext refused."""

from __future__ import annotations

import socket
import struct

import grpc
import pytest
import torch

from edgeweave.coordinator.client import NodeClient, NodeError, RawForwardStream, SharedTensors, connect_data_plane
from edgeweave.proto import pb
from edgeweave.proto.framing import FrameClosed, read_exact, read_length
from edgeweave.runtime.codec import encode

JOB = "dataplane-echo"


@pytest.fixture(scope="module")
def client(local_node):
    with NodeClient(local_node.addresses[0], timeout=30) as c:
        c.load(JOB, "echo", {}, {})
        yield c


def _bits(t: torch.Tensor) -> torch.Tensor:
    widths = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(widths[t.element_size()]) if t.dtype != torch.bool else t


def _assert_serving(client: NodeClient) -> None:
    """A fresh tcp stream still round-trips: the node survived whatever came before."""
    with client.open_stream(reply_timeout=30, transport="tcp") as s:
        probe = torch.arange(5, dtype=torch.int64)
        (out,), _ = s.call(JOB, "echo", [probe])
        assert torch.equal(out, probe)


def test_node_announces_a_data_port_and_tcp_selects_the_raw_stream(client, monkeypatch):
    assert client.info().data_port > 0
    with client.open_stream(transport="tcp") as s:
        assert isinstance(s, RawForwardStream)
    monkeypatch.setenv("EDGEWEAVE_DATA_PLANE", "tcp")
    with client.open_stream() as s:
        assert isinstance(s, RawForwardStream)
    monkeypatch.setenv("EDGEWEAVE_DATA_PLANE", "grpc")
    with client.open_stream() as s:
        assert not isinstance(s, RawForwardStream)


def test_bit_exact_echo_of_dtypes_and_16_mib(client):
    special = torch.tensor([0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e-30])
    tensors = [
        special, special.to(torch.float16), special.to(torch.bfloat16),
        torch.randn(3, 4, 5), torch.tensor([-(2**63), 2**63 - 1, 0]), torch.tensor([-7, 2**31 - 1], dtype=torch.int32),
        torch.arange(256, dtype=torch.int32).to(torch.uint8), torch.tensor([True, False, True]),
        torch.randn(4 << 20),  # 16 MiB of float32
    ]
    with client.open_stream(reply_timeout=60, transport="tcp") as s:
        seqs = [s.send(JOB, "echo", tensors[:4]), s.send(JOB, "echo", tensors[4:8])]  # pipelined
        for seq, sent in zip(seqs, (tensors[:4], tensors[4:8]), strict=True):
            got, reply = s.recv()
            assert reply.seq == seq
            for a, b in zip(sent, got, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
        (big,), _ = s.call(JOB, "echo", [tensors[8]])
        assert torch.equal(_bits(big), _bits(tensors[8]))


def test_shared_tensors_reach_every_stream_as_sent(client):
    """A tensor-parallel step encodes its hidden state once for all nodes (SharedTensors): appended
    to each stream's own request bytes on the raw data plane, as messages on a gRPC stream."""
    shared = SharedTensors([torch.randn(2, 96), torch.arange(7, dtype=torch.int64)])
    with client.open_stream(transport="tcp") as raw, client.open_stream(transport="tcp") as raw2, \
            client.open_stream(transport="grpc") as rpc:
        for stream in (raw, raw2, rpc, raw):  # the same object sent again reuses its encoding
            stream.send(JOB, "echo", shared, layer=3, position=5, session="s")
            outs, reply = stream.recv()
            assert reply.seq > 0 and len(outs) == 2
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs, shared, strict=True))


def test_malformed_tensor_is_invalid_argument_and_node_keeps_serving(client):
    bad = pb.Tensor(**encode(torch.zeros(4)))
    bad.data = bad.data[:-3]  # 13 bytes for a 4 x float32 tensor
    with connect_data_plane(client.address, client.info().data_port, client.cluster) as sock:
        body = pb.ForwardRequest(job_id=JOB, seq=7, op="echo", tensors=[bad]).SerializeToString()
        sock.sendall(struct.pack("<I", len(body)) + body)
        reply = pb.ForwardReply.FromString(read_exact(sock, read_length(sock)))
        assert reply.seq == 7 and reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "bytes" in reply.error_message
        with pytest.raises((FrameClosed, OSError)):  # then the node closes the connection
            read_length(sock)
    # the stream maps an error reply to NodeError with its code, and is closed afterwards
    with client.open_stream(reply_timeout=30, transport="tcp") as s:
        with pytest.raises(NodeError) as info:
            s.call(JOB, "no-such-op", [torch.zeros(2)])
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "no-such-op" in info.value.message
        with pytest.raises(NodeError) as closed:
            s.send(JOB, "echo", [torch.zeros(2)])
        assert closed.value.code is grpc.StatusCode.CANCELLED
    _assert_serving(client)


def test_oversized_length_prefix_is_refused_and_node_keeps_serving(client):
    with connect_data_plane(client.address, client.info().data_port, client.cluster) as sock:
        sock.sendall(struct.pack("<I", 0xFFFFFFFF))  # 4 GiB > the node's 1 GiB frame limit; no body follows
        reply = pb.ForwardReply.FromString(read_exact(sock, read_length(sock)))
        assert reply.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "exceeds" in reply.error_message
    _assert_serving(client)


def test_plaintext_connection_is_refused(client):
    host = client.address.rsplit(":", 1)[0]
    body = pb.ForwardRequest(job_id=JOB, seq=1, op="echo", tensors=[pb.Tensor(**encode(torch.ones(3)))]).SerializeToString()
    received = b""
    with socket.create_connection((host, client.info().data_port), timeout=15) as sock:
        sock.sendall(struct.pack("<I", len(body)) + body)
        try:
            while chunk := sock.recv(1 << 16):  # until the node closes the connection
                received += chunk
        except ConnectionResetError:
            pass
    # at most a TLS alert record (content type 21), never a ForwardReply frame
    assert received == b"" or received[:2] == b"\x15\x03", received[:16]
    _assert_serving(client)


def test_tcp_is_the_default_transport(client, monkeypatch):
    monkeypatch.delenv("EDGEWEAVE_DATA_PLANE", raising=False)
    with client.open_stream() as s:
        assert isinstance(s, RawForwardStream)


def test_unreachable_data_port_falls_back_to_grpc(tmp_path, caplog):
    """A node whose announced data port cannot be reached (a firewall REJECT, here a closed port)
    still serves Forward: the coordinator warns and uses the gRPC stream."""
    from edgeweave import security
    from edgeweave.coordinator import identity
    from edgeweave.node.server import NodeServicer, build_server

    tls = security.issue_member_material(security.load_secret(identity.current().secret_file), "fallback-node")
    servicer = NodeServicer("fallback-node", tmp_path, 0, secure=True)
    server, port = build_server(servicer, "127.0.0.1", 0, security.server_credentials(tls))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    servicer.data_port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more: connecting is refused
    server.start()
    try:
        with NodeClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.load(JOB, "echo", {}, {})
            with c.open_stream(reply_timeout=30) as s:
                assert not isinstance(s, RawForwardStream)
                (out,), _ = s.call(JOB, "echo", [torch.arange(4)])
                assert torch.equal(out, torch.arange(4))
        assert any("using gRPC for Forward instead" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(0)
        servicer.close()


def test_data_plane_sockets_detect_a_vanished_peer(client):
    """A host that disappears without a RST (power, cable) must fail the connection within
    seconds, as HTTP/2 keepalive does for gRPC: keepalive probes and a user timeout are set."""
    from edgeweave.proto.framing import DEAD_PEER_S

    with connect_data_plane(client.address, client.info().data_port, client.cluster) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == DEAD_PEER_S * 1000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
