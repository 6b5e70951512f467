"""Framing of the raw-TCP Forward data plane, shared by node and coordinator (they meet only here).

A frame is a 4-byte little-endian length followed by that many bytes of a serialized
ForwardRequest (client -> node) or ForwardReply (node -> client). Works on plain and TLS sockets
(no recv flags, which ssl sockets refuse).

Reading never trusts the length prefix for memory: a frame's buffer grows with the bytes that
actually arrive (at most twice what was received, plus PREALLOC_BYTES), so a peer that announces
1 GiB and sends nothing costs nothing (issue #15).
"""

from __future__ import annotations

import socket
import struct
import time

HEADER = struct.Struct("<I")
#: frames up to this size go out as one sendall (one TCP segment burst, one syscall)
_COALESCE_BYTES = 1 << 16


#: a peer that stops answering (power loss, cable) fails the connection within about this long:
#: keepalive probes after 1 s of silence, 1 s apart, and unacknowledged data times out likewise.
#: The data plane's counterpart of the gRPC channel's 1 s HTTP/2 keepalive.
DEAD_PEER_S = 3


def tune_data_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (a frame is one message, never wait to coalesce) and fast dead-peer detection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", DEAD_PEER_S - 1),
                          ("TCP_USER_TIMEOUT", DEAD_PEER_S * 1000)):
        if hasattr(socket, option):  # Linux has them all; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


#: a frame up to this size gets its whole buffer at once (the hot path: decode steps are a few KiB);
#: beyond it the buffer doubles only as bytes arrive
PREALLOC_BYTES = 1 << 20


class FrameClosed(ConnectionError):
    """The peer closed the connection (cleanly between frames, or in the middle of one)."""


class FrameTimeout(TimeoutError):
    """The bytes of one frame did not all arrive before its deadline; `got` of `n` did."""

    def __init__(self, got: int, n: int) -> None:
        super().__init__(f"only {got} of {n} bytes arrived before the frame's deadline")
        self.got, self.n = got, n


def read_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly n bytes, or FrameClosed if the peer hangs up first.

    The buffer grows with what arrives, never to the announced `n` up front. With `deadline` (a
    time.monotonic() value) the socket timeout is set to what is left before every recv, and
    FrameTimeout is raised when it passes; without, the socket's own timeout applies per recv.
    """
    buf = bytearray(min(n, PREALLOC_BYTES))
    got = 0
    while got < n:
        if got == len(buf):  # full: double it, by no more than was already received
            buf.extend(bytes(min(n - got, got)))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameTimeout(got, n)
            sock.settimeout(left)
        try:
            # the first recv fills the buffer itself (a small frame is usually all there); later ones
            # go through a temporary view of what is missing, released at once (the buffer may grow)
            k = sock.recv_into(memoryview(buf)[got:]) if got else sock.recv_into(buf)
        except TimeoutError:
            if deadline is None:
                raise
            raise FrameTimeout(got, n) from None
        if not k:
            raise FrameClosed(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def read_length(sock: socket.socket, deadline: float | None = None) -> int:
    return HEADER.unpack(read_exact(sock, HEADER.size, deadline))[0]


def send_frame(sock: socket.socket, body: bytes) -> None:
    """One frame: header + body, coalesced into one send when small."""
    header = HEADER.pack(len(body))
    if len(body) <= _COALESCE_BYTES:
        sock.sendall(header + body)
    else:
        sock.sendall(header)
        sock.sendall(body)
