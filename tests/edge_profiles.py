"""What an emulated edge device and its link stand for: the numbers, and where they come from.

A `DeviceProfile` becomes a cgroup (tests/edge_testbed.py): `cpu_fraction` of ONE host core as a
CFS quota, `cpus` cores of the host in its cpuset (torch runs that many threads), `memory` bytes
as its memory limit. A `LinkProfile` becomes token buckets (tc tbf) both ways and, where its RTT is
worth emulating, a delay proxy adding rtt/2 each way (tc netem is not available here).

How the CPU fractions were chosen (the planner divides work by measured float32 matmul speed, so
that is the number that must be right):
* host core: ~75 GFLOP/s, torch float32 512^3 matmul on one thread, sustained over 1 s, on this
  VM's AMD EPYC (Zen 3, AVX2/FMA, 2.45 GHz) at a quiet moment (95 GFLOP/s for the best single call).
* Raspberry Pi 4 (4x Cortex-A72 @ 1.5 GHz): HPL measures ~8 GFLOP/s float64 on all four cores
  (feiereisen.net, "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64", 2022); NEON does twice
  as many float32 lanes, so ~16-19 GFLOP/s float32 for the whole board. Consistent with
  distributed-llama's README: Llama 2 7B Q40 at 1312 ms/token on one Pi 4B 8 GB, i.e. ~13.4 GOP per
  token in 1.31 s = ~10 GOP/s of int8 dot products. 18 / 75 = 0.24 -> 0.25 of a host core.
* Jetson Nano (4x Cortex-A57 @ 1.43 GHz): the same NEON width at 95% of the clock, and the A57 does
  ~20-30% less per clock than its successor the A72, so ~0.75 of a Pi 4: ~14 GFLOP/s -> 0.19 of a
  host core. CPU only: the Nano's 128-core Maxwell GPU (472 GFLOP/s fp16) is not emulated.
The whole board's four cores are emulated as a fraction of one host core (cpus=1): the same
throughput, and a lead benchmark's four such nodes plus a coordinator fit on two host cores.
On a host whose core is faster or slower, `scaled_to(host_gflops)` keeps the device's GFLOP/s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeweave.runtime.resources import parse_size

GIB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu_fraction: float  # of ONE host core (CFS quota / period)
    cpus: int  # host cores in its cpuset (the threads it runs); the quota caps their sum
    memory: int  # bytes (its cgroup's memory limit)
    source: str  # what the numbers stand for and where they come from
    reference_gflops: float = 0.0  # the real device's float32 matmul estimate, for scaled_to()

    def __post_init__(self) -> None:
        if not 0 < self.cpu_fraction <= self.cpus:
            raise ValueError(f"{self.name}: cpu_fraction {self.cpu_fraction} must be in (0, cpus={self.cpus}]")
        if self.memory <= 0:
            raise ValueError(f"{self.name}: memory must be a positive byte count")

    def scaled_to(self, host_core_gflops: float) -> DeviceProfile:
        """The same device on a host whose one core sustains `host_core_gflops`: the fraction that
        gives `reference_gflops` there (capped at `cpus`)."""
        if not self.reference_gflops or host_core_gflops <= 0:
            raise ValueError(f"{self.name}: needs reference_gflops and a positive host speed to scale")
        return dataclasses.replace(self, cpu_fraction=min(self.cpus, self.reference_gflops / host_core_gflops))


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rate_mbit: float  # TCP goodput each way (what iperf3 reports); the bed shapes the line rate above it
    rtt_ms: float  # round trip added between the coordinator and the node
    source: str

    def __post_init__(self) -> None:
        if self.rate_mbit <= 0 or self.rtt_ms < 0:
            raise ValueError(f"{self.name}: rate_mbit must be > 0 and rtt_ms >= 0")


DEVICES: dict[str, DeviceProfile] = {
    "pi4": DeviceProfile(
        "pi4", cpu_fraction=0.25, cpus=1, memory=2 * GIB, reference_gflops=18.0,
        source="Raspberry Pi 4 Model B (product brief: BCM2711, 4x Cortex-A72 @ 1.5 GHz, 1/2/4/8 GB LPDDR4, "
               "GbE, 802.11ac); ~8 GFLOP/s fp64 HPL (feiereisen.net 2022) -> ~18 GFLOP/s fp32 = 0.25 of a "
               "~75 GFLOP/s host core; memory: the 2 GB board",
    ),
    "jetson-nano": DeviceProfile(
        "jetson-nano", cpu_fraction=0.19, cpus=1, memory=4 * GIB, reference_gflops=14.0,
        source="NVIDIA Jetson Nano developer kit (4x Cortex-A57 @ 1.43 GHz, 4 GB LPDDR4 25.6 GB/s shared with "
               "its GPU, GbE); CPU ~0.75 of a Pi 4 (clock x A57/A72 per-clock) = ~14 GFLOP/s fp32 = 0.19 of a "
               "host core; the Maxwell GPU is not emulated",
    ),
}

LINKS: dict[str, LinkProfile] = {
    "ethernet": LinkProfile(
        "ethernet", rate_mbit=940.0, rtt_ms=0.2,
        source="Gigabit Ethernet through one switch: a Pi 4 sustains 941 Mbit/s TCP in iperf3 (mpr-projects.com "
               "'RPi NAS part 3', 2024; 940-943 Mbit/s is the GbE TCP ceiling); ~0.2 ms ping on a switched LAN",
    ),
    "wifi": LinkProfile(
        "wifi", rate_mbit=100.0, rtt_ms=4.0,
        source="802.11ac Wi-Fi of a Pi 4 class board (one spatial stream, 433 Mbit/s PHY at 80 MHz): ~100 Mbit/s "
               "TCP near the access point, 3-5 ms LAN round trips (an order of magnitude above wired); no jitter "
               "or loss emulated",
    ),
}


def device(name: str, *, cpu_fraction: float | None = None, cpus: int | None = None,
           memory: int | str | None = None) -> DeviceProfile:
    """A named device profile, with any of its numbers overridden (memory as bytes or '768MiB')."""
    if name not in DEVICES:
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(sorted(DEVICES))}")
    changes: dict = {}
    if cpu_fraction is not None:
        changes["cpu_fraction"] = float(cpu_fraction)
    if cpus is not None:
        changes["cpus"] = int(cpus)
    if memory is not None:
        changes["memory"] = parse_size(memory, "memory") if isinstance(memory, str) else int(memory)
    return dataclasses.replace(DEVICES[name], **changes)


def link(name: str, *, rate_mbit: float | None = None, rtt_ms: float | None = None) -> LinkProfile:
    """A named link profile, with its rate or RTT overridden."""
    if name not in LINKS:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(sorted(LINKS))}")
    changes: dict = {}
    if rate_mbit is not None:
        changes["rate_mbit"] = float(rate_mbit)
    if rtt_ms is not None:
        changes["rtt_ms"] = float(rtt_ms)
    return dataclasses.replace(LINKS[name], **changes)
