"""The reference an emulated device's speed is checked against: one uncapped host core."""

from __future__ import annotations

import time

import torch


def host_core_gflops(n: int = 512, span_s: float = 0.7) -> tuple[float, float]:
    """Uncapped float32 matmul speed of one host core: (per CPU second, per wall second). The CPU-time
    figure is the reference: on this shared VM other processes take wall time from us, not speed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        calls, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
        while time.perf_counter() - wall0 < span_s:
            torch.mm(a, b)
            calls += 1
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 * calls / cpu / 1e9, 2 * n**3 * calls / wall / 1e9
