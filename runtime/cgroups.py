"""The CPU and memory limits of this process's cgroup (v1 or v2), read from cgroupfs.

A node in a container, under systemd's CPUQuota=/MemoryMax=, or in the edge test bed has less than
the machine: sched_getaffinity sees its cpuset but not a CFS quota, and psutil sees the host's RAM,
not the memory limit. The planner divides work by what a node reports, so it must report these.

Limits are hierarchical: every level from this process's cgroup up to the hierarchy's root can
cap it, so each level is read and the tightest wins. Pure file reading: no networking, no
subprocesses; `proc` and the mount table can point at a fake tree (tests).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

#: v1 writes "no limit" as a huge page-aligned number (LONG_MAX rounded down to a page)
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupLimits:
    cpu_quota_cores: float | None = None  # CFS quota / period of the tightest level; None = no quota
    cpu_period_s: float | None = None  # the CFS period at that level (throttling granularity)
    memory_limit: int | None = None  # bytes; None = unlimited
    memory_available: int | None = None  # limit - working set at the tightest level; None = unlimited


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path mounted here ("/" unless the mount is of a sub-tree)
    point: Path
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: the controllers of that hierarchy; v2: empty (see cgroup.controllers)


def _mounts(mountinfo: Path) -> list[_Mount]:
    """cgroup and cgroup2 mounts from /proc/self/mountinfo
    (fields: id parent dev root point options [optional...] - type source super-options)."""
    found: list[_Mount] = []
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
            if tail[0] == "cgroup2":
                found.append(_Mount(root, point, 2, frozenset()))
            else:
                found.append(_Mount(root, point, 1, frozenset(tail[2].split(","))))
    return found


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _membership(proc_cgroup: Path) -> tuple[dict[str, str], str | None]:
    """(v1 controller -> cgroup path, the v2 path) from /proc/self/cgroup ("id:controllers:path")."""
    v1: dict[str, str] = {}
    v2: str | None = None
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            if parts[0] == "0" and controllers == "":
                v2 = path
            else:
                for name in controllers.split(","):
                    v1[name] = path
    return v1, v2


def _levels(mount: _Mount, path: str) -> list[Path]:
    """The directories from this process's cgroup up to the mount point (leaf first)."""
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root.rstrip("/") + "/")):
        path = path[len(mount.root):]
    elif mount.root != "/":
        return [mount.point]  # our cgroup is outside what is mounted: only the mount's own level is visible
    leaf = mount.point / path.lstrip("/")
    levels = [leaf]
    while levels[-1] != mount.point and mount.point in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def _directories(controller: str, mounts: list[_Mount], v1: dict[str, str], v2: str | None) -> list[Path]:
    """Where `controller`'s files are for this process: its v1 hierarchy if one is mounted, else the v2 tree."""
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers and controller in v1:
            return _levels(mount, v1[controller])
    for mount in mounts:
        if mount.version == 2 and v2 is not None:
            return _levels(mount, v2)
    return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _inactive_file(stat: str | None, key: str) -> int:
    """Page cache the kernel drops before it OOM-kills (what `docker stats` leaves out of usage too)."""
    for line in (stat or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value) or 0
    return 0


def _cpu_level(directory: Path) -> tuple[float, float] | None:
    """(quota cores, period s) set at this level, or None where it has no quota."""
    both = _read(directory / "cpu.max")  # v2: "max 100000" or "25000 100000"
    if both is not None:
        quota, _, period = both.partition(" ")
        q, p = _int(quota), _int(period)
        return (q / p, p / 1e6) if q and p and q > 0 else None
    q, p = _int(_read(directory / "cpu.cfs_quota_us")), _int(_read(directory / "cpu.cfs_period_us"))
    return (q / p, p / 1e6) if q and p and q > 0 else None


def _memory_level(directory: Path) -> tuple[int, int] | None:
    """(limit, available) at this level, or None where it has no limit."""
    limit_text = _read(directory / "memory.max")
    if limit_text is not None:  # v2: memory.current and memory.stat cover the sub-tree
        limit = _int(limit_text)  # "max" reads as None
        usage = _int(_read(directory / "memory.current")) or 0
        cache = _inactive_file(_read(directory / "memory.stat"), "inactive_file")
    else:  # v1: usage_in_bytes is hierarchical (use_hierarchy), so is total_inactive_file
        limit = _int(_read(directory / "memory.limit_in_bytes"))
        if limit is not None and limit >= _V1_UNLIMITED:
            limit = None
        usage = _int(_read(directory / "memory.usage_in_bytes")) or 0
        cache = _inactive_file(_read(directory / "memory.stat"), "total_inactive_file")
    if limit is None:
        return None
    return limit, max(0, limit - max(0, usage - cache))


def own_cgroup(controller: str, proc: Path = Path("/proc/self")) -> tuple[int, Path, Path] | None:
    """(cgroup version, this process's cgroup directory, the hierarchy's mount point) for
    `controller`: its v1 hierarchy if one is mounted, else the v2 tree; None without either.
    What a launcher needs to create child cgroups next to (v1) or under (v2) its own."""
    mounts = _mounts(proc / "mountinfo")
    v1, v2 = _membership(proc / "cgroup")
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers and controller in v1:
            return 1, _levels(mount, v1[controller])[0], mount.point
    for mount in mounts:
        enabled = (_read(mount.point / "cgroup.controllers") or "").split() if mount.version == 2 else []
        if mount.version == 2 and v2 is not None and controller in enabled:
            return 2, _levels(mount, v2)[0], mount.point
    return None


def cgroup_limits(proc: Path = Path("/proc/self")) -> CgroupLimits:
    """This process's effective CPU quota and memory limit over every level of its cgroups."""
    mounts = _mounts(proc / "mountinfo")
    if not mounts:
        return CgroupLimits()
    v1, v2 = _membership(proc / "cgroup")
    cpu = [level for d in _directories("cpu", mounts, v1, v2) if (level := _cpu_level(d))]
    memory = [level for d in _directories("memory", mounts, v1, v2) if (level := _memory_level(d))]
    quota, period = min(cpu) if cpu else (None, None)
    return CgroupLimits(
        cpu_quota_cores=quota, cpu_period_s=period,
        memory_limit=min(limit for limit, _ in memory) if memory else None,
        memory_available=min(available for _, available in memory) if memory else None,
    )
