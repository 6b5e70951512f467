"""Finding nodes: mDNS/DNS-SD browsing of `_edgeweave._tcp.local.` plus static `host:port` peers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zeroconf import DNSQuestionType, InterfaceChoice, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from edgeweave import SERVICE_TYPE
from edgeweave.coordinator.client import NodeClient, NodeError

log = logging.getLogger(__name__)


@dataclass
class NodeRecord:
    name: str
    address: str  # "host:port"
    node_id: str
    version: str
    properties: dict[str, str] = field(default_factory=dict)
    source: str = "mdns"  # or "static"


def record_from_info(info: ServiceInfo, interfaces: list[str] | None = None) -> NodeRecord | None:
    """A NodeRecord from a resolved DNS-SD service, or None if it has no IPv4 address yet."""
    addresses = [a for a in info.parsed_addresses() if "." in a]
    if not addresses:
        return None
    # prefer an address on the interface we browsed, so the coordinator dials a reachable one
    if interfaces:
        prefixes = {ip.rsplit(".", 1)[0] for ip in interfaces}
        addresses.sort(key=lambda a: a.rsplit(".", 1)[0] not in prefixes)
    props: dict[str, str] = {
        k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()
    }
    return NodeRecord(
        name=props.get("name") or info.name.removesuffix("." + SERVICE_TYPE),
        address=f"{addresses[0]}:{info.port}",
        node_id=props.get("node_id", ""),
        version=props.get("version", ""),
        properties=props,
        source="mdns",
    )


def static_record(peer: str, timeout: float = 3.0) -> NodeRecord:
    """Resolve a `host:port` peer through its Info RPC (raises NodeError if it does not answer)."""
    with NodeClient(peer, timeout=timeout) as client:
        info = client.info()
    r = info.resources
    props = {
        "name": info.name, "node_id": info.node_id, "version": info.version, "mem_total": str(r.total_memory),
        "mem_avail": str(r.available_memory), "cores": str(r.cpu_count), "arch": r.arch,
        "accel": ",".join(r.accelerators), "backends": ",".join(r.backends), "budget": str(r.memory_budget),
        "secure": "1" if info.secure else "0",
    }
    return NodeRecord(info.name, peer, info.node_id, info.version, props, source="static")


def _zeroconf(interfaces: list[str] | None) -> Zeroconf:
    return Zeroconf(interfaces=interfaces if interfaces else InterfaceChoice.All)


class NodeWatcher:
    """Continuous browsing: keeps `.nodes` (service name -> NodeRecord) current and calls back on changes.

    Use as a context manager; callbacks run on zeroconf's browser thread, so keep them short.
    """

    def __init__(
        self,
        interfaces: list[str] | None = None,
        on_add: Callable[[NodeRecord], Any] | None = None,
        on_remove: Callable[[NodeRecord], Any] | None = None,
    ) -> None:
        self.interfaces = interfaces
        self.on_add = on_add
        self.on_remove = on_remove
        self.nodes: dict[str, NodeRecord] = {}
        self.changed = threading.Condition()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None

    def _handler(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self.changed:
                record = self.nodes.pop(name, None)
                self.changed.notify_all()
            if record and self.on_remove:
                self.on_remove(record)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=1500, question_type=DNSQuestionType.QM)
        record = record_from_info(info, self.interfaces) if info else None
        if record is None:
            return
        with self.changed:
            is_new = name not in self.nodes
            self.nodes[name] = record
            self.changed.notify_all()
        if is_new and self.on_add:
            self.on_add(record)

    def start(self) -> NodeWatcher:
        self._zc = _zeroconf(self.interfaces)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._handler],
                                       question_type=DNSQuestionType.QM)
        return self

    def wait(self, predicate: Callable[[dict[str, NodeRecord]], bool], timeout: float) -> bool:
        """Block until predicate(nodes) holds or timeout passes; returns whether it holds."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.nodes), timeout)

    def close(self) -> None:
        if self._browser:
            self._browser.cancel()
        if self._zc:
            self._zc.close()
        self._browser = self._zc = None

    def __enter__(self) -> NodeWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover(
    timeout: float = 2.0,
    interfaces: list[str] | None = None,
    peers: Iterable[str] = (),
    wait_for: int | None = None,
) -> list[NodeRecord]:
    """Nodes seen within `timeout` (mDNS on `interfaces`, all if None) plus static peers.

    Returns early once `wait_for` nodes are known. Unreachable static peers are logged and skipped.
    """
    records: list[NodeRecord] = []
    for peer in peers:
        try:
            records.append(static_record(peer, timeout=max(timeout, 1.0)))
        except NodeError as exc:
            log.warning("static peer %s did not answer: %s", peer, exc.message)
    static_addresses = {r.address for r in records}
    if wait_for is not None and len(records) >= wait_for:
        return records
    deadline = time.monotonic() + timeout
    with NodeWatcher(interfaces) as watcher:
        def enough(nodes: dict[str, NodeRecord]) -> bool:
            return wait_for is not None and len(records) + len(nodes) >= wait_for

        watcher.wait(enough, max(0.0, deadline - time.monotonic()))
        found = [r for r in watcher.nodes.values() if r.address not in static_addresses]
    return records + sorted(found, key=lambda r: r.name)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_reachable(address: str, timeout: float = 1.0) -> bool:
    """Cheap TCP connect check (used to filter stale mDNS records)."""
    try:
        with socket.create_connection(host_port(address), timeout=timeout):
            return True
    except OSError:
        return False
