"""The raw-TCP Forward data plane: the same messages as the gRPC Forward stream, without gRPC.

Why: a decode step does 2 x layers round trips, and Python sync gRPC spends ~0.7 ms per round
trip handing messages between threads. Here one thread per connection reads a frame, runs the
servicer's `handle_forward` (the very function the gRPC stream uses) and writes the reply: no
hand-offs. Framing is proto/framing.py. With the node's TLS material every connection must
complete mutual TLS against the cluster CA before a byte is read; errors end the connection with
one ForwardReply carrying error_code/error_message (like the gRPC stream aborting).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from edgeweave import security
from edgeweave.node.leases import StreamLease
from edgeweave.node.server import MAX_MESSAGE_BYTES, error_status
from edgeweave.proto import pb
from edgeweave.proto.framing import FrameClosed, read_exact, read_length, send_frame, tune_data_socket

log = logging.getLogger(__name__)

#: an accepted connection must finish its TLS handshake within this, so a silent peer cannot pin a thread
HANDSHAKE_TIMEOUT_S = 10.0
Handler = Callable[[pb.ForwardRequest, StreamLease], pb.ForwardReply]


class RequestError(Exception):
    """A frame the node refuses before handling it; carries the gRPC status to reply with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DataPlane:
    """Listens on host:port (0 = an ephemeral one); `port` is what InfoReply.data_port announces."""

    def __init__(
        self, handle: Handler, open_lease: Callable[[], StreamLease], host: str,
        tls: security.TlsMaterial | None = None, key_dir: str | Path | None = None,
        max_frame_bytes: int = MAX_MESSAGE_BYTES, port: int = 0,
    ) -> None:
        self.handle = handle
        self.open_lease = open_lease  # each connection is one lease holder (node/leases.py)
        self.max_frame_bytes = max_frame_bytes
        self._ssl = security.ssl_context(tls, server=True, key_dir=key_dir) if tls else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
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
            threading.Thread(target=self._serve, args=(conn, peer), name=f"dataplane-conn-{peer[1]}",
                             daemon=True).start()

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
            conn.close()

    def _loop(self, conn: socket.socket, lease: StreamLease) -> None:
        """Frame in, reply out, until the peer hangs up or a request fails (one error reply, then close)."""
        handle = self.handle
        seq = 0
        try:
            while True:
                n = read_length(conn)
                if n > self.max_frame_bytes:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"frame of {n} bytes exceeds the node's limit of {self.max_frame_bytes}")
                try:
                    req = pb.ForwardRequest.FromString(read_exact(conn, n))
                except DecodeError as exc:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"frame of {n} bytes is not a ForwardRequest ({exc})") from None
                seq = req.seq
                send_frame(conn, handle(req, lease).SerializeToString())
        except (FrameClosed, OSError):
            return  # peer gone (or node closing): nothing to answer
        except RequestError as exc:
            log.info("data plane refused a frame (%s): %s", exc.code.name, exc)
            self._send_error(conn, seq, exc.code, str(exc))
        except Exception as exc:
            self._send_error(conn, seq, *error_status("Forward", exc))

    @staticmethod
    def _send_error(conn: socket.socket, seq: int, code: grpc.StatusCode, message: str) -> None:
        reply = pb.ForwardReply(seq=seq, error_code=code.value[0], error_message=message)
        with contextlib.suppress(OSError):  # the peer may already be gone
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
