"""What this machine offers: a psutil snapshot and quick micro-benchmarks for the planner.

Pure: no networking. The node reports these numbers through Info/Health/Profile; the planner
divides work in proportion to them. Both see the process's cgroup (runtime/cgroups.py): a CPU
quota lowers the cores and the measured throughput, a memory limit the total and available RAM.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from edgeweave.runtime import cpu_dilation
from edgeweave.runtime.cgroups import CgroupLimits, cgroup_limits

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory_budget(text: str | int | float, available: int | None = None) -> int:
    """Bytes from '2GiB', '512MB', '0.5' (a fraction of available RAM) or a plain byte count; 0 = unlimited."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {text!r} is not understood; use e.g. 2GiB, 512MB, 0.5 (of free RAM) or bytes")
    value, unit = float(match.group(1)), match.group(2).lower()
    if not unit and 0 < value < 1:
        return int(value * (available if available is not None else memory_totals()[1]))
    return int(value * _UNITS[unit])


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from '8GiB', '512MB', '1.5G' or a plain byte count (no fractions of RAM: a bound, not a share)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{what} {text!r} is not understood; use e.g. 8GiB, 512MB or a byte count (0 = unlimited)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def usable_cores() -> int:
    """Cores this process may run on (honours taskset / cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_cores(limits: CgroupLimits | None = None) -> float:
    """The compute this process may use, in cores: its affinity, capped by a CFS quota (a container's
    --cpus, systemd's CPUQuota=, the test bed's device profile). 0.25 = a quarter of one core."""
    limits = limits or cgroup_limits()
    cores = float(usable_cores())
    cores = min(cores, limits.cpu_quota_cores) if limits.cpu_quota_cores else cores
    return cores * cpu_dilation.fraction()  # an emulated slower device's cores are that much less


def memory_totals(limits: CgroupLimits | None = None) -> tuple[int, int]:
    """(total, available) bytes for this process: the machine's, capped by its cgroup's memory limit."""
    limits = limits or cgroup_limits()
    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    if limits.memory_limit is not None:
        total = min(total, limits.memory_limit)
        available = min(available, limits.memory_available if limits.memory_available is not None else total)
    return total, available


def accelerators() -> list[str]:
    """Names of accelerators worth planning around: CUDA devices, and the board name on Jetson/RPi."""
    found: list[str] = []
    if torch.cuda.is_available():
        found += [f"cuda:{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    model = Path("/proc/device-tree/model")
    with contextlib.suppress(OSError):
        board = model.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
        if board and ("Jetson" in board or "Raspberry" in board or "Orin" in board):
            found.append(f"board:{board}")
    return found


def backends() -> list[str]:
    """Compute backends this node can run: torch always, plus each onnxruntime provider."""
    names = ["torch"]
    try:
        import onnxruntime

        names += [f"onnxruntime:{p}" for p in onnxruntime.get_available_providers()]
    except ImportError:
        pass
    return names


@dataclass
class ResourceSnapshot:
    total_memory: int  # the machine's RAM, or the cgroup's memory limit if lower
    available_memory: int  # psutil's available, or the limit less the cgroup's working set if lower
    cpu_count: int  # cores of the affinity mask (threads worth running)
    arch: str
    system: str
    accelerators: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    memory_budget: int = 0
    disk_free: int = 0
    cpu_load: float = 0.0
    cpu_cores: float = 0.0  # cpu_count capped by a CFS quota: 0.25 = a quarter of one core


def snapshot(data_dir: Path | None = None, memory_budget: int = 0, *, static: ResourceSnapshot | None = None) -> ResourceSnapshot:
    """Current resources. Pass `static` (an earlier snapshot) to skip the slow accelerator/backend probe."""
    limits = cgroup_limits()
    total, available = memory_totals(limits)
    cores = usable_cores()
    load = os.getloadavg()[0] / cores if hasattr(os, "getloadavg") else 0.0
    disk_free = shutil.disk_usage(data_dir).free if data_dir and Path(data_dir).exists() else 0
    return ResourceSnapshot(
        total_memory=total,
        available_memory=available,
        cpu_count=cores,
        cpu_cores=cpu_cores(limits),
        arch=platform.machine(),
        system=platform.system(),
        accelerators=list(static.accelerators) if static else accelerators(),
        backends=list(static.backends) if static else backends(),
        memory_budget=memory_budget,
        disk_free=disk_free,
        cpu_load=load,
    )


@dataclass
class ProfileResult:
    matmul_gflops: float
    memory_bandwidth_gbps: float
    disk_read_mbps: float
    threads: int


def _sustained(span_s: float, fn) -> float:
    """Seconds per call of fn, as total wall time / calls over at least span_s (after one warm-up
    call; at least two calls). Not the best single call: under a CFS quota a call that runs while
    the cgroup still has quota takes the unthrottled time, and only the average over several
    periods includes the time spent throttled, i.e. what the process can sustain. An emulated
    slower device (runtime/cpu_dilation.py) times the calls as that device would."""
    fn()
    calls = 0
    clock = cpu_dilation.DeviceClock()
    while True:
        fn()
        calls += 1
        elapsed = clock.elapsed()
        if elapsed >= span_s and calls >= 2:
            return elapsed / calls


def matmul_gflops(n: int = 512, budget_s: float = 0.3) -> float:
    """Sustained float32 n x n matmul throughput over about budget_s seconds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = _sustained(budget_s, lambda: torch.mm(a, b))
    return 2 * n**3 / seconds / 1e9


def memory_bandwidth_gbps(megabytes: int = 64, budget_s: float = 0.3) -> float:
    """Sustained copy bandwidth over about budget_s seconds."""
    src = torch.ones(megabytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    seconds = _sustained(budget_s, lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / 1e9  # a copy reads and writes every byte


def disk_read_mbps(directory: Path, megabytes: int = 32) -> float:
    """Sequential read speed of a fresh file, evicted from the page cache first where the OS allows."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    fd, name = tempfile.mkstemp(prefix=".profile-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        return megabytes / max(time.perf_counter() - start, 1e-9)
    finally:
        os.unlink(name)


#: CFS periods the matmul span covers at least under a quota: a span that ends mid-period is off by at
#: most one period's share, so 5 periods bound that error to about 20% even at the 100 ms default
QUOTA_PERIODS = 5


def profile(data_dir: Path, matmul_size: int = 0, budget_s: float = 0.0) -> ProfileResult:
    """All three micro-benchmarks within about `budget_s` seconds (default 1 s). Under a CPU quota
    the matmul span is stretched to QUOTA_PERIODS periods (within 0.7 of the budget), at the
    memory benchmark's expense, so a capped node reports its capped speed."""
    budget = budget_s if budget_s > 0 else 1.0
    matmul_s = budget * 0.4
    period = cgroup_limits().cpu_period_s
    if period:
        matmul_s = max(matmul_s, min(QUOTA_PERIODS * period, budget * 0.7))
    return ProfileResult(
        matmul_gflops=matmul_gflops(matmul_size or 512, matmul_s),
        memory_bandwidth_gbps=memory_bandwidth_gbps(64, max(budget * 0.1, budget * 0.7 - matmul_s)),
        disk_read_mbps=disk_read_mbps(Path(data_dir), 32 if budget >= 0.5 else 8),
        threads=torch.get_num_threads(),
    )
