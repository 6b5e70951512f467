"""Finding nodes: mDNS/DNS-SD browsing of `_edgeweave._tcp.local.` plus static `host:port` peers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from zeroconf import DNSQuestionType, InterfaceChoice, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from edgeweave import SERVICE_TYPE, security
from edgeweave.coordinator import identity
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
    cluster: str = ""  # the cluster fingerprint it announced ("" = none: a node from before fingerprints)
    note: str = ""  # why it is not used, for nodes of other clusters or nodes that did not answer

#: NodeWatcher(cluster=ANY_CLUSTER) keeps every announced node, of whichever cluster
ANY_CLUSTER = "*"
#: a discovered node must answer Info within this to be used (a stale record must not stall a run)
ANSWER_TIMEOUT_S = 2.0


def own_fingerprint() -> str | None:
    """This process's cluster fingerprint, or None when it has no identity (no secret, not --insecure):
    then no discovered node is ours."""
    try:
        return identity.current().fingerprint
    except security.SecretError:
        return None


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
        cluster=props.get("cluster", ""),
    )


def static_record(peer: str, timeout: float = 3.0) -> NodeRecord:
    """Resolve a `host:port` peer through its Info RPC (raises NodeError if it does not answer)."""
    with NodeClient(peer, timeout=timeout) as client:
        info = client.info()
    r = info.resources
    props = {
        "name": info.name, "node_id": info.node_id, "version": info.version, "mem_total": str(r.total_memory),
        "mem_avail": str(r.available_memory), "cores": str(r.cpu_count),
        "cpu_cores": f"{r.cpu_cores:.3g}" if r.cpu_cores else "", "arch": r.arch,
        "accel": ",".join(r.accelerators), "backends": ",".join(r.backends), "budget": str(r.memory_budget),
        "secure": "1" if info.secure else "0", "cluster": info.cluster,
    }
    return NodeRecord(info.name, peer, info.node_id, info.version, props, source="static", cluster=info.cluster)


def _zeroconf(interfaces: list[str] | None) -> Zeroconf:
    return Zeroconf(interfaces=interfaces if interfaces else InterfaceChoice.All)


class NodeWatcher:
    """Continuous browsing: keeps `.nodes` (service name -> NodeRecord) current and calls back on changes.

    Only nodes that announce our cluster's fingerprint (`cluster`; default: this process's identity)
    land in `.nodes` and reach the callbacks: the others, and nodes announcing none, are kept apart
    in `.others`, so a foreign node can never join. `cluster=ANY_CLUSTER` keeps every node.
    Use as a context manager; callbacks run on zeroconf's browser thread, so keep them short.
    """

    def __init__(
        self,
        interfaces: list[str] | None = None,
        on_add: Callable[[NodeRecord], Any] | None = None,
        on_remove: Callable[[NodeRecord], Any] | None = None,
        cluster: str | None = None,
    ) -> None:
        self.interfaces = interfaces
        self.on_add = on_add
        self.on_remove = on_remove
        self.cluster = cluster
        self.nodes: dict[str, NodeRecord] = {}
        self.others: dict[str, NodeRecord] = {}
        self.changed = threading.Condition()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None

    def _handler(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self.changed:
                record = self.nodes.pop(name, None)
                self.others.pop(name, None)
                self.changed.notify_all()
            if record and self.on_remove:
                self.on_remove(record)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=1500, question_type=DNSQuestionType.QM)
        record = record_from_info(info, self.interfaces) if info else None
        if record is None:
            return
        ours = self.cluster == ANY_CLUSTER or (self.cluster is not None and record.cluster == self.cluster)
        with self.changed:
            if not ours:
                self.nodes.pop(name, None)
                self.others[name] = record
                self.changed.notify_all()
                return
            self.others.pop(name, None)
            is_new = name not in self.nodes
            self.nodes[name] = record
            self.changed.notify_all()
        if is_new and self.on_add:
            self.on_add(record)

    def start(self) -> NodeWatcher:
        if self.cluster is None:
            self.cluster = own_fingerprint() or ""  # no identity: nothing announced is ours
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


@dataclass
class Survey:
    """What discovery saw: the nodes this coordinator can use, and the others (another cluster, or
    silent), each with a `note` saying why it is not used."""

    ours: list[NodeRecord]
    others: list[NodeRecord]


def _confirm(record: NodeRecord, ours: str | None, timeout: float) -> NodeRecord:
    """The record, checked with an Info call bounded by `timeout` (plus a probe on failure);
    `.note` is set when it cannot be used."""
    try:
        with NodeClient(record.address, timeout=timeout) as client:
            info = client.info()
    except NodeError as exc:
        if exc.code is grpc.StatusCode.UNAUTHENTICATED:
            record.note = f"another cluster ({exc.message})"
        else:
            record.note = f"no answer ({exc.message})"
        return record
    if info.cluster and ours and info.cluster != ours:
        record.note = f"another cluster (fingerprint {info.cluster})"
    record.cluster = info.cluster or record.cluster
    return record


def _foreign_note(record: NodeRecord) -> str:
    if record.cluster:
        return f"another cluster (fingerprint {record.cluster})"
    return "announces no cluster fingerprint and did not prove membership"


def survey(
    timeout: float = 2.0,
    interfaces: list[str] | None = None,
    peers: Iterable[str] = (),
    wait_for: int | None = None,
    answer_timeout: float = ANSWER_TIMEOUT_S,
) -> Survey:
    """Nodes seen within `timeout` (mDNS on `interfaces`, all if None) plus static peers, sorted
    into ours and the others.

    A discovered node is ours when it announces our cluster's fingerprint and answers Info within
    `answer_timeout` (in parallel, so a black-holed record costs seconds, once). Nodes announcing
    no fingerprint are ours only if Info gets through (which mutual TLS allows only within the
    cluster). Returns early once `wait_for` nodes that announce our fingerprint are known.
    """
    fingerprint = own_fingerprint()
    records: list[NodeRecord] = []
    others: list[NodeRecord] = []
    for peer in peers:
        try:
            records.append(static_record(peer, timeout=max(timeout, 1.0)))
        except NodeError as exc:
            others.append(NodeRecord("?", peer, "", "?", {"error": exc.message}, source="static",
                                     note=f"no answer ({exc.message})"))
    static_addresses = {r.address for r in records} | {r.address for r in others}
    found: list[NodeRecord] = []
    if wait_for is None or len(records) < wait_for:
        deadline = time.monotonic() + timeout
        with NodeWatcher(interfaces, cluster=ANY_CLUSTER) as watcher:
            def enough(nodes: dict[str, NodeRecord]) -> bool:
                claimed = [r for r in nodes.values() if fingerprint and r.cluster == fingerprint]
                return wait_for is not None and len(records) + len(claimed) >= wait_for

            watcher.wait(enough, max(0.0, deadline - time.monotonic()))
            found = [r for r in watcher.nodes.values() if r.address not in static_addresses]
    candidates = []
    for record in found:
        if fingerprint and record.cluster in (fingerprint, ""):
            candidates.append(record)
        else:
            record.note = _foreign_note(record)
            others.append(record)
    if candidates:
        with ThreadPoolExecutor(max_workers=min(16, len(candidates))) as pool:
            checked = list(pool.map(lambda r: _confirm(r, fingerprint, answer_timeout), candidates))
        others += [r for r in checked if r.note]
        found = [r for r in checked if not r.note]
    else:
        found = []
    return Survey(records + sorted(found, key=lambda r: r.name), sorted(others, key=lambda r: r.name))


def discover(
    timeout: float = 2.0,
    interfaces: list[str] | None = None,
    peers: Iterable[str] = (),
    wait_for: int | None = None,
) -> list[NodeRecord]:
    """The nodes of our cluster that `survey` finds; each one left out is logged on one line
    (a node of another cluster at INFO, a silent one as a WARNING), so none is dropped unsaid."""
    seen = survey(timeout, interfaces, peers, wait_for)
    for record in seen.others:
        level = logging.INFO if record.note.startswith("another cluster") else logging.WARNING
        log.log(level, "skipping node %s at %s: %s", record.name, record.address, record.note)
    return seen.ours


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
