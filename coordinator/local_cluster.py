"""N node daemons on this machine, as real subprocesses: for the demo, tests and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edgeweave.coordinator import identity
from edgeweave.coordinator.client import NodeClient, NodeError

log = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """A node did not come up; the text carries the tail of its log."""


#: seconds a local node may take to come up, overriding the load-scaled default
START_TIMEOUT_ENV = "EDGEWEAVE_NODE_START_TIMEOUT"
BASE_START_TIMEOUT_S = 60.0


def default_start_timeout() -> float:
    """$EDGEWEAVE_NODE_START_TIMEOUT, else 60 s scaled by how oversubscribed this machine is (load
    average per core, at least 1): a node importing torch on a busy 2-core box is slow, not broken."""
    from edgeweave.config import ConfigError

    given = os.environ.get(START_TIMEOUT_ENV)
    if given is not None:
        try:
            value = float(given)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"${START_TIMEOUT_ENV} must be a positive number of seconds, got {given!r}")
        return value
    try:
        load = os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except OSError:
        load = 1.0
    return BASE_START_TIMEOUT_S * max(1.0, load)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalCluster:
    def __init__(
        self,
        n: int,
        base_dir: Path | None = None,
        interface: str = "127.0.0.1",
        advertise: bool = True,
        cpu_affinity: list[list[int]] | None = None,
        memory_budgets: Sequence[int | str] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        names: Sequence[str] | None = None,
        start_timeout: float | None = None,
        detach: bool = False,
        cluster_identity: identity.Identity | None = None,
    ) -> None:
        self.n = n
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="edgeweave-cluster-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.interface = interface
        self.advertise = advertise
        self.cpu_affinity = cpu_affinity
        self.memory_budgets = memory_budgets
        self.extra_args = list(extra_args)
        self.env = env
        tag = secrets.token_hex(2)  # unique mDNS names, so parallel clusters on one host do not clash
        self.names = list(names) if names else [f"node{i}-{tag}" for i in range(n)]
        self.start_timeout = start_timeout if start_timeout is not None else default_start_timeout()
        self.detach = detach  # start in a new session, so the nodes outlive this process (cluster up)
        #: unless detached, every node inherits this pipe's read end and stops at its EOF: the write end
        #: lives only in this process, so the nodes die with it however it dies (SIGKILL included)
        self._watch: tuple[int, int] | None = None
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.ports: list[int] = [0] * n
        self.addresses: list[str] = [""] * n
        self.identity = cluster_identity or identity.for_local_cluster()  # nodes share the coordinator's secret

    def log_path(self, i: int) -> Path:
        return self.base_dir / f"{self.names[i]}.log"

    def _ready_path(self, i: int) -> Path:
        return self.base_dir / f"{self.names[i]}.ready.json"

    def _argv(self, i: int) -> list[str]:
        argv = [
            sys.executable, "-m", "edgeweave", "node", "--name", self.names[i], "--host", self.interface,
            "--port", str(self.ports[i]), "--data-dir", str(self.base_dir / self.names[i]),
            "--interface", self.interface, "--ready-file", str(self._ready_path(i)),
        ]
        argv += identity.node_arguments(self.identity)
        if self._watch is not None:
            argv += ["--watch-fd", str(self._watch[0])]
        if not self.advertise:
            argv.append("--no-advertise")
        if self.memory_budgets:
            argv += ["--memory-budget", str(self.memory_budgets[i])]
        return argv + self.extra_args

    def _spawn(self, i: int) -> None:
        self._ready_path(i).unlink(missing_ok=True)
        cpus = self.cpu_affinity[i] if self.cpu_affinity else None
        # Co-located nodes share this host's cores: give each its share of torch threads (separate
        # devices would each use all of theirs), unless the caller decided.
        threads = str(len(cpus) if cpus else max(1, len(os.sched_getaffinity(0)) // self.n))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(self.env or {})}
        if not self.detach and self._watch is None:
            self._watch = os.pipe()  # both ends non-inheritable: only pass_fds hands the read end on
        with open(self.log_path(i), "ab") as log:
            self.procs[i] = subprocess.Popen(
                self._argv(i), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                start_new_session=self.detach, pass_fds=(self._watch[0],) if self._watch else (),
            )

    def _wait_ready(self, i: int, deadline: float) -> None:
        proc, ready = self.procs[i], self._ready_path(i)
        while not ready.exists():
            if proc.poll() is not None:
                raise ClusterStartError(f"node {self.names[i]} exited with code {proc.returncode}:\n{_log_tail(self.log_path(i))}")
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"node {self.names[i]} not ready after {self.start_timeout:.0f} s (raise ${START_TIMEOUT_ENV} on a "
                    f"slow or busy machine); the end of its log:\n{_log_tail(self.log_path(i))}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.ports[i], self.addresses[i] = info["port"], info["address"]
        with NodeClient(self.addresses[i], timeout=max(1.0, deadline - time.monotonic()), cluster=self.identity) as client:
            try:
                client.health()
            except NodeError as exc:
                raise ClusterStartError(f"node {self.names[i]} does not answer Health: {exc}\n{_log_tail(self.log_path(i))}") from None

    def start(self) -> LocalCluster:
        began = time.monotonic()
        try:
            for i in range(self.n):
                self._spawn(i)
            deadline = time.monotonic() + self.start_timeout
            for i in range(self.n):
                self._wait_ready(i, deadline)
        except BaseException:
            self.stop()
            raise
        log.info("local cluster of %d node(s) up in %.1f s: %s", self.n, time.monotonic() - began,
                 ", ".join(self.addresses))
        return self

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def restart(self, i: int) -> None:
        """Stop node i (if running) and start it again with the same name, data dir and port."""
        self.kill(i, signal.SIGTERM)
        self._spawn(i)
        self._wait_ready(i, time.monotonic() + self.start_timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node (they withdraw their mDNS records), then SIGKILL stragglers."""
        for proc in self.procs:
            if proc and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watch is not None:
            for fd in self._watch:
                os.close(fd)
            self._watch = None
        if self._own_dir and not self.detach:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def state(self) -> dict:
        """What `cluster down` needs to find these nodes again."""
        return {
            "base_dir": str(self.base_dir),
            "nodes": [
                {"name": n, "address": a, "pid": p.pid if p else None, "log": str(self.log_path(i))}
                for i, (n, a, p) in enumerate(zip(self.names, self.addresses, self.procs, strict=True))
            ],
        }

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
