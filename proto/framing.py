"""Framing of the raw-TCP Forward data plane, shared by node and coordinator (they meet only here).

A frame is a 4-byte little-endian length followed by that many bytes of a serialized
ForwardRequest (client -> node) or ForwardReply (node -> client). Works on plain and TLS sockets
(no recv flags, which ssl sockets refuse).
"""

from __future__ import annotations

import socket
import struct

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


class FrameClosed(ConnectionError):
    """The peer closed the connection (cleanly between frames, or in the middle of one)."""


def read_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly n bytes, or FrameClosed if the peer hangs up first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise FrameClosed(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def read_length(sock: socket.socket) -> int:
    return HEADER.unpack(read_exact(sock, HEADER.size))[0]


def send_frame(sock: socket.socket, body: bytes) -> None:
    """One frame: header + body, coalesced into one send when small."""
    header = HEADER.pack(len(body))
    if len(body) <= _COALESCE_BYTES:
        sock.sendall(header + body)
    else:
        sock.sendall(header)
        sock.sendall(body)
