"""Discovery and cluster commands with real node subprocesses and real mDNS on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.discovery import NodeWatcher
from edgeweave.coordinator.local_cluster import LocalCluster


def _edgeweave(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_node_appears_after_ready_and_disappears_after_sigterm(tmp_path):
    seen: dict[str, float] = {}
    gone: dict[str, float] = {}
    with NodeWatcher(["127.0.0.1"], on_add=lambda r: seen.setdefault(r.name, time.time()),
                     on_remove=lambda r: gone.setdefault(r.name, time.time())) as watcher:
        cluster = LocalCluster(1, base_dir=tmp_path)
        with cluster:
            name = cluster.names[0]
            ready_at = (tmp_path / f"{name}.ready.json").stat().st_mtime
            assert watcher.wait(lambda nodes: any(r.name == name for r in nodes.values()), timeout=5)
            assert seen[name] - ready_at <= 2.0
            record = next(r for r in watcher.nodes.values() if r.name == name)
            assert record.address == cluster.addresses[0]
            assert record.properties["cores"] == str(len(os.sched_getaffinity(0)))
            stopped_at = time.time()
            cluster.kill(0, signal.SIGTERM)
            assert watcher.wait(lambda nodes: all(r.name != name for r in nodes.values()), timeout=5)
            assert gone[name] - stopped_at <= 5.0


def test_nodes_command_with_static_peer(local_node):
    result = _edgeweave("nodes", "--json", "--timeout", "0", "--peer", local_node.addresses[0],
                        "--interface", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    mine = [r for r in records if r["address"] == local_node.addresses[0]]
    assert len(mine) == 1 and mine[0]["source"] == "static" and mine[0]["name"] == local_node.names[0]
    assert mine[0]["rtt_ms"] is not None and mine[0]["rtt_ms"] > 0


@pytest.mark.slow
def test_cluster_up_and_down(tmp_path):
    state = tmp_path / "state.json"
    up = _edgeweave("cluster", "up", "1", "--base-dir", str(tmp_path / "c"), "--no-advertise", "--state-file", str(state))
    assert up.returncode == 0, up.stderr
    nodes = json.loads(state.read_text())["nodes"]
    try:
        assert len(nodes) == 1
        for node in nodes:
            assert node["address"] in up.stdout
            with NodeClient(node["address"]) as client:
                assert client.info().name == node["name"]
    finally:
        down = _edgeweave("cluster", "down", "--state-file", str(state))
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not any(psutil.pid_exists(n["pid"]) and psutil.Process(n["pid"]).status() != psutil.STATUS_ZOMBIE
                   for n in nodes)
