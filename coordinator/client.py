"""Talking to one node: a long-lived gRPC channel, deadline-bound unary calls, shard upload,
and the pipelined Forward stream that carries 2 x layers round trips per token.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from edgeweave import security
from edgeweave.coordinator import identity
from edgeweave.proto import pb, pb_grpc
from edgeweave.proto.framing import HEADER, FrameClosed, read_exact, read_length, send_frame, tune_data_socket
from edgeweave.runtime.batch import Row
from edgeweave.runtime.codec import Quantized, decode, decode_quantized, encode
from edgeweave.runtime.shard_files import CHUNK_BYTES, check_shard_name, sha256_file

MAX_MESSAGE_BYTES = 1 << 30
#: HTTP/2 keepalive: ping every KEEPALIVE_MS and drop the connection when the ack is KEEPALIVE_MS
#: late, so a node that vanishes without a RST (power loss, cable) fails its calls within ~2 s
#: (a killed process is noticed at once: its kernel resets the connection). node/server.py permits it.
KEEPALIVE_MS = 1_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
Progress = Callable[[int, int], None]  # (bytes sent, total bytes)
#: "tcp" (default) or "grpc": which transport open_stream uses when the caller does not say
DATA_PLANE_ENV = "EDGEWEAVE_DATA_PLANE"
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
#: a data plane port that does not answer within this (a firewall dropping it) falls back to gRPC
CONNECT_TIMEOUT_S = 3.0
log = logging.getLogger(__name__)


class NodeError(RuntimeError):
    """A node refused or failed a call; `.code` is the gRPC status, the text says what happened."""

    def __init__(self, address: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"node {address}: {code.name}: {message}")
        self.address = address
        self.code = code
        self.message = message


def make_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, extra_options: tuple = (),
    cluster: identity.Identity | None = None,
) -> grpc.Channel:
    """The one place channels to nodes are created.

    Without explicit `credentials` the channel uses this process's cluster identity
    (coordinator/identity.py), or `cluster`'s when given: mutual TLS with the cluster secret, or
    plaintext in --insecure mode.
    """
    options = CHANNEL_OPTIONS + list(extra_options)
    if credentials is None:
        credentials, name_options = identity.channel_credentials(cluster)
        options += list(name_options)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


#: how long diagnosing a failed first contact may take (one TCP connect, one TLS hello)
PROBE_TIMEOUT_S = 2.0
#: how long a first call waits for its channel to connect before probing what is there
FIRST_CONTACT_S = 3.0


@dataclass(frozen=True)
class Probe:
    """What answers at an address, seen from below gRPC: why a first call failed."""

    outcome: str  # "refused" (nothing listens), "silent" (no TCP answer), "hung" (connects, never speaks),
    #               "plaintext" (not TLS), "tls" (speaks TLS)
    detail: str = ""
    cluster: str | None = None  # for "tls": the cluster fingerprint its certificate names, if any


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Connect to `address` and say hello in TLS without verifying anything: enough to tell a closed
    port from a black hole, a plaintext node from a TLS one, and to read which cluster a TLS node
    names in its certificate (unverified; used only to word an error)."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except TimeoutError:
        return Probe("silent")
    except OSError as exc:
        return Probe("refused", exc.strerror or str(exc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=security.SERVER_NAME) as tls:
                der = tls.getpeercert(binary_form=True)
        except TimeoutError:
            return Probe("hung")
        except ssl.SSLError as exc:
            if "ALERT" in str(exc).upper():  # it spoke TLS and refused us on the way (no client certificate)
                return Probe("tls")
            return Probe("plaintext", exc.reason or str(exc))
        except OSError as exc:  # closed on our hello: not a TLS server
            return Probe("plaintext", exc.strerror or str(exc))
    return Probe("tls", cluster=security.certificate_fingerprint(der) if der else None)


def explain(address: str, code: grpc.StatusCode, details: str, found: Probe, ours: str | None,
            insecure: bool) -> NodeError:
    """The NodeError for a first call that failed, worded from what `probe` found (`ours` is this
    device's cluster fingerprint, None if unknown)."""
    unavailable = grpc.StatusCode.UNAVAILABLE
    if found.outcome == "refused":
        return NodeError(address, unavailable, f"nothing listens there ({found.detail}): is the node running, "
                                               "and is this its port?")
    if found.outcome == "silent":
        return NodeError(address, unavailable, f"no answer within {PROBE_TIMEOUT_S:g} s: the address is down or "
                                               "unreachable, or a firewall drops the packets")
    if found.outcome == "hung":
        return NodeError(address, unavailable, "it accepts connections but never answers: a hung process, or not "
                                               "an edgeweave node")
    if found.outcome == "tls" and insecure:
        cluster = f" of cluster {found.cluster}" if found.cluster else ""
        return NodeError(address, grpc.StatusCode.UNAUTHENTICATED,
                         f"the node requires TLS (it is a secure node{cluster}) but this coordinator runs "
                         "--insecure: give it the cluster secret (--secret-file) instead")
    if found.outcome == "plaintext" and not insecure:
        return NodeError(address, grpc.StatusCode.UNAUTHENTICATED,
                         "the node speaks plaintext (it runs --insecure) but this coordinator requires TLS: start "
                         "the node with the cluster secret, or run this command with --insecure")
    if found.outcome == "tls" and code in (grpc.StatusCode.UNAUTHENTICATED, unavailable, grpc.StatusCode.UNKNOWN) \
            and _handshake_failed(details):
        if found.cluster and ours and found.cluster != ours:
            return NodeError(address, grpc.StatusCode.UNAUTHENTICATED,
                             f"the node belongs to another cluster (fingerprint {found.cluster}; ours is {ours}): "
                             "it holds a different cluster secret")
        named = f" (the node names cluster {found.cluster})" if found.cluster else ""
        return NodeError(address, grpc.StatusCode.UNAUTHENTICATED,
                         f"TLS handshake refused{named}: this device and the node do not share a cluster secret")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return NodeError(address, code, f"{details} (the node is up but did not answer in time)")
    return NodeError(address, code, f"{details} (is the node running and reachable?)")


def _handshake_failed(details: str) -> bool:
    lowered = details.lower()
    return "handshake" in lowered or "ssl" in lowered or "certificate" in lowered


def _error(address: str, exc: grpc.RpcError) -> NodeError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code is grpc.StatusCode.UNAVAILABLE and _handshake_failed(details):
        code = grpc.StatusCode.UNAUTHENTICATED
        details = f"{details} (TLS handshake refused: this device and the node do not share a cluster secret)"
    elif code is grpc.StatusCode.UNAVAILABLE:
        details = f"{details} (is the node running and reachable?)"
    return NodeError(address, code, details or "no details")


#: statuses of a first call worth a probe: the connection (not the request) failed
_CONTACT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN})


class NodeClient:
    def __init__(
        self, address: str, *, timeout: float = 10.0, credentials: grpc.ChannelCredentials | None = None,
        extra_options: tuple = (), cluster: identity.Identity | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.cluster = cluster
        self._explicit = credentials is not None  # the caller chose the credentials: our cluster is unknown
        self.channel = make_channel(address, credentials, extra_options, cluster)
        self.stub = pb_grpc.NodeStub(self.channel)
        self._answered = False  # once a call got through, failures are the node's, not the contact's

    def _call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        timeout = timeout or self.timeout
        try:
            reply = method(request, timeout=timeout) if self._answered else self._first_call(method, request, timeout)
        except grpc.RpcError as exc:
            raise self._first_contact_error(exc) if not self._answered else _error(self.address, exc) from None
        self._answered = True
        return reply

    def _first_call(self, method: Callable, request: Any, timeout: float) -> Any:
        """The first call of this client: if it has no reply after FIRST_CONTACT_S, probe the address;
        a black hole or a hung peer fails it now, a live server (a slow link, a slow call) gets the
        full deadline. Without this a black hole costs the whole deadline of the first call."""
        future = method.future(request, timeout=timeout)
        try:
            return future.result(timeout=min(timeout, FIRST_CONTACT_S))
        except grpc.FutureTimeoutError:
            pass
        found = probe(self.address)
        if found.outcome in ("refused", "silent", "hung"):
            future.cancel()
            raise explain(self.address, grpc.StatusCode.UNAVAILABLE, "no reply", found, None, False)
        return future.result()

    def _first_contact_error(self, exc: grpc.RpcError) -> NodeError:
        """Why the very first call failed, in one sentence: closed port, black hole, TLS mode
        mismatch, another cluster. Costs one probe (at most PROBE_TIMEOUT_S), only on failure."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        if code not in _CONTACT_CODES:
            return _error(self.address, exc)
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or "no details"
        if self._explicit:
            ours, insecure = None, False
        else:
            member = self.cluster or identity.current()
            ours, insecure = member.fingerprint, member.insecure
        return explain(self.address, code, details, probe(self.address), ours, insecure)

    # -- resources ---------------------------------------------------------------------------
    def info(self) -> pb.InfoReply:
        return self._call(self.stub.Info, pb.InfoRequest())

    def health(self) -> pb.HealthReply:
        return self._call(self.stub.Health, pb.HealthRequest())

    def profile(self, matmul_size: int = 0, budget_s: float = 0.0, *, layer: pb.LayerShape | None = None,
                backend: str = "", prompt_tokens: int = 0, kv_tokens: int = 0,
                shards: Sequence[tuple[int, int]] = ()) -> pb.ProfileReply:
        """The node's micro-benchmarks; with `layer`, also the seconds of one such layer
        (runtime/layer_profile.py), whose building may take a few seconds more than the budget,
        and of its tensor-parallel ops on `shards` ((KV heads, MLP columns) each; a few seconds more)."""
        request = pb.ProfileRequest(matmul_size=matmul_size, budget_s=budget_s, layer=layer, backend=backend,
                                    prompt_tokens=prompt_tokens, kv_tokens=kv_tokens,
                                    shards=[pb.ShardShare(n_kv_heads=h, mlp_columns=c) for h, c in shards])
        extra = 0.0 if layer is None else 20.0 + (budget_s or 1.0) + 5.0 * len(shards)
        return self._call(self.stub.Profile, request, timeout=self.timeout + 2 * (budget_s or 1.0) + extra)

    def echo(self, data: bytes) -> bytes:
        return self._call(self.stub.Echo, pb.EchoMessage(data=data)).data

    # -- shards ------------------------------------------------------------------------------
    def has_shards(self, digests: list[str]) -> set[str]:
        return set(self._call(self.stub.HasShards, pb.HasShardsRequest(sha256=list(digests))).present)

    def put_shard(
        self, path: str | Path, name: str, sha256: str | None = None, progress: Progress | None = None
    ) -> pb.PutShardReply:
        """Upload one file in 1 MiB chunks straight from disk; skipped if the node already holds it."""
        path = Path(path)
        check_shard_name(name)
        sha256 = sha256 or sha256_file(path)
        size = path.stat().st_size
        if sha256 in self.has_shards([sha256]):
            if progress:
                progress(size, size)
            return pb.PutShardReply(sha256=sha256, size=size, already_present=True)

        def chunks() -> Iterator[pb.ShardChunk]:
            with open(path, "rb") as f:
                offset = 0
                while True:
                    data = f.read(CHUNK_BYTES)
                    if offset == 0:
                        yield pb.ShardChunk(name=name, sha256=sha256, size=size, offset=0, data=data)
                    elif data:
                        yield pb.ShardChunk(offset=offset, data=data)
                    offset += len(data)
                    if progress:
                        progress(offset, size)
                    if not data or offset >= size:
                        return

        # generous deadline: at least 2 MB/s on top of the usual call budget
        return self._call(self.stub.PutShard, chunks(), timeout=self.timeout + size / 2e6)

    def ensure_shards(self, files: dict[str, str | Path], progress: Progress | None = None) -> dict[str, str]:
        """Make the node hold every file (name -> path); sends only what it lacks. Returns name -> sha256."""
        digests = {name: sha256_file(path) for name, path in files.items()}
        present = self.has_shards(list(digests.values()))
        for name, path in files.items():
            if digests[name] not in present:
                self.put_shard(path, name, digests[name], progress)
                present.add(digests[name])
        return digests

    # -- jobs --------------------------------------------------------------------------------
    def load(
        self, job_id: str, kind: str, config: dict[str, Any], shards: dict[str, str], memory_budget: int = 0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        request = pb.LoadRequest(
            job_id=job_id, kind=kind, config_json=json.dumps(config), memory_budget=memory_budget,
            shards=[pb.ShardRef(name=n, sha256=d) for n, d in shards.items()],
        )
        return json.loads(self._call(self.stub.Load, request, timeout=timeout or max(self.timeout, 60.0)).details_json or "{}")

    def unload(self, job_id: str) -> dict[str, Any]:
        return json.loads(self._call(self.stub.Unload, pb.UnloadRequest(job_id=job_id)).stats_json or "{}")

    def job_stats(self, job_id: str) -> dict[str, Any]:
        return json.loads(self._call(self.stub.JobStats, pb.JobStatsRequest(job_id=job_id)).stats_json or "{}")

    # -- streams -----------------------------------------------------------------------------
    def open_stream(
        self, reply_timeout: float | None = None, transport: str | None = None, lease: str = "",
    ) -> ForwardStream | RawForwardStream:
        """A Forward stream over the node's raw-TCP data plane ("tcp", the default: no thread
        hand-offs, ~0.3 ms less per round trip) when the node announces a data_port, else over gRPC
        ("grpc", also what $EDGEWEAVE_DATA_PLANE=grpc forces). Its requests carry `lease`."""
        stream = self._open_stream(reply_timeout, transport)
        stream.lease = lease
        return stream

    def _open_stream(
        self, reply_timeout: float | None, transport: str | None
    ) -> ForwardStream | RawForwardStream:
        transport = (transport or os.environ.get(DATA_PLANE_ENV) or "tcp").lower()
        if transport not in ("grpc", "tcp"):
            raise ValueError(f"unknown Forward transport {transport!r}: use 'grpc' or 'tcp' (${DATA_PLANE_ENV})")
        if transport == "tcp":
            port = self.info().data_port
            if port:
                try:
                    return RawForwardStream(self, port, reply_timeout)
                except NodeError as exc:
                    if exc.code is not grpc.StatusCode.UNAVAILABLE:
                        raise
                    log.warning("%s; using gRPC for Forward instead (slower; open port %d on the node)",
                                exc, port)
        return ForwardStream(self, reply_timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CLOSE = object()


def _reply_tensors(reply: pb.ForwardReply, raw: bool) -> list[torch.Tensor | Quantized]:
    """A reply's tensors; with `raw`, quantized ones stay uint8 + scale (`Quantized`)."""
    if raw:
        return [decode_quantized(t) if t.quantized else decode(t) for t in reply.tensors]
    return [decode(t) for t in reply.tensors]


class SharedTensors(list):
    """The tensors of one message that goes to several streams (a tensor-parallel step sends the
    same hidden state to every node): encoded once, not once per stream. A list, so streams that
    take the tensors as they are (LocalStream) need nothing; the others ask for `messages()` (the
    pb.Tensor messages) or `field_bytes()` (their serialized `tensors` field, which appended to a
    serialized request without tensors makes the request with them: protobuf concatenates)."""

    _messages: list[pb.Tensor] | None = None
    _field: bytes | None = None

    def messages(self) -> list[pb.Tensor]:
        if self._messages is None:
            self._messages = [pb.Tensor(**encode(t)) for t in self]
        return self._messages

    def field_bytes(self) -> bytes:
        if self._field is None:
            self._field = pb.ForwardRequest(tensors=self.messages()).SerializeToString()
        return self._field


class ForwardCalls:
    """What every Forward stream (gRPC, raw TCP, the coordinator's own LocalStream) shares on top
    of its own send/recv."""

    address: str
    _closed: bool
    _seq: Iterator[int]
    #: the coordinator's lease id on the node (node/leases.py): its sessions outlive a dropped stream
    #: for the node's session_grace_s, and a stream reopened with the same id keeps them
    lease: str = ""

    def _request(self, job_id: str, op: str, tensors: list[torch.Tensor | Quantized], layer: int,
                 position: int, session: str, rows: Sequence[Row] | None = None) -> pb.ForwardRequest:
        """The next request with its sequence number; refused once the stream is closed."""
        if self._closed:
            raise NodeError(self.address, grpc.StatusCode.CANCELLED, "this Forward stream is closed")
        messages = tensors.messages() if isinstance(tensors, SharedTensors) else [pb.Tensor(**encode(t)) for t in tensors]
        return pb.ForwardRequest(
            job_id=job_id, seq=next(self._seq), op=op, layer=layer, position=position, session=session,
            lease=self.lease, tensors=messages,
            rows=[pb.BatchRow(session=r.session, position=r.position, length=r.length) for r in rows or ()],
        )

    def call(self, job_id: str, op: str, tensors: list[torch.Tensor | Quantized], layer: int = 0,
             position: int = 0, session: str = "", timeout: float | None = None,
             raw: bool = False, rows: Sequence[Row] | None = None) -> tuple[list[torch.Tensor | Quantized], pb.ForwardReply]:
        self.send(job_id, op, tensors, layer, position, session, rows)
        return self.recv(timeout, raw)


class ForwardStream(ForwardCalls):
    """One long-lived Forward stream. `send` queues without waiting (pipelining); `recv` returns
    replies in order. No thread is created per message: gRPC pulls requests from a queue, and
    replies are read in the caller's thread."""

    def __init__(self, client: NodeClient, reply_timeout: float | None = None) -> None:
        self.address = client.address
        self.reply_timeout = reply_timeout
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = itertools.count(1)
        self._expected: deque[int] = deque()
        self._call = client.stub.Forward(self._request_iter())
        self._replies = iter(self._call)
        self._deadline: float | None = None
        self._timed_out = False
        self._watchdog: threading.Thread | None = None
        self._closed = False

    def _request_iter(self) -> Iterator[pb.ForwardRequest]:
        get = self._requests.get
        while (item := get()) is not _CLOSE:
            yield item

    def send(
        self, job_id: str, op: str, tensors: list[torch.Tensor | Quantized], layer: int = 0, position: int = 0,
        session: str = "", rows: Sequence[Row] | None = None,
    ) -> int:
        """Queue one request; returns its sequence number."""
        request = self._request(job_id, op, tensors, layer, position, session, rows)
        self._requests.put(request)
        self._expected.append(request.seq)
        return request.seq

    def recv(self, timeout: float | None = None, raw: bool = False) -> tuple[list[torch.Tensor | Quantized], pb.ForwardReply]:
        """The next reply, decoded (quantized tensors dequantized unless raw=True)."""
        timeout = timeout if timeout is not None else self.reply_timeout
        if timeout is not None:
            self._arm(timeout)
        try:
            reply = next(self._replies)
        except StopIteration:
            raise NodeError(self.address, grpc.StatusCode.UNAVAILABLE, "the node closed the Forward stream") from None
        except grpc.RpcError as exc:
            self._closed = True
            if self._timed_out:
                raise NodeError(self.address, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Forward reply within {timeout} s; the stream was cancelled") from None
            raise _error(self.address, exc) from None
        finally:
            self._deadline = None
        expected = self._expected.popleft() if self._expected else None
        if reply.seq != expected:
            raise NodeError(self.address, grpc.StatusCode.INTERNAL, f"reply seq {reply.seq} but expected {expected}")
        return _reply_tensors(reply, raw), reply

    def _arm(self, timeout: float) -> None:
        """Set a reply deadline, watched by one lazily started thread (cancels the stream when missed)."""
        self._deadline = time.monotonic() + timeout
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name=f"forward-watchdog-{self.address}", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        while not self._closed:
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out = True
                self._call.cancel()
                return
            time.sleep(0.05)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put(_CLOSE)
        self._call.cancel()

    def __enter__(self) -> ForwardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=8)
def _client_ssl_context(material: security.TlsMaterial) -> ssl.SSLContext:
    return security.ssl_context(material, server=False)


def connect_data_plane(address: str, port: int, cluster: identity.Identity | None = None,
                       timeout: float | None = 10.0) -> socket.socket:
    """A connected socket to a node's raw-TCP data plane (same host as its gRPC `address`), with
    mutual TLS from the cluster identity (plaintext only in --insecure mode), like make_channel."""
    host = address.rsplit(":", 1)[0].strip("[]")
    sock = socket.create_connection((host, port), timeout=timeout)
    tune_data_socket(sock)
    material = (cluster or identity.current()).material
    if material is None:
        return sock
    try:
        return _client_ssl_context(material).wrap_socket(sock, server_hostname=security.SERVER_NAME)
    except BaseException:
        sock.close()
        raise


def _set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """settimeout only when it changes: each call is a syscall, and a stream's send and recv
    almost always ask for the same reply timeout, message after message."""
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


class RawForwardStream(ForwardCalls):
    """ForwardStream's interface over the node's raw-TCP data plane (node/dataplane.py): `send` is
    one sendall of a length-prefixed ForwardRequest, `recv` reads one reply in the caller's thread
    with the socket timeout. No threads. Pipelining works while the unread replies fit the socket
    buffers (small activations); errors raise NodeError with the same codes as ForwardStream."""

    def __init__(self, client: NodeClient, port: int, reply_timeout: float | None = None) -> None:
        self.address = client.address
        self.reply_timeout = reply_timeout
        self._seq = itertools.count(1)
        self._expected: deque[int] = deque()
        self._closed = False
        self._port, self._cluster = port, client.cluster
        self._connect_timeout = min(client.timeout or CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S)
        self.reconnects = 0  # times a connection the node closed while idle was replaced
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        port = self._port
        try:
            return connect_data_plane(self.address, port, self._cluster, timeout=self._connect_timeout)
        except (ssl.SSLEOFError, ConnectionResetError) as exc:
            raise NodeError(self.address, grpc.StatusCode.UNAVAILABLE,
                            f"the node closed the data plane connection (port {port}) during the TLS handshake: "
                            f"{exc} (is it at its [node] max_data_connections?)") from None
        except ssl.SSLError as exc:
            raise NodeError(self.address, grpc.StatusCode.UNAUTHENTICATED,
                            f"TLS handshake with the data plane (port {port}) failed: {exc} "
                            "(this device and the node do not share a cluster secret)") from None
        except OSError as exc:
            raise NodeError(self.address, grpc.StatusCode.UNAVAILABLE,
                            f"cannot reach the data plane on port {port}: {exc} (is the node running and reachable?)") from None

    def _reopen_if_closed(self) -> None:
        """With no reply outstanding, replace a connection the node has closed: it closes those idle
        past its [node] data_idle_timeout, and the jobs and KV caches live in the node, not in the
        connection. A frame waiting unasked is the node's refusal: raised as its NodeError."""
        sock = self._sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if self._expected or not (pending or select.select([sock], [], [], 0)[0]):
            return
        sock.setblocking(False)
        try:
            first = sock.recv(1)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # only TLS housekeeping (a session ticket) was waiting: the connection is fine
        except OSError:
            first = b""  # reset: as closed
        if first:
            sock.settimeout(self._connect_timeout)
            try:
                rest = read_exact(sock, HEADER.size - 1)
                reply = pb.ForwardReply.FromString(read_exact(sock, HEADER.unpack(first + rest)[0]))
            except (OSError, DecodeError) as exc:
                raise self._fail(grpc.StatusCode.INTERNAL, f"the node sent an unreadable frame unasked: {exc}") from None
            code = _STATUS_BY_VALUE.get(reply.error_code, grpc.StatusCode.INTERNAL)
            raise self._fail(code, reply.error_message or "the node sent a reply nobody asked for")
        sock.close()
        try:
            self._sock = self._connect()
        except NodeError:
            self._closed = True  # as after any failure: later sends are CANCELLED, not a closed socket's error
            raise
        self.reconnects += 1
        log.info("%s: the node closed an idle data plane connection; reconnected", self.address)

    def _fail(self, code: grpc.StatusCode, message: str) -> NodeError:
        self.close()
        return NodeError(self.address, code, message)

    def send(
        self, job_id: str, op: str, tensors: list[torch.Tensor | Quantized], layer: int = 0, position: int = 0,
        session: str = "", rows: Sequence[Row] | None = None,
    ) -> int:
        """Write one request; returns its sequence number."""
        if isinstance(tensors, SharedTensors):  # the tensors serialized once for every stream
            request = self._request(job_id, op, (), layer, position, session, rows)
            seq, body = request.seq, request.SerializeToString() + tensors.field_bytes()
        else:
            request = self._request(job_id, op, tensors, layer, position, session, rows)
            seq, body = request.seq, request.SerializeToString()
        self._reopen_if_closed()
        try:
            _set_timeout(self._sock, self.reply_timeout)
            send_frame(self._sock, body)
        except TimeoutError:
            raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"the node did not take a Forward request within {self.reply_timeout} s") from None
        except OSError as exc:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, f"the data plane connection broke: {exc}") from None
        self._expected.append(seq)
        return seq

    def recv(self, timeout: float | None = None, raw: bool = False) -> tuple[list[torch.Tensor | Quantized], pb.ForwardReply]:
        """The next reply, decoded (quantized tensors dequantized unless raw=True)."""
        if self._closed:
            raise NodeError(self.address, grpc.StatusCode.CANCELLED, "this Forward stream is closed")
        timeout = timeout if timeout is not None else self.reply_timeout
        try:
            _set_timeout(self._sock, timeout)
            reply = pb.ForwardReply.FromString(read_exact(self._sock, read_length(self._sock)))
        except TimeoutError:
            raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no Forward reply within {timeout} s; the stream was closed") from None
        except FrameClosed:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, "the node closed the Forward stream") from None
        except OSError as exc:
            raise self._fail(grpc.StatusCode.UNAVAILABLE,
                             f"the data plane connection broke: {exc} (is the node running and reachable?)") from None
        if reply.error_code:
            code = _STATUS_BY_VALUE.get(reply.error_code, grpc.StatusCode.UNKNOWN)
            raise self._fail(code, reply.error_message or "no details")
        expected = self._expected.popleft() if self._expected else None
        if reply.seq != expected:
            raise self._fail(grpc.StatusCode.INTERNAL, f"reply seq {reply.seq} but expected {expected}")
        return _reply_tensors(reply, raw), reply

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> RawForwardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
