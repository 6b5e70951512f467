"""The resource probe sees cgroup limits (v1 and v2, every level up the tree), and the profile
reports sustained throughput: fast tests on fake cgroup trees (the real ones: test_edge_testbed.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeweave.coordinator.cli_cluster import _cores
from edgeweave.runtime import resources
from edgeweave.runtime.cgroups import CgroupLimits, cgroup_limits, own_cgroup


def _tree(tmp_path: Path, mountinfo: list[str], cgroup: list[str], files: dict[str, str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("".join(line.replace("FAKE", str(tmp_path)) + "\n" for line in mountinfo))
    (proc / "cgroup").write_text("".join(line + "\n" for line in cgroup))
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc


def test_v2_takes_the_tightest_level_and_leaves_reclaimable_cache_out(tmp_path):
    proc = _tree(tmp_path, ["30 23 0:26 / FAKE/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"], ["0::/slice/app"], {
        "cg/cgroup.controllers": "cpuset cpu memory",
        "cg/slice/cpu.max": "max 100000",
        "cg/slice/memory.max": str(2 << 30),  # the slice caps at 2 GiB...
        "cg/slice/memory.current": str(1 << 30),
        "cg/slice/memory.stat": f"anon 1\ninactive_file {256 << 20}\nactive_file 5",
        "cg/slice/app/cpu.max": "25000 100000",  # ...the app at a quarter core, memory unlimited
        "cg/slice/app/memory.max": "max",
        "cg/slice/app/memory.current": str(900 << 20),
    })
    limits = cgroup_limits(proc)
    assert limits == CgroupLimits(cpu_quota_cores=0.25, cpu_period_s=0.1, memory_limit=2 << 30,
                                  memory_available=(2 << 30) - ((1 << 30) - (256 << 20)))
    assert own_cgroup("cpu", proc) == (2, tmp_path / "cg/slice/app", tmp_path / "cg")
    assert own_cgroup("hugetlb", proc) is None  # not a controller of that tree


def test_v1_separate_hierarchies_and_a_container_mounted_sub_tree(tmp_path):
    proc = _tree(tmp_path, [
        "32 31 0:29 /docker/abc FAKE/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        "35 31 0:32 / FAKE/memory rw,relatime - cgroup cgroup rw,memory",
        "40 31 0:38 / FAKE/unified rw,relatime - cgroup2 cgroup2 rw",
    ], ["4:memory:/user/bed-n1", "2:cpu,cpuacct:/docker/abc", "0::/"], {
        "cpu/cpu.cfs_quota_us": "40000",  # the container's own level is the mount's root
        "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "unlimited"
        "memory/memory.usage_in_bytes": "0",
        "memory/user/memory.limit_in_bytes": "9223372036854771712",
        "memory/user/bed-n1/memory.limit_in_bytes": str(768 << 20),
        "memory/user/bed-n1/memory.usage_in_bytes": str(300 << 20),
        "memory/user/bed-n1/memory.stat": f"cache 9\ninactive_file 1\ntotal_inactive_file {100 << 20}",
    })
    limits = cgroup_limits(proc)
    assert limits.cpu_quota_cores == pytest.approx(0.4) and limits.cpu_period_s == pytest.approx(0.1)
    assert limits.memory_limit == 768 << 20 and limits.memory_available == (768 - 200) << 20
    assert own_cgroup("memory", proc) == (1, tmp_path / "memory/user/bed-n1", tmp_path / "memory")


def test_no_cgroups_no_limits(tmp_path):
    proc = _tree(tmp_path, ["22 1 8:1 / / rw - ext4 /dev/sda1 rw"], [], {})
    assert cgroup_limits(proc) == CgroupLimits()
    assert cgroup_limits(tmp_path / "nowhere") == CgroupLimits()


def test_cores_and_memory_are_capped_by_the_limits():
    affinity = resources.usable_cores()
    assert resources.cpu_cores(CgroupLimits(cpu_quota_cores=0.25)) == 0.25
    assert resources.cpu_cores(CgroupLimits(cpu_quota_cores=affinity + 3.0)) == affinity  # cpuset wins
    assert resources.cpu_cores(CgroupLimits()) == affinity
    total, available = resources.memory_totals(CgroupLimits(memory_limit=512 << 20, memory_available=100 << 20))
    assert (total, available) == (512 << 20, 100 << 20)
    host_total, host_available = resources.memory_totals(CgroupLimits())
    assert host_total > 512 << 20 and 0 < host_available <= host_total


def test_this_process_snapshot_reports_its_cores_as_a_float():
    snap = resources.snapshot()
    assert isinstance(snap.cpu_cores, float) and 0 < snap.cpu_cores <= snap.cpu_count


def test_throughput_is_sustained_not_the_best_call():
    """A call that takes 1 ms, then 9 ms, then 1 ms...: a throttled process looks like this (fast
    while it has quota, stalled after). Sustained is the 5 ms average; the best call would say 1 ms."""
    durations = iter([0.001, 0.009] * 1000)
    seconds = resources._sustained(0.2, lambda: time.sleep(next(durations)))
    assert 0.0045 < seconds < 0.0075


@pytest.mark.parametrize(("props", "shown"), [
    ({"cores": "1", "cpu_cores": "0.25"}, "1 (0.25)"),  # capped by a quota
    ({"cores": "4", "cpu_cores": "4"}, "4"),  # no quota
    ({"cores": "4"}, "4"),  # an older node announces no cpu_cores
    ({}, "?"),
])
def test_nodes_shows_the_quota_next_to_the_cores(props, shown):
    assert _cores(props) == shown
