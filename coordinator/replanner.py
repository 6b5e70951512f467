"""Re-plan a running `--layout auto` model when a link's RTT or bandwidth moves.

The driver reports every decode step's time. The first `window` steps set the baseline; when the
median of the last `window` steps strays from it by more than `drift` (either way), or after
`every` steps, every measured node's link is probed again (`link_probe.probe_link`: ~20 small
round trips and one bulk echo on a fresh stream). A node whose RTT moved by more than
`rtt_threshold` (relative, and at least `rtt_floor_s`) or whose bandwidth changed by more than
`bandwidth_factor` gets its new figures in the costs, and the planner chooses again from them
(compute figures are kept: they do not move with the network). A choice other than the running
one is handed back for the driver to redeploy only when it is predicted at least `min_gain`
faster than the running layout re-costed on the same new figures (or the running one no longer
fits): two near-equal layouts must not trade places on every probe's noise. The baseline
restarts either way, so a step-time drift with unchanged links (a noisy neighbour) costs one
probe, not one per step.

As `split run --replan-every` does for split computing, but triggered by what the steps show.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgeweave.splitting.layout_planner import Candidate, ClusterCosts, LayoutPlan, NodeCosts

log = logging.getLogger(__name__)

#: (node index) -> (rtt_s, bandwidth_Bps) measured now
LinkProbe = Callable[[int], tuple[float, float]]
#: new costs -> the planner's candidates over them, and its choice
Planner = Callable[[ClusterCosts], LayoutPlan]


@dataclass
class LinkMove:
    """One node's link figures before and after a probe that found them moved."""

    node: str
    rtt_before_s: float
    rtt_after_s: float
    bandwidth_before_Bps: float
    bandwidth_after_Bps: float


@dataclass
class Replanner:
    costs: ClusterCosts
    choice: Candidate
    probe: LinkProbe
    plan: Planner
    window: int = 8
    drift: float = 0.5
    every: int = 0  # probe at least every this many decode steps (0 = only on drift)
    rtt_threshold: float = 0.5
    rtt_floor_s: float = 0.5e-3
    bandwidth_factor: float = 2.0
    min_gain: float = 0.1  # a move must be predicted this much faster than staying
    #: what each probe found moved, and what was chosen then (for the run's stats)
    history: list[dict] = field(default_factory=list)
    _steps: deque = field(default_factory=deque)
    _baseline: float | None = None
    _since_probe: int = 0

    def __post_init__(self) -> None:
        if self.window < 2 or self.drift <= 0 or self.every < 0 or self.rtt_threshold <= 0 or self.bandwidth_factor <= 1 \
                or not 0 <= self.min_gain < 1:
            raise ValueError("replanning needs window >= 2, drift > 0, every >= 0, rtt_threshold > 0, "
                             "bandwidth_factor > 1 and 0 <= min_gain < 1")
        self._steps = deque(maxlen=self.window)

    def observe(self, step_s: float) -> Candidate | None:
        """Record one decode step; a new choice when the links moved and the planner now picks another layout."""
        self._steps.append(step_s)
        self._since_probe += 1
        if len(self._steps) < self.window:
            return None
        median = statistics.median(self._steps)
        if self._baseline is None:
            self._baseline = median
            return None
        drifted = abs(median / self._baseline - 1) > self.drift
        if not drifted and not (self.every and self._since_probe >= self.every):
            return None
        return self.recheck(f"decode steps at {median * 1e3:.1f} ms against {self._baseline * 1e3:.1f} ms"
                            if drifted else f"{self._since_probe} steps since the last probe")

    def recheck(self, why: str) -> Candidate | None:
        """Probe every link now; the planner's new choice if the moved links change it, else None."""
        self._steps.clear()
        self._baseline, self._since_probe = None, 0
        moves, nodes = [], list(self.costs.nodes)
        for i, node in enumerate(nodes):
            rtt, bandwidth = self.probe(i)
            if self._moved(node, rtt, bandwidth):
                moves.append(LinkMove(node.name, node.rtt_s, rtt, node.bandwidth_Bps, bandwidth))
                nodes[i] = dataclasses.replace(node, rtt_s=rtt, bandwidth_Bps=bandwidth)
        record = {"why": why, "moved": [dataclasses.asdict(m) for m in moves], "layout": self.choice.describe()}
        self.history.append(record)
        if not moves:
            log.info("re-plan check (%s): no link moved", why)
            return None
        self.costs = dataclasses.replace(self.costs, nodes=tuple(nodes))
        plan = self.plan(self.costs)
        new, staying = plan.choice, self._running(plan)
        if new is None or self._is_running(new) or (
                staying is not None and new.decode_s > staying.decode_s * (1 - self.min_gain)):
            log.info("re-plan check (%s): %s moved; %s stays (predicted %s ms/token)", why,
                     ", ".join(m.node for m in moves), self.choice.describe(),
                     f"{staying.decode_s * 1e3:.1f}" if staying is not None else "?")
            return None
        log.warning("link(s) %s moved (%s): re-planning from %s to %s (predicted %.1f ms/token)",
                    ", ".join(m.node for m in moves), why, self.choice.describe(), new.describe(), new.decode_s * 1e3)
        record["layout"] = new.describe()
        self.choice = new
        return new

    def _is_running(self, candidate: Candidate) -> bool:
        return (candidate.layout, candidate.nodes) == (self.choice.layout, self.choice.nodes)

    def _running(self, plan: LayoutPlan) -> Candidate | None:
        """The running layout as the new plan costs it; None when it no longer fits (or is not a candidate)."""
        return next((c for c in plan.candidates if c.fits and self._is_running(c)), None)

    def _moved(self, node: NodeCosts, rtt: float, bandwidth: float) -> bool:
        rtt_moved = abs(rtt - node.rtt_s) > max(self.rtt_floor_s, self.rtt_threshold * node.rtt_s)
        if math.isinf(bandwidth) and math.isinf(node.bandwidth_Bps):
            return rtt_moved  # neither figure is a measurement of a cap
        ratio = bandwidth / node.bandwidth_Bps if node.bandwidth_Bps else 1.0
        return rtt_moved or not (1 / self.bandwidth_factor <= ratio <= self.bandwidth_factor)


def node_probe(clients: Sequence, hidden: int, budget_s: float = 0.2) -> LinkProbe:
    """A LinkProbe over `clients` (the nodes the costs were measured on, in their order)."""
    from edgeweave.coordinator.link_probe import probe_link

    def probe(i: int) -> tuple[float, float]:
        link = probe_link(clients[i], hidden, budget_s=budget_s)
        return link.rtt_s, link.bandwidth_Bps

    return probe
