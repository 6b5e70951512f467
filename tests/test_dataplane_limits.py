"""Bounded memory per data-plane connection (issue #15), against real node daemons.

Two nodes, shared by the module:
- `wide`: a node subprocess, --insecure (the issue's worst case: anyone may connect), with a frame
  limit above 1 GiB, so a 1 GiB header is *accepted* and only the growing buffer keeps it cheap;
  short timeouts and a small connection cap. Its RSS is what the first test measures.
- `narrow`: the same daemon (node/daemon.py serve) on a thread of this process, with mutual TLS,
  an 8 MiB frame limit and 2 connections: the exact boundary, the gRPC receive cap from the same
  setting, and the cap on a TLS data plane (the client falls back to gRPC). In-process because a
  second node subprocess costs ~7 s of start-up on two cores.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import psutil
import pytest
import torch

from edgeweave import security
from edgeweave.config import NodeSettings
from edgeweave.coordinator import identity
from edgeweave.coordinator.client import ForwardStream, NodeClient, NodeError, RawForwardStream, connect_data_plane
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.node.daemon import NodeOptions, serve
from edgeweave.node.limits import Limits
from edgeweave.proto import pb
from edgeweave.proto.framing import FrameClosed, read_exact, read_length
from edgeweave.runtime.codec import encode
from edgeweave.runtime.resources import parse_size

JOB = "limits-echo"
GIB = 1 << 30
MIB = 1 << 20
IDLE_S, FRAME_S, WIDE_CAP = 1.0, 2.0, 6
NARROW_FRAME, NARROW_CAP = 8 * MIB, 2
INSECURE = identity.Identity(None, None)
#: what five 1 GiB headers (each followed by 1.5 MiB of its body) may grow the node by: about
#: 5 x a 2 MiB buffer plus allocator slack; before the fix each header alone cost 1 GiB
RSS_MARGIN = 50 * MIB


class Node:
    """One running node: a gRPC client, where its data plane listens, and its log."""

    def __init__(self, address: str, cluster_identity: identity.Identity, log: Callable[[], str]) -> None:
        self.client = NodeClient(address, timeout=30, cluster=cluster_identity)
        self.client.load(JOB, "echo", {}, {})
        self.data_port = self.client.info().data_port
        self.log = log

    def connect(self) -> socket.socket:
        return connect_data_plane(self.client.address, self.data_port, self.client.cluster, timeout=15)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def wide_process() -> Iterator[LocalCluster]:
    with LocalCluster(1, advertise=False, cluster_identity=INSECURE, extra_args=[
            "--max-frame-bytes", "2047MiB", "--max-data-connections", str(WIDE_CAP),
            "--data-idle-timeout", str(IDLE_S), "--data-frame-timeout", str(FRAME_S)]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def wide(wide_process) -> Iterator[Node]:
    node = Node(wide_process.addresses[0], INSECURE, lambda: wide_process.log_path(0).read_text(errors="replace"))
    yield node
    node.client.close()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Iterator[Node]:
    data_dir = tmp_path_factory.mktemp("narrow-node")
    tls = security.issue_member_material(security.load_secret(identity.current().secret_file), "narrow-node")
    records = _Records()
    node_log = logging.getLogger("edgeweave.node")
    node_log.addHandler(records)
    level = node_log.level
    node_log.setLevel(logging.INFO)
    stop = threading.Event()
    opts = NodeOptions(name="narrow-node", host="127.0.0.1", port=0, data_dir=data_dir, advertise=False,
                       ready_file=data_dir / "ready.json", credentials=security.server_credentials(tls), tls=tls,
                       limits=Limits(max_frame_bytes=NARROW_FRAME, max_data_connections=NARROW_CAP))
    thread = threading.Thread(target=serve, args=(opts, stop), name="narrow-node", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not opts.ready_file.exists():
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process node did not start"
            time.sleep(0.02)
        node = Node(json.loads(opts.ready_file.read_text())["address"], identity.current(),
                    lambda: "\n".join(records.lines))
        yield node
        node.client.close()
    finally:
        stop.set()
        thread.join(10)
        node_log.removeHandler(records)
        node_log.setLevel(level)


def _echo_on(sock: socket.socket, seq: int = 1, tensor: torch.Tensor | None = None) -> pb.ForwardReply:
    """One echo round trip on a raw connection."""
    tensor = torch.arange(4, dtype=torch.int64) if tensor is None else tensor
    body = pb.ForwardRequest(job_id=JOB, seq=seq, op="echo", tensors=[pb.Tensor(**encode(tensor))]).SerializeToString()
    sock.sendall(struct.pack("<I", len(body)) + body)
    return pb.ForwardReply.FromString(read_exact(sock, read_length(sock)))


def _assert_serving(node: Node) -> None:
    """A normal Forward still works on a fresh stream: the node survived whatever came before."""
    with node.client.open_stream(reply_timeout=30, transport="tcp") as s:
        assert isinstance(s, RawForwardStream)
        probe = torch.randn(64, 32)
        (out,), _ = s.call(JOB, "echo", [probe])
        assert torch.equal(out, probe)


def _wait_for_log(node: Node, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = node.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the node's log:\n{node.log()[-3000:]}")


def _open_admitted(node: Node, n: int, timeout: float = 5.0) -> list[socket.socket]:
    """n connections the node admitted (each answered an echo). Connections of earlier tests may
    take a moment to be released on the node, so a refused one is retried until `timeout`."""
    admitted: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while len(admitted) < n:
        sock = node.connect()
        try:
            reply = _echo_on(sock)
        except (FrameClosed, OSError):
            reply = None
        if reply is not None and not reply.error_code:
            admitted.append(sock)
            continue
        sock.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(admitted)} of {n} connections admitted")
        time.sleep(0.05)
    return admitted


def test_settings_defaults_are_the_limits_defaults():
    """config.py NodeSettings and node/limits.py keep the same defaults (they cannot import each other's layer)."""
    settings, limits = NodeSettings(), Limits()
    assert parse_size(settings.max_frame_bytes) == limits.max_frame_bytes
    assert settings.max_data_connections == limits.max_data_connections
    assert settings.data_idle_timeout == limits.data_idle_timeout_s
    assert settings.data_frame_timeout == limits.data_frame_timeout_s


def _node_command(tmp_path, monkeypatch, *args: str) -> tuple[object, list]:
    """`edgeweave node ARGS` in-process up to the point where it would serve; returns the Click
    result and the NodeOptions it would have served with (none when it refused)."""
    from typer.testing import CliRunner

    from edgeweave.cli import app

    served: list = []
    monkeypatch.setattr("edgeweave.node.cli.serve", served.append)
    result = CliRunner().invoke(app, ["node", "--insecure", "--no-advertise", "--data-dir", str(tmp_path), *args],
                                env={"EDGEWEAVE_CONFIG": str(tmp_path / "absent.toml"), "COLUMNS": "300"})
    return result, served


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max-frame-bytes", "1MiB", "max_frame_bytes must be between"),
    ("--max-frame-bytes", "2GiB", "max_frame_bytes must be between"),
    ("--max-frame-bytes", "lots", "is not a size"),
    ("--max-data-connections", "0", "max_data_connections must be at least 1"),
    ("--data-idle-timeout", "0", "data_idle_timeout must be a positive"),
    ("--data-frame-timeout", "nan", "data_frame_timeout must be a positive"),
])
def test_invalid_limits_are_refused_by_the_node_command(tmp_path, monkeypatch, flag, value, says):
    result, served = _node_command(tmp_path, monkeypatch, flag, value)
    assert result.exit_code == 2 and not served, result.output
    assert says in " ".join(result.output.split())


def test_limits_reach_the_node_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEWEAVE_NODE_MAX_FRAME_BYTES", "64MiB")
    monkeypatch.setenv("EDGEWEAVE_NODE_DATA_IDLE_TIMEOUT", "30")
    result, served = _node_command(tmp_path, monkeypatch, "--max-data-connections", "3")
    assert result.exit_code == 0, result.output
    assert served[0].limits == Limits(64 * MIB, 3, 30.0, Limits().data_frame_timeout_s)


def test_headers_announcing_1_gib_cost_no_memory_and_stall_until_the_frame_deadline(wide, wide_process):
    """(a) + (c): five connections each announce 1 GiB (within the wide node's limit) and send
    1.5 MiB of it: the node grows by the bytes received, not 5 GiB; each stalled frame is answered
    DEADLINE_EXCEEDED after the frame timeout, and the node still serves."""
    node = wide
    process = psutil.Process(wide_process.procs[0].pid)
    _assert_serving(node)
    before = process.memory_info().rss
    peak, sampling = [before], threading.Event()

    def sample() -> None:  # the peak, every 20 ms: the node's threads may hold the GIL for seconds
        while not sampling.wait(0.02):
            peak.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    hogs = [node.connect() for _ in range(5)]
    sent_at = time.monotonic()
    for sock in hogs:
        sock.sendall(struct.pack("<I", GIB) + bytes(3 * MIB // 2))
    _assert_serving(node)  # a sixth connection works while the five hold theirs
    # until just before the node gives up on the five (and frees what they cost); before the
    # fix it zeroed 1 GiB per header here (two headers took a node to ~1.8 GB in 3 s)
    time.sleep(max(0.0, sent_at + FRAME_S - 0.3 - time.monotonic()))
    sampling.set()
    sampler.join()
    growth = max(peak) - before
    print(f"node RSS {before / MIB:.0f} MiB -> peak {max(peak) / MIB:.0f} MiB with 5 x 1 GiB headers "
          f"(+{growth / MIB:.1f} MiB, {len(peak)} samples)")
    assert growth < RSS_MARGIN, f"node grew by {growth / MIB:.0f} MiB for 5 header-only frames"

    for sock in hogs:
        sock.settimeout(FRAME_S + 10)
        reply = pb.ForwardReply.FromString(read_exact(sock, read_length(sock)))
        assert reply.error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "data_frame_timeout" in reply.error_message and f"{3 * MIB // 2} of {GIB} bytes" in reply.error_message
        with pytest.raises((FrameClosed, OSError)):
            read_length(sock)
        sock.close()
    waited = time.monotonic() - sent_at
    assert FRAME_S - 0.2 <= waited < FRAME_S + 5, waited
    _wait_for_log(node, "data_frame_timeout")
    _assert_serving(node)


def test_idle_and_trickling_connections_are_closed_and_a_stream_reconnects(wide):
    """(c): a silent connection is closed after the idle timeout without a reply; one that
    trickles a byte every 0.2 s gets DEADLINE_EXCEEDED at the frame deadline, progress or not; a
    coordinator stream left idle past the timeout reconnects on its next call."""
    node = wide
    stream = node.client.open_stream(reply_timeout=30, transport="tcp")
    assert isinstance(stream, RawForwardStream)
    (out,), _ = stream.call(JOB, "echo", [torch.ones(3)])
    idle, trickle = node.connect(), node.connect()
    start = time.monotonic()
    trickle.sendall(struct.pack("<I", 1000))
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.2):
            try:
                trickle.send(b"\x00")
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        idle.settimeout(IDLE_S + 10)
        assert idle.recv(1) == b""  # closed, no reply frame
        idle_closed = time.monotonic() - start
        trickle.settimeout(FRAME_S + 10)
        reply = pb.ForwardReply.FromString(read_exact(trickle, read_length(trickle)))
        trickle_closed = time.monotonic() - start
    finally:
        stop.set()
        dripper.join()
        idle.close()
        trickle.close()
    assert IDLE_S - 0.2 <= idle_closed < IDLE_S + 5, idle_closed
    assert reply.error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], reply
    assert FRAME_S - 0.2 <= trickle_closed < FRAME_S + 5, trickle_closed
    assert f"no frame within {IDLE_S:g} s ([node] data_idle_timeout)" in _wait_for_log(node, "data_idle_timeout")

    time.sleep(max(0.0, IDLE_S + 0.5 - (time.monotonic() - start)))  # the stream's connection is gone by now
    probe = torch.randn(5)
    (out,), _ = stream.call(JOB, "echo", [probe])
    assert torch.equal(out, probe) and stream.reconnects == 1
    stream.close()


def test_connections_beyond_the_cap_are_refused_while_admitted_ones_work(wide):
    """(d): with WIDE_CAP connections open the next is refused at once with RESOURCE_EXHAUSTED
    (plaintext node: one error frame) and a log line; the admitted ones keep working, and
    closing one makes room."""
    node = wide
    admitted = _open_admitted(node, WIDE_CAP)
    try:
        with node.connect() as extra:
            extra.settimeout(10)
            reply = pb.ForwardReply.FromString(read_exact(extra, read_length(extra)))  # sent before we ask anything
            assert reply.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "max_data_connections" in reply.error_message
            assert extra.recv(1) == b""
        _wait_for_log(node, "connections are open, the limit ([node] max_data_connections)")
        for seq, sock in enumerate(admitted, 2):
            assert _echo_on(sock, seq).seq == seq
        admitted.pop().close()
        admitted += _open_admitted(node, 1)
    finally:
        for sock in admitted:
            sock.close()


def test_an_announced_length_over_the_limit_is_refused_before_its_payload(narrow):
    """(b): limit + 1 bytes announced, nothing sent after the header: refused at once (TLS node)."""
    node = narrow
    with node.connect() as sock:
        sock.sendall(struct.pack("<I", NARROW_FRAME + 1))
        reply = pb.ForwardReply.FromString(read_exact(sock, read_length(sock)))
        assert reply.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert f"frame of {NARROW_FRAME + 1} bytes exceeds the node's limit of {NARROW_FRAME}" in reply.error_message
    _wait_for_log(node, f"exceeds the node's limit of {NARROW_FRAME} ([node] max_frame_bytes)")
    _assert_serving(node)


def _request_of_size(total: int) -> tuple[torch.Tensor, pb.ForwardRequest]:
    """An echo request whose serialized size is within 64 bytes under `total`."""
    payload = total - 256
    while True:
        tensor = torch.randint(0, 255, (payload,), dtype=torch.uint8)
        request = pb.ForwardRequest(job_id=JOB, seq=1, op="echo", tensors=[pb.Tensor(**encode(tensor))])
        size = request.ByteSize()
        if total - 64 <= size <= total:
            return tensor, request
        payload += total - 32 - size


def test_a_frame_just_under_the_limit_works_on_both_transports_and_grpc_has_the_same_cap(narrow):
    """(e): a Forward just under max_frame_bytes round-trips over the data plane and over gRPC;
    a gRPC message over it is refused with RESOURCE_EXHAUSTED (the cap derives from the same key)."""
    node = narrow
    tensor, request = _request_of_size(NARROW_FRAME)
    assert NARROW_FRAME - 64 <= request.ByteSize() <= NARROW_FRAME
    for transport, kind in (("tcp", RawForwardStream), ("grpc", ForwardStream)):
        with node.client.open_stream(reply_timeout=30, transport=transport) as s:
            assert isinstance(s, kind)
            (out,), _ = s.call(JOB, "echo", [tensor])
            assert torch.equal(out, tensor), transport
    node.client.echo(bytes(NARROW_FRAME - 64))
    with pytest.raises(NodeError) as over:
        node.client.echo(bytes(NARROW_FRAME + 1))
    assert over.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_cap_on_a_tls_data_plane_cuts_the_handshake_and_the_client_falls_back_to_grpc(narrow, caplog):
    node = narrow
    admitted = _open_admitted(node, NARROW_CAP)
    try:
        with node.client.open_stream(reply_timeout=30, transport="tcp") as s:
            assert isinstance(s, ForwardStream)  # refused on the data plane: gRPC instead
            (out,), _ = s.call(JOB, "echo", [torch.arange(3)])
            assert torch.equal(out, torch.arange(3))
        assert any("max_data_connections" in r.getMessage() and "using gRPC" in r.getMessage() for r in caplog.records)
        _wait_for_log(node, "max_data_connections)")
        for seq, sock in enumerate(admitted, 2):
            assert _echo_on(sock, seq).seq == seq
    finally:
        for sock in admitted:
            sock.close()
