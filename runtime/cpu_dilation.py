"""Emulate a slower CPU by time dilation: after each piece of work, idle for what it would have
taken on a core `fraction` as fast as this one.

Why not only a CFS quota (what the emulated test bed's cgroups also set): a quota is a budget per
period, not a speed. A node that computes 0.5 ms, then waits on the others, runs at full speed
while it has budget and stalls for the rest of the period when it has none; in tensor parallelism
every layer waits for the slowest node, so one node stalled at a period boundary stalls them all,
and the quota a waiting node did not use is lost. A device that is really 4x slower takes exactly
4x as long for every message. Dilation gives exactly that: the work runs at this core's speed and
is then followed by (1 / fraction - 1) x its CPU time of idling, so a message's reply leaves when
it would on the slow device, and the idle time leaves the host's cores to the other emulated
devices (a 2-core host can emulate four quarter-core devices that compute at the same time).

What is dilated is this thread's CPU time (`time.thread_time`: user and kernel time, the TLS and
socket work of a message included), so the node must compute on the thread that handles the
message: a dilated node runs torch with one thread (ONNX Runtime sessions already do).

    cpu_dilation.set_fraction(0.25)   # node start (`edgeweave node --emulate-cpu-fraction 0.25`)
    pacer = Pacer()                   # one per stream / connection
    read a message; pacer.begin(); ...compute its reply...; pacer.pay(); send(reply)
"""

from __future__ import annotations

import time

_fraction = 1.0


def set_fraction(fraction: float) -> None:
    """This process now emulates a CPU `fraction` (0 < fraction <= 1) as fast as the host's core."""
    global _fraction
    if not (0 < fraction <= 1):
        raise ValueError(f"an emulated CPU fraction must be in (0, 1], not {fraction!r}")
    _fraction = float(fraction)


def fraction() -> float:
    return _fraction


class Pacer:
    """Holds one thread's replies back until the emulated device would have finished them.

    `begin()` when a piece of work arrives (a message read), `pay()` when its result is ready: it
    sleeps until begin's wall time + the thread's CPU time since then / fraction. The deadline is
    counted from the arrival, not from the end of the work, so time this thread spent runnable but
    not running (other emulated devices computing on the same host core) is not added on top: up to
    1 / fraction devices computing at once on one host core still each take exactly their device's
    time. CPU spent outside begin..pay (sending the previous reply) is owed at the next pay."""

    def __init__(self) -> None:
        self._cpu = time.thread_time()
        self._wall = time.perf_counter()
        self._owed = 0.0  # CPU seconds spent since the last pay and before this begin

    def begin(self) -> None:
        if _fraction >= 1:
            return  # not emulating: no clock reads on the hot path
        now_cpu = time.thread_time()
        self._owed += now_cpu - self._cpu
        self._cpu, self._wall = now_cpu, time.perf_counter()

    def pay(self) -> None:
        if _fraction >= 1:
            return
        deadline = self._wall + (time.thread_time() - self._cpu + self._owed) / _fraction
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
        self._owed = 0.0
        self._cpu, self._wall = time.thread_time(), time.perf_counter()


class DeviceClock:
    """Elapsed seconds as the emulated device would have taken them since `DeviceClock()`: the wall
    time, or this thread's CPU time / fraction where that is more. For profiles: back-to-back calls
    are timed as one span, as a device runs them (a sleep after each call would cool the caches
    between them, which the driver's one-message stack of layers never does); and a Forward's
    reported compute time."""

    def __init__(self) -> None:
        self._cpu = time.thread_time() if _fraction < 1 else 0.0  # a Forward's clock: no syscall unless emulating
        self._wall = time.perf_counter()

    def elapsed(self) -> float:
        wall = time.perf_counter() - self._wall
        if _fraction >= 1:
            return wall
        return max(wall, (time.thread_time() - self._cpu) / _fraction)
