"""Neurosurgeon-style planner on synthetic cost tables, and re-planning when bandwidth moves."""

from __future__ import annotations

import pytest

from edgeweave.splitting.split_planner import (
    LOCAL,
    OFFLOAD,
    SPLIT,
    Candidate,
    Link,
    Replanner,
    candidates_from_flops,
    latency,
    plan,
)
from edgeweave.splitting.split_points import SplitPoint

# a slow device, a fast server, an image of 3 kB, a bottleneck of 400 B after 10% of the work
CANDIDATES = [
    Candidate("input", OFFLOAD, device_s=0.0, server_s=0.002, bytes_up=3000),
    Candidate("bottleneck", SPLIT, device_s=0.004, server_s=0.0018, bytes_up=400),
    Candidate("output", LOCAL, device_s=0.040, server_s=0.0, bytes_up=0),
]


def test_latency_formula():
    link = Link(bandwidth_bps=8e6, rtt_s=0.001)
    assert latency(CANDIDATES[1], link) == pytest.approx(0.004 + 400 * 8 / 8e6 + 0.001 + 0.0018)
    assert latency(CANDIDATES[2], link) == 0.040  # nothing crosses the link


@pytest.mark.parametrize(
    ("bandwidth_bps", "expected"),
    [(0.05e6, LOCAL), (1e6, SPLIT), (1e9, OFFLOAD)],
)
def test_choice_follows_bandwidth(bandwidth_bps, expected):
    result = plan(CANDIDATES, Link(bandwidth_bps, rtt_s=0.001))
    assert result.choice.kind == expected
    assert result.predicted_s == min(seconds for _, seconds in result.table)


def test_replanner_ignores_small_moves_and_follows_big_ones():
    replanner = Replanner(CANDIDATES, Link(1e6, 0.001), threshold=0.25)
    assert replanner.current.choice.kind == SPLIT
    assert replanner.observe(1.2e6) is None  # +20%: keep the plan
    moved = replanner.observe(1e9)
    assert moved is not None and moved.choice.kind == OFFLOAD and replanner.replans == 1
    assert replanner.observe(0.05e6).choice.kind == LOCAL


def test_flop_estimates_use_each_side_speed():
    points = [
        SplitPoint(0, "x", (1, 1, 4, 4), 64, 0, 100, 0, 1_000_000, is_input=True),
        SplitPoint(3, "mid", (1, 2, 2, 2), 32, 50, 50, 500_000, 500_000),
        SplitPoint(6, "fc", (1, 10), 40, 100, 0, 1_000_000, 0, is_output=True),
    ]
    candidates = candidates_from_flops(points, device_gflops=1.0, server_gflops=10.0, input_bytes=16)
    assert [c.kind for c in candidates] == [OFFLOAD, SPLIT, LOCAL]
    assert candidates[0].bytes_up == 16 and candidates[1].bytes_up == 8  # uint8 activation
    assert candidates[1].device_s == pytest.approx(5e-4) and candidates[1].server_s == pytest.approx(5e-5)
    assert candidates[2].bytes_up == 0


def test_planner_rejects_nonsense():
    with pytest.raises(ValueError):
        plan([], Link(1e6, 0.0))
    with pytest.raises(ValueError):
        plan(CANDIDATES, Link(0.0, 0.0))
