"""The raw-TCP Forward data plane: the same messages as the gRPC Forward stream, without gRPC.

Why: a decode step does 2 x layers round trips, and Python sync gRPC spends ~0.7 ms per round
trip handing messages between threads. Here one thread per connection reads a frame, runs the
servicer's `handle_forward` (the very function the gRPC stream uses) and writes the reply: no
hand-offs. Framing is proto/framing.py. With the node's TLS material every connection must
complete mutual TLS against the cluster CA before a byte is read; errors end the connection with
one ForwardReply carrying error_code/error_message (like the gRPC stream aborting).

Bounded per peer (node/limits.py, issue #15): a frame's buffer grows with the bytes received and
an announced length over max_frame_bytes is refused before any is read; a frame must arrive
within data_frame_timeout of its first byte, a connection waiting longer than data_idle_timeout
for its next frame is closed; connections beyond max_data_connections are refused at accept,
before a thread or a TLS handshake is spent on them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from edgeweave import security
from edgeweave.node.leases import StreamLease
from edgeweave.node.limits import Limits
from edgeweave.node.server import error_status
from edgeweave.proto import pb
from edgeweave.proto.framing import HEADER, FrameClosed, FrameTimeout, read_exact, send_frame, tune_data_socket
from edgeweave.runtime import cpu_dilation

log = logging.getLogger(__name__)

#: an accepted connection must finish its TLS handshake within this, so a silent peer cannot pin a thread
HANDSHAKE_TIMEOUT_S = 10.0
#: refusals at the connection cap are logged at most this often (a flood must not flood the log)
REFUSAL_LOG_INTERVAL_S = 5.0
Handler = Callable[[pb.ForwardRequest, StreamLease], pb.ForwardReply]


class RequestError(Exception):
    """A frame the node refuses before handling it; carries the gRPC status to reply with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class IdleConnection(Exception):
    """No frame began within the idle timeout: the connection is closed without a reply."""


class DataPlane:
    """Listens on host:port (0 = an ephemeral one); `port` is what InfoReply.data_port announces."""

    def __init__(
        self, handle: Handler, open_lease: Callable[[], StreamLease], host: str,
        tls: security.TlsMaterial | None = None, key_dir: str | Path | None = None, limits: Limits | None = None,
        port: int = 0,
    ) -> None:
        self.handle = handle
        self.open_lease = open_lease  # each connection is one lease holder (node/leases.py)
        self.limits = limits or Limits()
        self._ssl = security.ssl_context(tls, server=True, key_dir=key_dir) if tls else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self._active = 0  # accepted and not yet closed, TLS handshakes included: what the cap counts
        self._refused = 0  # refusals not yet logged
        self._refusal_logged = float("-inf")
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"dataplane-{self.port}", daemon=True)

    def start(self) -> DataPlane:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                admitted = self._active < self.limits.max_data_connections
                if admitted:
                    self._active += 1
            if not admitted:
                self._refuse(conn, peer)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name=f"dataplane-conn-{peer[1]}",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: as good as over the cap
                with self._lock:
                    self._active -= 1
                self._refuse(conn, peer)

    def _refuse(self, conn: socket.socket, peer: tuple) -> None:
        """Close a connection over max_data_connections at once, in the accepting thread. A
        plaintext peer gets one RESOURCE_EXHAUSTED frame first (if its buffer takes it without
        waiting); a TLS peer sees its handshake cut (its client falls back to gRPC)."""
        limit = self.limits.max_data_connections
        if self._ssl is None:
            reply = pb.ForwardReply(error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], error_message=(
                f"the node already serves {limit} data-plane connections ([node] max_data_connections); "
                "close one or raise the limit"))
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(HEADER.pack(reply.ByteSize()) + reply.SerializeToString())
        conn.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            log.warning("data plane: refused %s:%s (%d refused since the last such line): %d connections are "
                        "open, the limit ([node] max_data_connections)", peer[0], peer[1], self._refused, limit)
            self._refused, self._refusal_logged = 0, now

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        tune_data_socket(conn)
        try:
            if self._ssl is not None:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                try:
                    conn = self._ssl.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("data plane: refused %s:%s (TLS handshake failed: %s)", peer[0], peer[1], exc)
                    return
                conn.settimeout(None)
            with self._lock:
                if self._closed:
                    return
                self._connections.add(conn)
            lease = self.open_lease()
            try:
                self._loop(conn, lease)
            finally:
                lease.close()
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._active -= 1
            conn.close()

    def _read_frame(self, conn: socket.socket) -> bytearray:
        """The next frame's body. Waits up to the idle timeout for a frame to begin, then gives the
        whole frame the frame timeout; an over-limit length is refused before a byte of it is read."""
        limits = self.limits
        header = bytearray(HEADER.size)
        conn.settimeout(limits.data_idle_timeout_s)
        try:
            got = conn.recv_into(header)
        except TimeoutError:
            raise IdleConnection(f"no frame within {limits.data_idle_timeout_s:g} s ([node] data_idle_timeout)") from None
        if not got:
            raise FrameClosed("connection closed between frames")
        deadline = time.monotonic() + limits.data_frame_timeout_s
        if got < HEADER.size:
            header[got:] = read_exact(conn, HEADER.size - got, deadline)
        (n,) = HEADER.unpack(header)
        if n > limits.max_frame_bytes:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"frame of {n} bytes exceeds the node's limit of {limits.max_frame_bytes} "
                               "([node] max_frame_bytes)")
        return read_exact(conn, n, deadline)

    def _loop(self, conn: socket.socket, lease: StreamLease) -> None:
        """Frame in, reply out, until the peer hangs up or a request fails (one error reply, then close)."""
        handle = self.handle
        seq = 0
        peer = _peer_name(conn)
        pacer = cpu_dilation.Pacer()  # an emulated slower device (runtime/cpu_dilation.py); else a no-op
        try:
            while True:
                pacer.idle()  # from here, a wait for a core after the frame came is not the device's
                body = self._read_frame(conn)
                pacer.begin()
                try:
                    req = pb.ForwardRequest.FromString(body)
                except DecodeError as exc:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"frame of {len(body)} bytes is not a ForwardRequest ({exc})") from None
                del body  # the request holds its own copy; do not keep both while computing
                seq = req.seq
                reply = handle(req, lease).SerializeToString()
                pacer.pay()
                conn.settimeout(self.limits.data_frame_timeout_s)  # a peer that stops reading frees us too
                send_frame(conn, reply)
        except IdleConnection as exc:
            log.info("data plane: closed %s: %s", peer, exc)
        except FrameTimeout as exc:
            message = f"{exc} ({self.limits.data_frame_timeout_s:g} s, [node] data_frame_timeout)"
            log.warning("data plane: closed %s: %s", peer, message)
            self._send_error(conn, seq, grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except TimeoutError:
            log.warning("data plane: closed %s: it took no reply for %g s ([node] data_frame_timeout)", peer,
                        self.limits.data_frame_timeout_s)
        except (FrameClosed, OSError):
            return  # peer gone (or node closing): nothing to answer
        except RequestError as exc:
            log.warning("data plane refused a frame from %s (%s): %s", peer, exc.code.name, exc)
            self._send_error(conn, seq, exc.code, str(exc))
        except Exception as exc:
            self._send_error(conn, seq, *error_status("Forward", exc))

    @staticmethod
    def _send_error(conn: socket.socket, seq: int, code: grpc.StatusCode, message: str) -> None:
        reply = pb.ForwardReply(seq=seq, error_code=code.value[0], error_message=message)
        with contextlib.suppress(OSError):  # the peer may already be gone, or not reading
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            send_frame(conn, reply.SerializeToString())

    def close(self) -> None:
        """Stop accepting and cut every open connection (clients see UNAVAILABLE)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _peer_name(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return "a peer that is gone"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
