"""Which nodes a command uses: the `--peer` list exactly, else what mDNS finds.

Given peers are the whole cluster: each must answer, and one that does not is an error that
names it (a typo'd port must not quietly fall back to whatever else announces itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeweave.coordinator.client import NodeError
from edgeweave.coordinator.discovery import NodeRecord, discover, static_record


class NodeSelectionError(ValueError):
    """A listed peer is malformed or did not answer; the text names it."""


def check_peer(peer: str) -> str:
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeSelectionError(f"peer {peer!r} is not host:port, e.g. 10.0.0.7:50551")
    return peer


def exact_peers(peers: Sequence[str], timeout: float = 3.0) -> list[NodeRecord]:
    """A record for every peer, in order, or NodeSelectionError naming each one that did not answer."""
    records, silent = [], []
    for peer in peers:
        try:
            records.append(static_record(check_peer(peer), timeout=timeout))
        except NodeError as exc:
            silent.append(f"{peer} ({exc.message})")
    if silent:
        raise NodeSelectionError(f"peer {'; '.join(silent)} did not answer; start it or leave it out of --peer")
    return records


def find_nodes(peers: Sequence[str] | None, interfaces: Sequence[str] | None, timeout: float) -> list[NodeRecord]:
    """The `--peer` nodes when given (all of them, or an error); else nodes announced on mDNS
    within `timeout` seconds (none when it is 0)."""
    if peers:
        return exact_peers(peers)
    if timeout <= 0:
        return []
    return discover(timeout=timeout, interfaces=list(interfaces) if interfaces else None)
