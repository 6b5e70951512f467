"""One cgroup per emulated device: a CPU quota, a cpuset and a memory limit (cgroup v1 or v2).

v1 (this VM: cpu, cpuset and memory are separate hierarchies): one directory per controller, each
under the cgroup this process is in, so the devices stay inside whatever limits the process
running the bed already has. v2: under the root of the unified tree (the only cgroup
exempt from the no-internal-processes rule), with cpu, cpuset and memory enabled for its children.

Names carry the test bed's tag (`ewtb-<pid>-<hex>`): `clean_leftovers` removes the cgroups of runs
whose process is gone (a SIGKILLed test), killing what still runs inside first: a cgroup can only
be removed once it has no tasks.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import time
from pathlib import Path

from edgeweave.runtime.cgroups import own_cgroup

CONTROLLERS = ("cpu", "cpuset", "memory")
#: the CFS period of every device. Short on purpose: with the 100 ms default a 0.25-core device
#: runs 25 ms flat out and then sits throttled for 75 ms, so one forward step of a few ms either
#: costs nothing or waits up to 75 ms (latency in bursts, nothing like a slow CPU). At 4 ms (the
#: shortest that still gives a 0.25 device the kernel's 1 ms minimum quota) the worst stall is 3 ms:
#: a tensor-parallel token of a 22-layer model is 44 exchanges of a few ms each, and at 10 ms
#: (7.5 ms stalls) the throttling, not the device's speed, dominated them.
PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel's smallest quota
_TAG = re.compile(r"^ewtb-(\d+)-")


class CgroupUnavailable(RuntimeError):
    """This machine offers no cgroup with cpu, cpuset and memory that we may use."""


def _write(path: Path, value: str | int) -> None:
    path.write_text(f"{value}\n")


def _v1_dirs() -> dict[str, Path] | None:
    found = {c: own_cgroup(c) for c in CONTROLLERS}
    if all(f is not None and f[0] == 1 for f in found.values()):
        return {c: f[1] for c, f in found.items()}
    return None


def _v2_root() -> Path | None:
    found = [own_cgroup(c) for c in CONTROLLERS]
    if all(f is not None and f[0] == 2 for f in found):
        return found[0][2]
    return None


def available() -> str | None:
    """None if device cgroups can be made here, else why not (a sentence)."""
    if os.geteuid() != 0:
        return "cgroups need root"
    if _v1_dirs() is None and _v2_root() is None:
        return "no cgroup v1 hierarchies nor a cgroup2 tree with cpu, cpuset and memory controllers"
    return None


class DeviceCgroup:
    """`DeviceCgroup(name, cpu_fraction, cpus, memory)`: created at once; `procs_files` are what a
    process writes its pid into to join (all of them); `close()` kills its tasks and removes it."""

    def __init__(self, name: str, cpu_fraction: float | None, cpus: list[int], memory: int) -> None:
        self.name = name  # cpu_fraction None: no CFS quota (the device's speed is emulated otherwise)
        self.period_us = max(PERIOD_US, math.ceil(MIN_QUOTA_US / cpu_fraction)) if cpu_fraction else PERIOD_US
        self.quota_us = max(MIN_QUOTA_US, round(cpu_fraction * self.period_us)) if cpu_fraction else -1
        self.cpus = ",".join(str(c) for c in cpus)
        self.memory = memory
        v1 = _v1_dirs()
        if v1 is not None:
            self.version, self.dirs = 1, {c: parent / name for c, parent in v1.items()}
        elif (root := _v2_root()) is not None:
            self.version, self.dirs = 2, dict.fromkeys(CONTROLLERS, root / name)
        else:
            raise CgroupUnavailable(available() or "no usable cgroup")
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        if self.version == 1:
            for d in self.dirs.values():
                d.mkdir()
            cpu, cpuset, mem = self.dirs["cpu"], self.dirs["cpuset"], self.dirs["memory"]
            _write(cpu / "cpu.cfs_period_us", self.period_us)
            _write(cpu / "cpu.cfs_quota_us", self.quota_us)
            _write(cpuset / "cpuset.cpus", self.cpus)
            _write(cpuset / "cpuset.mems", (cpuset.parent / "cpuset.mems").read_text().strip())
            _write(mem / "memory.limit_in_bytes", self.memory)
            with contextlib.suppress(OSError):  # only with swap accounting: no swapping past the limit
                _write(mem / "memory.memsw.limit_in_bytes", self.memory)
            with contextlib.suppress(OSError):
                _write(mem / "memory.swappiness", 0)
        else:
            d = self.dirs["cpu"]
            control = d.parent / "cgroup.subtree_control"
            enabled = control.read_text().split()
            missing = [c for c in CONTROLLERS if c not in enabled]
            if missing:
                try:
                    _write(control, " ".join(f"+{c}" for c in missing))
                except OSError as exc:
                    raise CgroupUnavailable(
                        f"cannot enable {', '.join(missing)} for the children of {d.parent}: {exc} (a cgroup with "
                        "processes of its own, e.g. a container's cgroup-namespace root, cannot delegate them)") from None
            d.mkdir()
            _write(d / "cpu.max", f"{self.quota_us if self.quota_us > 0 else 'max'} {self.period_us}")
            _write(d / "cpuset.cpus", self.cpus)
            _write(d / "cpuset.mems", (d.parent / "cpuset.mems.effective").read_text().strip())
            _write(d / "memory.max", self.memory)
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", 0)

    @property
    def procs_files(self) -> list[Path]:
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    @property
    def memory_limit(self) -> int:
        """The limit as the kernel holds it (rounded down to a page)."""
        mem = self.dirs["memory"]
        return int((mem / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).read_text())

    def pids(self) -> set[int]:
        return _pids(self.dirs.values())

    def close(self) -> None:
        _kill_and_remove(self.dirs.values())


def _pids(dirs) -> set[int]:
    found: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (Path(d) / "cgroup.procs").read_text().split())
    return found


def kill_until_gone(list_pids, where: str, timeout: float = 10.0) -> None:
    """SIGKILL every pid `list_pids()` names until it names none (RuntimeError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while pids := list_pids():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} survive SIGKILL in {where}")
        time.sleep(0.05)


def _kill_and_remove(dirs, timeout: float = 10.0) -> None:
    """SIGKILL every task, wait until none is left, then rmdir (it fails while tasks remain)."""
    dirs = [Path(d) for d in dirs if Path(d).exists()]
    kill_until_gone(lambda: _pids(dirs), ", ".join(map(str, dirs)), timeout)
    for d in dirs:
        for _ in range(50):  # a just-killed task can hold the directory a moment longer
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def _walk(root: Path, depth: int = 4):
    """Test-bed cgroup directories under root (not descending into them, nor deeper than depth)."""
    try:
        children = [c for c in root.iterdir() if c.is_dir()]
    except OSError:
        return
    for child in children:
        if _TAG.match(child.name):
            yield child
        elif depth > 1:
            yield from _walk(child, depth - 1)


def clean_leftovers() -> None:
    """Remove the test-bed cgroups of runs whose process is gone (their tasks killed first)."""
    roots = {found[2] for c in CONTROLLERS if (found := own_cgroup(c)) is not None}
    for root in roots:
        for d in list(_walk(root)):
            match = _TAG.match(d.name)
            if match and not os.path.exists(f"/proc/{match.group(1)}"):
                _kill_and_remove([d])


def tagged(tag: str) -> list[Path]:
    """Every cgroup directory whose name starts with `tag` (what a test checks is gone)."""
    roots = {found[2] for c in CONTROLLERS if (found := own_cgroup(c)) is not None}
    return [d for root in roots for d in _walk(root) if d.name.startswith(tag)]
