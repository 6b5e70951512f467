"""The HTTP listener of `edgeweave serve`: bound first, announced last.

The socket is bound before the model loads, so a taken port fails in a second instead of after
a minute of shipping shards; the "serving" line is printed only after uvicorn's startup
succeeded, so a user or a supervisor can trust it to mean "connect now".
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server calling `announce()` once it accepts connections."""

    def __init__(self, app: Any, announce: Callable[[], None]) -> None:
        super().__init__(uvicorn.Config(app, log_level="warning"))
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._announce()


@contextlib.contextmanager
def bind_http(host: str, port: int) -> Iterator[socket.socket]:
    """A listening TCP socket on host:port; OSError with one sentence when the port is taken or
    the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        yield sock
    finally:
        sock.close()


def url_host(host: str) -> str:
    """An address as it goes in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host
