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
    pacer = Pacer()                   # one per stream / connection, on the thread that handles it
    pacer.idle(); read a message; pacer.begin(); ...compute its reply...; pacer.pay(); send(reply)

The host's scheduler is not the device's. Several emulated devices share a host core, so a message
that arrives while another device computes there waits for the core before its thread can even
read it; a real device would have started at once. `idle()` (before the blocking read) and `begin()`
read this thread's run-queue wait (/proc/thread-self/schedstat: time runnable but not running), and
begin() counts the message from when it could have been read: that wait is taken off its start.
And a sleep ends late on a loaded VM (a timer's slack and a wake-up, ~0.1 ms here): the pacer's
thread gets 1 ns of timer slack and asks for its mean lateness less, so replies leave at their
deadlines on average, not always ~0.1 ms after.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

_fraction = 1.0
#: prctl(PR_SET_TIMERSLACK): a sleeping thread's timer may fire up to this late (default 50 us)
_PR_SET_TIMERSLACK = 29
#: the most a pacer shortens its sleeps by (its measured mean lateness is clipped to this)
MAX_EARLY_S = 0.2e-3
_SCHEDSTAT = "/proc/thread-self/schedstat"


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
    time. `idle()` before waiting for the next message moves that arrival back by the time the thread
    then waited for a core after the message came (its run-queue wait since idle()). CPU spent
    outside begin..pay (sending the previous reply) is owed at the next pay. One pacer per thread
    (created on the thread that uses it)."""

    def __init__(self) -> None:
        self._cpu = time.thread_time()
        self._wall = time.perf_counter()
        self._owed = 0.0  # CPU seconds spent since the last pay and before this begin
        self._late = 0.0  # how late this thread's sleeps wake (a running mean): asked for that much less
        self._schedstat = -1  # an fd on this thread's /proc/thread-self/schedstat; -1: none
        self._thread = 0
        self._idle_wait = None  # run-queue seconds at idle(), None: not idle
        if _fraction < 1:
            self._attach()

    def _attach(self) -> None:
        """Bind to the calling thread: its timer slack to 1 ns, its run-queue clock opened."""
        self._thread = threading.get_ident()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
        self._close_schedstat()
        try:
            self._schedstat = os.open(_SCHEDSTAT, os.O_RDONLY)
        except OSError:  # not Linux, or no scheduler statistics: the arrival is the read's end
            self._schedstat = -1
            return
        if self._run_queue_s() is None:
            self._close_schedstat()

    def _close_schedstat(self) -> None:
        if self._schedstat >= 0:
            with contextlib.suppress(OSError):
                os.close(self._schedstat)
            self._schedstat = -1

    def _run_queue_s(self) -> float | None:
        """This thread's total time runnable but waiting for a core (schedstat's 2nd field), s."""
        try:
            return int(os.pread(self._schedstat, 64, 0).split()[1]) * 1e-9
        except (OSError, IndexError, ValueError):
            return None

    def idle(self) -> None:
        """This thread now waits for its next message (call it just before the blocking read)."""
        if _fraction >= 1:
            return
        if self._thread != threading.get_ident():  # first use, or a pacer handed to another thread
            self._attach()
        self._idle_wait = self._run_queue_s() if self._schedstat >= 0 else None

    def begin(self) -> None:
        if _fraction >= 1:
            return  # not emulating: no clock reads on the hot path
        now_cpu, now = time.thread_time(), time.perf_counter()
        self._owed += now_cpu - self._cpu
        self._cpu, self._wall = now_cpu, now
        if self._idle_wait is not None:
            waited = self._run_queue_s()
            if waited is not None and waited > self._idle_wait:
                # the message was there while this thread waited for a core (at most since idle())
                self._wall = now - (waited - self._idle_wait)
            self._idle_wait = None

    def pay(self) -> None:
        if _fraction >= 1:
            return
        if self._thread != threading.get_ident():
            self._attach()
        deadline = self._wall + (time.thread_time() - self._cpu + self._owed) / _fraction
        left = deadline - time.perf_counter()
        if left > 0:
            ask = left - self._late
            if ask > 0:
                time.sleep(ask)
                # this sleep's own lateness (the wake-up past what was asked), into the running mean
                late = time.perf_counter() - deadline + self._late
                self._late = min(MAX_EARLY_S, max(0.0, 0.9 * self._late + 0.1 * late))
        self._owed = 0.0
        self._cpu, self._wall = time.thread_time(), time.perf_counter()

    def __del__(self) -> None:
        self._close_schedstat()


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
