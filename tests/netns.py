"""A LAN in a box: N hosts as network namespaces on a bridge that lives in its own "switch" namespace.

Nothing touches the host's interfaces: veth pairs are created inside the switch namespace with
their host ends moved straight into each host namespace. Names carry this process's pid, so
parallel runs never collide, and leftovers of dead runs are removed before a new bed is built.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

NAMESPACE_PREFIX = "ewtb"  # edgeweave test bed
_NAME = re.compile(rf"^{NAMESPACE_PREFIX}-(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def clean_leftovers() -> None:
    """Delete test-bed namespaces whose creating process is gone (crashed or killed runs)."""
    for ns in _namespaces():
        match = _NAME.match(ns)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _ip("netns", "del", ns, check=False)


class Testbed:
    """`with Testbed(3) as bed:` hosts 0..2 at `bed.ips[i]` (10.<k>.0.<i+1>/24), interface eth0."""

    def __init__(self, n_hosts: int, prefix: str | None = None) -> None:
        self.n = n_hosts
        tag = prefix or f"{NAMESPACE_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.prefix = tag
        self.switch = f"{tag}-sw"
        self.hosts = [f"{tag}-h{i}" for i in range(n_hosts)]
        self.subnet = 10 + secrets.randbelow(200)  # separate bridges anyway; a random net just reads clearer in logs
        self.ips = [f"10.{self.subnet}.0.{i + 1}" for i in range(n_hosts)]
        self._procs: list[subprocess.Popen] = []
        self._up = False

    def __enter__(self) -> Testbed:
        clean_leftovers()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self._up = True
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(zip(self.hosts, self.ips, strict=True)):
            _ip("netns", "add", ns)
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def argv(self, host: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def popen(self, host: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process inside host `host`; it is killed at close() if still running."""
        proc = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: int, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), timeout=timeout, **kwargs)

    def python(self, host: int, code_or_args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return self.run(host, [sys.executable, *code_or_args], **kwargs)

    def start_node(self, host: int, name: str, folder: Path, args: Sequence[str] = (), env: dict | None = None,
                   timeout: float = 90) -> str:
        """Start `edgeweave node` on `host` (its log and data under `folder`); its address once serving."""
        ready = folder / f"{name}.ready.json"
        ready.unlink(missing_ok=True)  # a restarted node must not be mistaken for its previous run
        with open(folder / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = self.popen(host, [sys.executable, "-m", "edgeweave", "node", "--name", name, "--host", self.ips[host],
                                     "--interface", self.ips[host], "--port", "0", "--data-dir", str(folder / name),
                                     "--ready-file", str(ready), *args], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"node {name} exited with {proc.returncode}: {(folder / f'{name}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not ready after {timeout} s")
            time.sleep(0.1)
        return json.loads(ready.read_text())["address"]

    def shape(self, host: int, rate_mbit: float, burst_kbit: int = 32, latency_ms: int = 400) -> None:
        """Cap host's egress with a token bucket (tc tbf)."""
        subprocess.run(
            ["ip", "netns", "exec", self.hosts[host], "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
             "rate", f"{rate_mbit}mbit", "burst", f"{burst_kbit}kbit", "latency", f"{latency_ms}ms"],
            check=True, capture_output=True,
        )

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._up:
            for ns in [*self.hosts, self.switch]:
                with contextlib.suppress(Exception):
                    _ip("netns", "del", ns, check=False)
            self._up = False
        atexit.unregister(self.close)
