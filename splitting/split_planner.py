"""Neurosurgeon-style choice of where to split: minimise end-to-end latency per image.

For each candidate k (k = 0: send the input and run everything on the server; k = L: run
everything on the device; in between: head on the device, tail on the server)

    latency(k) = device_s(head_k) + bytes(k) / bandwidth + rtt + server_s(tail_k)

with no link term for k = L. Device and server times come from timing the real halves on
the real nodes (coordinator/split_driver.py) or, before anything is deployed, from FLOPs
and each node's measured GFLOP/s. `Replanner` re-plans when the measured bandwidth moves
by more than a threshold, so a flapping link does not make the deployment thrash.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from edgeweave.splitting.split_points import SplitPoint

LOCAL, OFFLOAD, SPLIT = "local", "offload", "split"


@dataclass(frozen=True)
class Candidate:
    """One way to run an image: `bytes_up` device->server, `bytes_down` back (logits); times in seconds."""

    name: str
    kind: str  # local | offload | split
    device_s: float
    server_s: float
    bytes_up: int
    bytes_down: int = 0


@dataclass(frozen=True)
class Link:
    """The device<->server link as measured: bandwidth in bit/s (each direction) and round trip in seconds."""

    bandwidth_bps: float
    rtt_s: float


def latency(candidate: Candidate, link: Link) -> float:
    """Predicted seconds per image for `candidate` over `link`."""
    if candidate.kind == LOCAL:
        return candidate.device_s
    transfer = 8.0 * (candidate.bytes_up + candidate.bytes_down) / link.bandwidth_bps
    return candidate.device_s + transfer + link.rtt_s + candidate.server_s


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    link: Link
    table: list[tuple[Candidate, float]] = field(default_factory=list)  # every candidate with its latency

    @property
    def predicted_s(self) -> float:
        return latency(self.choice, self.link)


def plan(candidates: Iterable[Candidate], link: Link) -> Plan:
    """The fastest candidate over `link`; ties go to the earlier candidate (fewer layers on the device)."""
    if link.bandwidth_bps <= 0 or link.rtt_s < 0:
        raise ValueError(f"a link needs positive bandwidth and non-negative RTT, got {link}")
    table = [(c, latency(c, link)) for c in candidates]
    if not table:
        raise ValueError("no split candidates to plan over")
    best = min(table, key=lambda row: row[1])[0]
    return Plan(best, link, table)


class Replanner:
    """Keeps the current plan; re-plans only when bandwidth moves more than `threshold` (relative)."""

    def __init__(self, candidates: Iterable[Candidate], link: Link, threshold: float = 0.25) -> None:
        self.candidates = list(candidates)
        self.threshold = threshold
        self.current = plan(self.candidates, link)
        self.replans = 0

    def observe(self, bandwidth_bps: float, rtt_s: float | None = None) -> Plan | None:
        """Feed a new measurement; returns the new plan if it was re-planned, else None."""
        planned = self.current.link.bandwidth_bps
        if abs(bandwidth_bps - planned) <= self.threshold * planned:
            return None
        link = replace(self.current.link, bandwidth_bps=bandwidth_bps, rtt_s=self.current.link.rtt_s if rtt_s is None else rtt_s)
        self.current = plan(self.candidates, link)
        self.replans += 1
        return self.current


def candidates_from_flops(
    points: list[SplitPoint],
    device_gflops: float,
    server_gflops: float,
    bytes_per_element: float = 1.0,
    input_bytes: int | None = None,
) -> list[Candidate]:
    """Estimates for every split point from FLOPs and each side's GFLOP/s (the fallback before timing).

    `bytes_per_element` = 1 for activations sent as uint8 (4 for float32); `input_bytes` overrides
    the k = 0 payload (e.g. the image as uint8 pixels).
    """
    out = []
    for p in points:
        numel = p.nbytes // 4
        kind = OFFLOAD if p.is_input else LOCAL if p.is_output else SPLIT
        sent = input_bytes if (p.is_input and input_bytes is not None) else int(numel * bytes_per_element)
        out.append(
            Candidate(
                name=p.label,
                kind=kind,
                device_s=p.head_flops / (device_gflops * 1e9),
                server_s=p.tail_flops / (server_gflops * 1e9),
                bytes_up=0 if kind == LOCAL else sent,
                bytes_down=0 if kind == LOCAL else int(points[-1].nbytes),
            )
        )
    return out


def format_table(result: Plan) -> list[list[str]]:
    """Rows for printing: name, kind, device ms, bytes up, server ms, predicted ms, chosen marker."""
    rows = []
    for c, seconds in result.table:
        rows.append([
            c.name, c.kind, f"{c.device_s * 1e3:.3f}", str(c.bytes_up), f"{c.server_s * 1e3:.3f}",
            f"{seconds * 1e3:.3f}", "<-" if c is result.choice else "",
        ])
    return rows
