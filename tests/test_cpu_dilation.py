"""Time dilation (runtime/cpu_dilation.py): a reply leaves when a device `fraction` as fast would
have finished it, counted in this thread's CPU time, so work that waits for a core (or sleeps)
is not charged, and a profile's clock measures the emulated device."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from host_speed import host_core_gflops

from edgeweave.runtime import cpu_dilation
from edgeweave.runtime.resources import matmul_gflops


@pytest.fixture
def quarter():
    """A quarter-speed device, on one torch thread as a dilated node runs (its thread's CPU is what counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_dilation.set_fraction(0.25)
    yield
    cpu_dilation.set_fraction(1.0)
    torch.set_num_threads(threads)


def spin(cpu_s: float) -> None:
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_a_reply_waits_for_the_rest_of_its_time_on_the_slow_device(quarter):
    pacer = cpu_dilation.Pacer()
    walls = []
    for _ in range(5):
        time.sleep(0.01)  # waiting for the next message costs the device nothing
        pacer.begin()
        start = time.perf_counter()
        spin(0.005)
        pacer.pay()
        walls.append(time.perf_counter() - start)
    assert all(0.019 <= w <= 0.030 for w in walls), walls  # 4 x 5 ms of CPU (plus timer slack)


def test_waiting_for_a_core_is_not_charged_again(quarter):
    """Two emulated devices on one host core: each waits for the core while the other computes, and
    still takes its device's time, not its time plus the other's."""
    walls: list[float] = []

    def device() -> None:
        pacer = cpu_dilation.Pacer()
        pacer.begin()
        start = time.perf_counter()
        spin(0.01)
        pacer.pay()
        walls.append(time.perf_counter() - start)

    threads = [threading.Thread(target=device) for _ in range(2)]  # the GIL is their one core
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(0.039 <= w <= 0.055 for w in walls), walls


def test_a_wait_for_a_core_after_the_message_came_is_not_charged_either(quarter):
    """A message that arrives while another emulated device computes on the same host core waits for
    the core before its thread can read it: the run-queue wait between idle() and begin() (the
    thread's schedstat) is taken off the reply's start, as a real device would have begun at once."""
    pacer = cpu_dilation.Pacer()
    if pacer._schedstat < 0:
        pytest.skip("no /proc/thread-self/schedstat on this system")
    first = pacer._run_queue_s()
    assert first is not None and pacer._run_queue_s() >= first  # a running total, in seconds
    waits = iter([1.0, 1.004])  # 4 ms runnable but not running between idle() and begin()
    pacer._run_queue_s = lambda: next(waits)
    pacer.idle()
    pacer.begin()
    start = time.perf_counter()
    spin(0.003)
    pacer.pay()
    wall = time.perf_counter() - start
    assert 0.0075 <= wall <= 0.012, wall  # 4 x 3 ms of CPU, less the 4 ms spent waiting for the core


def test_a_device_clock_counts_cpu_over_the_fraction_but_never_less_than_the_wall(quarter):
    clock = cpu_dilation.DeviceClock()
    spin(0.01)
    assert 0.039 <= clock.elapsed() <= 0.05
    clock = cpu_dilation.DeviceClock()
    time.sleep(0.02)  # idle: the wall time, not 4 x no CPU
    assert 0.02 <= clock.elapsed() <= 0.03


def test_a_profile_measures_the_emulated_speed(quarter):
    """The node's matmul profile under dilation: a quarter of this core's speed per CPU-second (the
    device clock counts CPU / fraction, so the figure holds while other work shares the cores)."""
    before = host_core_gflops(span_s=0.3)[0]
    slow = matmul_gflops(budget_s=0.3)
    # the core's speed per CPU-second moves with what the other test worker does to the shared
    # caches: the faster of a reading before and after is the core's (one low reading of 63 GFLOP/s
    # put the dilated figure at 0.31 of it)
    reference = max(before, host_core_gflops(span_s=0.3)[0])
    assert 0.15 * reference <= slow <= 0.3 * reference, (slow, reference)


def test_bad_fractions_are_refused():
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            cpu_dilation.set_fraction(bad)
    assert cpu_dilation.fraction() == 1.0


def test_the_node_refuses_a_fraction_outside_0_1(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgeweave", "node", "--insecure", "--no-advertise", "--port", "0",
                           "--data-dir", str(tmp_path), "--emulate-cpu-fraction", "1.5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--emulate-cpu-fraction" in done.stderr and "(0, 1]" in done.stderr


@pytest.mark.parametrize("dilated", [False, True])
def test_a_work_echo_spends_its_seconds_of_device_time(dilated, request):
    """The echo executor's op "work" (the layout planner's stand-in for a rank's compute) keeps its
    thread busy for the device time asked: the wall time on a full-speed node, a quarter of it in
    CPU on a quarter-speed one (whose Pacer then holds the reply for the rest)."""
    from edgeweave.runtime.executor import EchoExecutor

    if dilated:
        request.getfixturevalue("quarter")
    echo = EchoExecutor({}, {}, 0)
    x = torch.randn(1, 8)
    cpu, wall = time.thread_time(), time.perf_counter()
    (y,) = echo.forward("work", 0, 0, "", [x, torch.tensor([0.04])])
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    assert torch.equal(y, x)
    if dilated:
        assert 0.009 < cpu < 0.02  # 0.25 x 40 ms, give or take a clock read
    else:
        assert 0.04 <= wall < 0.08


@pytest.mark.parametrize("tensors, sentence", [
    ([torch.zeros(1, 8)], "two tensors"),
    ([torch.zeros(1, 8), torch.tensor([2.0])], "0 to 1.0 s"),
    ([torch.zeros(1, 8), torch.tensor([float("nan")])], "0 to 1.0 s"),
    ([torch.zeros(1, 8), torch.tensor([-1.0])], "0 to 1.0 s"),
    ([torch.zeros(1, 8), torch.zeros(2)], "two tensors"),
])
def test_a_work_echo_refuses_bad_seconds_with_a_sentence(tensors, sentence):
    from edgeweave.runtime.executor import EchoExecutor, ExecutorInputError

    with pytest.raises(ExecutorInputError, match=sentence):
        EchoExecutor({}, {}, 0).forward("work", 0, 0, "", tensors)
