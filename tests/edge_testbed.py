"""An emulated edge cluster on one machine: a coordinator and N capped devices on capped links.

    with EdgeTestbed([("pi4", "ethernet"), (device("jetson-nano"), link("wifi", rtt_ms=6))]) as bed:
        peers = bed.start_nodes(tmp_path, args=["--no-advertise"])      # or bed.start_node(i, ...)
        bed.run_coordinator(["nodes", "--json", *(f"--peer={p}" for p in peers)])
        bed.run_python(DRIVER_SCRIPT, *peers)                           # any coordinator code

Host 0 (a network namespace, tests/netns.py) is the coordinator: unconstrained, like the server
or laptop that drives a real cluster. Hosts 1..N are the devices, each with
* a cgroup (tests/edge_cgroups.py): its DeviceProfile's CPU quota, cpuset and memory limit. The
  node joins it before it execs (a shell wrapper writes its own pid into cgroup.procs, then execs
  the node), so not one instruction of it runs outside its limits;
* its link: a token bucket (tc tbf) on both ends of its veth, so each direction is capped at the
  LinkProfile's rate, and, where the RTT is worth emulating (>= PROXY_MIN_RTT_MS), a delay proxy
  (tests/delay_proxy.py) in the coordinator's namespace adding rtt/2 each way. Each node's proxy has
  an address of its own on the coordinator's loopback (10.<k>.1.<i>) and relays the node's gRPC
  port and its data plane port (the same numbers), since a coordinator dials the data plane at the
  gRPC host. `bed.address(i)` is what the coordinator dials (`--peer`); mDNS announces the node's
  own address, which skips the delay (the rate still applies).
Each proxied node has a proxy process of its own (a reader and a writer thread per connection and
direction). One process for all put 16 relay threads of 4 nodes under one GIL, so a node's chunk
waited on the other nodes' relays, where real links are independent (benchmarks/scaling.py: tensor
x4 under dilation went from 0.88x to 1.20-1.35x of one node with that change and a faster host).
Everything is removed at exit, on an exception in the with-block, on SIGTERM/SIGHUP/SIGINT of the process running the bed, and, for a SIGKILLed run,
by the next bed's start: processes in its namespaces and cgroups are killed, then the cgroups and
namespaces go. Nodes get a launcher pipe (--watch-fd) and the proxy watches its stdin, so they also
stop by themselves when the process running the bed dies.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import edge_cgroups
import netns
from delay_proxy import REALTIME_PRIORITY
from edge_profiles import DeviceProfile, LinkProfile, device, link
from netns import Testbed

NODE_PORT = 50551  # every node listens here (each has its own namespace); its data plane on NODE_PORT + 1
#: below this the proxy's own cost (~0.2 ms: a loopback hop and a thread hand-off each way) is more
#: than the RTT: such a link goes direct (the namespace path itself is ~0.05 ms)
PROXY_MIN_RTT_MS = 0.2
#: TCP payload per byte tbf counts (1448 of a 1514-byte frame, MTU 1500 with timestamps): the line
#: rate is set this much above a profile's rate_mbit so that TCP's goodput is rate_mbit, as iperf3 reports
GOODPUT = 1448 / 1514
PROXY_SCRIPT = Path(__file__).with_name("delay_proxy.py")
_REFUSED_NODE_ARGS = ("--host", "--port", "--data-port", "--interface", "--ready-file", "--data-dir", "--watch-fd",
                      "--emulate-cpu-fraction")
#: how a device's CPU fraction is emulated: "quota" (a CFS quota in its cgroup) or "dilation" (the
#: node idles after each message for the rest of its time on the slow device: runtime/cpu_dilation.py;
#: its cgroup keeps the cpuset and memory limit, without a quota)
CPU_MODES = ("quota", "dilation")

NodeSpec = tuple[DeviceProfile | str, LinkProfile | str]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _namespace_pids(namespace: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_namespace_processes(namespaces: Sequence[str], timeout: float = 10.0) -> None:
    """SIGKILL whatever still runs in these namespaces (a namespace with a process outlives `ip netns del`)."""
    edge_cgroups.kill_until_gone(lambda: [pid for ns in namespaces for pid in _namespace_pids(ns)],
                                 f"namespaces {list(namespaces)}", timeout)


def clean_leftovers() -> None:
    """Everything of test beds whose process is gone: processes, cgroups, then namespaces."""
    dead = [ns for ns in netns._namespaces()
            if (m := netns._NAME.match(ns)) and not os.path.exists(f"/proc/{m.group(1)}")]
    _kill_namespace_processes(dead)
    edge_cgroups.clean_leftovers()
    netns.clean_leftovers()


def _resolve(spec: NodeSpec) -> tuple[DeviceProfile, LinkProfile]:
    dev, lnk = spec
    return (device(dev) if isinstance(dev, str) else dev), (link(lnk) if isinstance(lnk, str) else lnk)


class EdgeTestbed(Testbed):
    """`EdgeTestbed([(device, link), ...])`: host 0 the coordinator, hosts 1..N the devices (`bed.nodes`).

    `extra_ports` are relayed by the proxies too (a test's own servers in a node's namespace); `cpu`
    is how the devices' CPU fractions are emulated (CPU_MODES). `coordinator_priority`: run the
    coordinator's processes (run_coordinator, popen_coordinator, run_python) SCHED_FIFO at this
    priority (above the delay proxies' REALTIME_PRIORITY), None = as any process. Why: the
    coordinator stands for a machine of its own, which no device's work ever delays; on the bed it
    shares the host's cores with every emulated device, and a woken node's thread preempting it
    between its sends is an artefact of the bed (traced: ~0.9 ms of a 4-node reduction's sends)."""

    def __init__(self, nodes: Sequence[NodeSpec], extra_ports: Sequence[int] = (), cpu: str = "quota",
                 coordinator_priority: int | None = None) -> None:
        if cpu not in CPU_MODES:
            raise ValueError(f"cpu must be one of {', '.join(CPU_MODES)}, not {cpu!r}")
        if coordinator_priority is not None and not REALTIME_PRIORITY < coordinator_priority < 50:
            raise ValueError(f"coordinator_priority must be above the proxies' {REALTIME_PRIORITY} and below the "
                             f"kernel threads' 50, not {coordinator_priority}")
        super().__init__(len(nodes) + 1)
        self.cpu = cpu
        self.coordinator_priority = coordinator_priority
        self.nodes = range(1, len(nodes) + 1)
        resolved = [_resolve(spec) for spec in nodes]
        self.devices = {i: d for i, (d, _) in zip(self.nodes, resolved, strict=True)}
        self.links = {i: lk for i, (_, lk) in zip(self.nodes, resolved, strict=True)}
        self.ports = (NODE_PORT, NODE_PORT + 1, *extra_ports)
        self.proxy_ips = {i: f"10.{self.subnet}.1.{i}" for i in self.nodes if self.proxied(i)}
        self.cgroups: dict[int, edge_cgroups.DeviceCgroup] = {}
        self.cpusets = self._spread_cpus()
        self._proxies: list[subprocess.Popen] = []
        self._watch_r, self._watch_w = -1, -1
        self._old_handlers: dict[int, object] = {}

    # -- addresses ----------------------------------------------------------------------------------
    def proxied(self, i: int) -> bool:
        return self.links[i].rtt_ms >= PROXY_MIN_RTT_MS

    def dial_host(self, i: int) -> str:
        """The IP the coordinator reaches node i's ports at: its proxy's, or the node's own."""
        return self.proxy_ips[i] if self.proxied(i) else self.ips[i]

    def proxy_pids(self) -> list[int]:
        """The delay proxies' process ids, one per proxied node (for tests of the clean-up)."""
        return [proxy.pid for proxy in self._proxies]

    def address(self, i: int) -> str:
        """What the coordinator passes as --peer for node i (its RTT and rate emulated)."""
        return f"{self.dial_host(i)}:{NODE_PORT}"

    # -- building -----------------------------------------------------------------------------------
    def _spread_cpus(self) -> dict[int, list[int]]:
        """Round-robin over the cores this process may use: node 1 on the first, node 2 on the next..."""
        cores = sorted(os.sched_getaffinity(0))
        cpusets, at = {}, 0
        for i in self.nodes:
            want = self.devices[i].cpus
            if want > len(cores):
                raise ValueError(f"node {i} ({self.devices[i].name}) wants {want} cores; this host has {len(cores)}")
            cpusets[i] = [cores[(at + k) % len(cores)] for k in range(want)]
            at += want
        return cpusets

    def __enter__(self) -> EdgeTestbed:
        reason = edge_cgroups.available()
        if reason:
            raise edge_cgroups.CgroupUnavailable(f"the edge test bed needs cgroups: {reason}")
        clean_leftovers()
        self._trap_signals()
        try:
            super().__enter__()  # the LAN (it cleans up after itself if that fails)
            self._build_edge()
        except BaseException:
            self.close()
            raise
        return self

    def _trap_signals(self) -> None:
        """SIGTERM/SIGHUP end the process without unwinding (no atexit, no __exit__): make them raise
        SystemExit instead, so the with-block's cleanup runs. Only where nobody handles them yet."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._old_handlers[sig] = signal.signal(sig, _raise_exit)

    def _build_edge(self) -> None:
        self._watch_r, self._watch_w = os.pipe()  # nodes hold the read end: EOF = this process died
        coordinator = self.hosts[0]
        for i in self.nodes:
            dev, lnk = self.devices[i], self.links[i]
            quota = dev.cpu_fraction if self.cpu == "quota" else None
            self.cgroups[i] = edge_cgroups.DeviceCgroup(f"{self.prefix}-n{i}", quota, self.cpusets[i], dev.memory)
            line_mbit = lnk.rate_mbit / GOODPUT
            _shape(self.hosts[i], "eth0", line_mbit)  # uplink: the device's egress
            _shape(self.switch, f"p{i}", line_mbit)  # downlink: the switch port toward the device
            if self.proxied(i):
                _ip("-n", coordinator, "addr", "add", f"{self.proxy_ips[i]}/32", "dev", "lo")
        for i in self.proxy_ips:  # all started first, then waited for: they start side by side
            self._proxies.append(self._start_proxy(i))
        deadline = time.monotonic() + 30
        for proxy in self._proxies:
            _wait_ready(proxy, deadline)

    def _start_proxy(self, i: int) -> subprocess.Popen:
        """Node i's own delay proxy (its ports, its link's delay), in the coordinator's namespace."""
        maps = [f"--map={self.proxy_ips[i]}:{port}={self.ips[i]}:{port}@{self.links[i].rtt_ms / 2:g}"
                for port in self.ports]
        return self.popen(0, [sys.executable, str(PROXY_SCRIPT), "--exit-on-eof", *maps],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    # -- processes ----------------------------------------------------------------------------------
    def popen_node(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Run argv in node i's network namespace AND cgroup: a shell joins the cgroup, then execs
        argv (`set -e`: if joining fails, argv never runs). nsenter, not `ip netns exec`: that one
        remounts /sys, which hides /sys/fs/cgroup from the shell and from the node's resource probe."""
        joins = "; ".join(f"echo $$ > '{f}'" for f in self.cgroups[i].procs_files)
        wrapper = ["nsenter", f"--net=/run/netns/{self.hosts[i]}", "--", "sh", "-c", f'set -e; {joins}; exec "$@"',
                   "edgeweave-device", *argv]
        proc = subprocess.Popen(wrapper, **kwargs)
        self._procs.append(proc)
        return proc

    def start_node(self, host: int, name: str, folder: Path, args: Sequence[str] = (), env: dict | None = None,
                   timeout: float | None = None) -> str:
        """`edgeweave node` on device `host`, inside its limits; returns `address(host)` once it serves."""
        return self.start_nodes(folder, args, names={host: name}, env=env, timeout=timeout)[0]

    def start_nodes(self, folder: Path, args: Sequence[str] = (), names: dict[int, str] | None = None,
                    env: dict | None = None, timeout: float | None = None) -> list[str]:
        """Start nodes (default: every device, named `<profile>-<i>`) at once, wait until all serve;
        their addresses to dial, in order. `args` go to every node (not the ones the bed decides)."""
        refused = [a for a in args if a.split("=")[0] in _REFUSED_NODE_ARGS]
        if refused:
            raise ValueError(f"the test bed chooses {', '.join(refused)} itself")
        names = names or {i: f"{self.devices[i].name}-{i}" for i in self.nodes}
        timeout = timeout or float(os.environ.get("EDGEWEAVE_NODE_START_TIMEOUT", 180))
        folder = Path(folder)
        started = {}
        for i, name in names.items():
            ready = folder / f"{name}.ready.json"
            ready.unlink(missing_ok=True)
            with open(folder / f"{name}.log", "wb") as log:
                proc = self.popen_node(i, [
                    sys.executable, "-m", "edgeweave", "node", "--name", name, "--host", self.ips[i],
                    "--interface", self.ips[i], "--port", str(NODE_PORT), "--data-port", str(NODE_PORT + 1),
                    "--data-dir", str(folder / name), "--ready-file", str(ready), "--watch-fd", str(self._watch_r),
                    *self._cpu_args(i), *args], stdout=log, stderr=log, env=env, pass_fds=(self._watch_r,))
            started[i] = (name, proc, ready)
        deadline = time.monotonic() + timeout
        for name, proc, ready in started.values():
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited with {proc.returncode}: "
                                       f"{(folder / f'{name}.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {name} not ready after {timeout:g} s (a capped device starts slowly: "
                                       "raise $EDGEWEAVE_NODE_START_TIMEOUT)")
                time.sleep(0.1)
        return [self.address(i) for i in started]

    def _cpu_args(self, i: int) -> list[str]:
        """What the node needs to emulate its device's CPU (nothing under a quota: its cgroup does it)."""
        if self.cpu != "dilation":
            return []
        return [f"--emulate-cpu-fraction={min(1.0, self.devices[i].cpu_fraction):g}"]  # its one torch thread

    def _coordinator(self, argv: Sequence[str]) -> list[str]:
        """argv as the coordinator runs (under `chrt -f` with coordinator_priority)."""
        prefix = [] if self.coordinator_priority is None else ["chrt", "-f", str(self.coordinator_priority)]
        return [*prefix, *argv]

    def run_coordinator(self, argv: Sequence[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """`edgeweave <argv>` in the coordinator's namespace (output captured as text)."""
        return self.run(0, self._coordinator([sys.executable, "-m", "edgeweave", *argv]), timeout=timeout, **kwargs)

    def popen_coordinator(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return self.popen(0, self._coordinator([sys.executable, "-m", "edgeweave", *argv]), **kwargs)

    def run_python(self, script: str | Path, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Python in the coordinator's namespace: `script` is a Path to a file, or a str of code; `args`
        its argv. The way for a benchmark to run its own driver against `address(i)` peers."""
        code = [str(script)] if isinstance(script, Path) else ["-c", script]
        return self.run(0, self._coordinator([sys.executable, *code, *args]), timeout=timeout, **kwargs)

    # -- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process (nodes get SIGTERM, then SIGKILL), kill what is left in the cgroups and
        namespaces, delete the namespaces (their veths and qdiscs go with them), remove the cgroups."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for fd in (self._watch_r, self._watch_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._watch_r = self._watch_w = -1
        for proxy in self._proxies:
            for stream in (proxy.stdin, proxy.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
        self._proxies = []
        for cgroup in self.cgroups.values():
            cgroup.close()  # SIGKILLs anything the nodes left behind, waits, removes
        self.cgroups.clear()
        if self._up:
            _kill_namespace_processes([*self.hosts, self.switch])
        super().close()
        for sig, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError):  # not in the main thread any more
                signal.signal(sig, handler)
        self._old_handlers.clear()


def _wait_ready(proxy: subprocess.Popen, deadline: float) -> None:
    """Until the proxy prints "ready" (its listeners bound); its output so far in the error if not."""
    seen, out = b"", proxy.stdout.fileno()
    while not seen.endswith(b"ready\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([out], [], [], left)[0]:
            raise TimeoutError(f"a delay proxy did not start within 30 s: {seen.decode(errors='replace')}")
        chunk = os.read(out, 4096)
        if not chunk:
            raise RuntimeError(f"a delay proxy exited ({proxy.wait()}): {seen.decode(errors='replace')}")
        seen += chunk


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _shape(namespace: str, dev: str, rate_mbit: float) -> None:
    """A token bucket at rate_mbit on dev's egress. Burst: 2 ms worth (at least 4 frames): enough for
    the kernel's timer granularity, small enough that a 0.1 s transfer already runs at the rate.
    Queue: 20 ms, a home switch/AP's buffer rather than tbf's bufferbloat."""
    burst = max(4 * 1514, int(rate_mbit * 1e6 / 8 * 0.002))
    subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{rate_mbit:.3f}mbit", "burst", str(burst), "latency", "20ms"],
                   check=True, capture_output=True)
