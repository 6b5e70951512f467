"""Announces a node on the LAN with mDNS/DNS-SD (`_edgeweave._tcp.local.`), on chosen interfaces only."""

from __future__ import annotations

import logging
import socket

import psutil
from zeroconf import ServiceInfo, Zeroconf

from edgeweave import SERVICE_TYPE

log = logging.getLogger(__name__)


def choose_interfaces(host: str, interface: str | None = None) -> list[str]:
    """IPv4 addresses to announce on: the explicit --interface, else --host if it is specific,
    else every non-loopback IPv4 address (loopback if there is none)."""
    if interface:
        return [interface]
    if host and host not in {"0.0.0.0", "::", "[::]"}:
        return [host]
    found = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    return found or ["127.0.0.1"]


class Advertiser:
    """One registered DNS-SD service; `close()` withdraws it (goodbye packets) and stops zeroconf."""

    def __init__(self, name: str, port: int, interfaces: list[str], properties: dict[str, str]) -> None:
        self.interfaces = interfaces
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in interfaces],
            port=port,
            properties=properties,
            server=f"{name}-{properties.get('node_id', '')[:8]}.local.",
        )
        self._zc: Zeroconf | None = None

    def start(self) -> None:
        """Register (blocks ~1.7 s while mDNS probes that the name is unique; renames on conflict)."""
        self._zc = Zeroconf(interfaces=self.interfaces)
        self._zc.register_service(self.info, allow_name_change=True)
        log.info("advertising %s on %s", self.info.name, ", ".join(self.interfaces))

    def close(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            zc.unregister_service(self.info)
        finally:
            zc.close()
        log.info("withdrew %s", self.info.name)
