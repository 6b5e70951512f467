"""Clusters tell each other apart on one LAN: our nodes, a node of another cluster (another
secret) and a stale mDNS record pointing at a black hole, all announced on loopback for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from zeroconf import ServiceInfo, Zeroconf

from edgeweave import SERVICE_TYPE, security
from edgeweave.config import ConfigError
from edgeweave.coordinator import identity
from edgeweave.coordinator.client import FIRST_CONTACT_S, PROBE_TIMEOUT_S
from edgeweave.coordinator.discovery import ANSWER_TIMEOUT_S, NodeWatcher, survey
from edgeweave.coordinator.identity import Identity
from edgeweave.coordinator.local_cluster import START_TIMEOUT_ENV, LocalCluster, default_start_timeout


def _edgeweave(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result, time.monotonic() - began


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    """Two nodes of our cluster, one of another, and a black-hole record claiming to be ours (the
    worst stale record: it passes the fingerprint filter, then never answers)."""
    folder = tmp_path_factory.mktemp("trust")
    other_secret = security.create_secret(folder / "other.secret")
    foreign_identity = Identity(other_secret, security.issue_member_material(security.load_secret(other_secret), "x"))
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes handshakes; nobody ever reads: TLS hellos go unanswered
    ours_fp = identity.current().fingerprint
    tag = os.urandom(2).hex()
    record = ServiceInfo(SERVICE_TYPE, f"hole-{tag}.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")],
                         port=hole.getsockname()[1], server=f"hole-{tag}.local.",
                         properties={"name": f"hole-{tag}", "node_id": "0" * 32, "cluster": ours_fp, "secure": "1"})
    zc = Zeroconf(interfaces=["127.0.0.1"])
    ours = LocalCluster(2, base_dir=folder / "ours", names=[f"ours{i}-{tag}" for i in range(2)], env={"OMP_NUM_THREADS": "1"})
    foreign = LocalCluster(1, base_dir=folder / "foreign", names=[f"foreign-{tag}"], cluster_identity=foreign_identity)
    try:
        with ThreadPoolExecutor(3) as pool:  # start both clusters and announce the hole at once
            for started in [pool.submit(ours.start), pool.submit(foreign.start), pool.submit(zc.register_service, record)]:
                started.result()
        with NodeWatcher(["127.0.0.1"]) as watcher:  # everything announced before the tests look
            assert watcher.wait(lambda nodes: {n.name for n in nodes.values()} >= set(ours.names), timeout=10)
        yield {"ours": ours, "foreign": foreign, "hole": f"hole-{tag}", "fingerprint": ours_fp,
                   "foreign_fp": foreign_identity.fingerprint}
    finally:
        ours.stop()
        foreign.stop()
        zc.unregister_service(record)
        zc.close()
        hole.close()


@pytest.mark.slow
def test_nodes_lists_our_cluster_only_and_all_marks_the_others(lan):
    plain, _ = _edgeweave("nodes", "--json", "--interface", "127.0.0.1", "--timeout", "1.5")
    assert plain.returncode == 0, plain.stderr
    listed = json.loads(plain.stdout)
    names = {r["name"] for r in listed}
    assert set(lan["ours"].names) <= names
    assert lan["foreign"].names[0] not in names and lan["hole"] not in names
    assert all(r["cluster"] == lan["fingerprint"] and not r["note"] for r in listed)  # other runs' nodes too
    assert "hidden; --all lists them" in plain.stderr
    everything, _ = _edgeweave("nodes", "--json", "--all", "--interface", "127.0.0.1", "--timeout", "1.5")
    assert everything.returncode == 0, everything.stderr
    by_name = {r["name"]: r for r in json.loads(everything.stdout)}
    foreign = by_name[lan["foreign"].names[0]]
    assert foreign["note"] == f"another cluster (fingerprint {lan['foreign_fp']})" and foreign["rtt_ms"] is None
    assert by_name[lan["hole"]]["note"].startswith("no answer") and "never answers" in by_name[lan["hole"]]["note"]
    assert all(by_name[n]["rtt_ms"] is not None for n in lan["ours"].names)


@pytest.mark.slow
def test_survey_sorts_the_lan_within_seconds(lan):
    """The black hole costs one bounded Info (plus its probe), in parallel with the rest: seconds, not minutes."""
    began = time.monotonic()
    seen = survey(timeout=1.0, interfaces=["127.0.0.1"])
    took = time.monotonic() - began
    ours = {r.name for r in seen.ours}
    notes = {r.name: r.note for r in seen.others}
    assert set(lan["ours"].names) <= ours and lan["hole"] not in ours and lan["foreign"].names[0] not in ours
    assert "never answers" in notes[lan["hole"]] and notes[lan["foreign"].names[0]].startswith("another cluster")
    assert took < 1.0 + min(ANSWER_TIMEOUT_S, FIRST_CONTACT_S) + PROBE_TIMEOUT_S + 3.0, took  # slack for a loaded host


@pytest.mark.slow
def test_watcher_never_admits_a_foreign_node(lan):
    with NodeWatcher(["127.0.0.1"]) as watcher:
        assert watcher.wait(lambda nodes: {n.name for n in nodes.values()} >= set(lan["ours"].names), timeout=10)
        deadline = time.monotonic() + 5
        while lan["foreign"].names[0] not in {r.name for r in watcher.others.values()}:
            assert time.monotonic() < deadline, "the foreign node was never seen"
            time.sleep(0.1)
        assert lan["foreign"].names[0] not in {r.name for r in watcher.nodes.values()}


@pytest.mark.slow
def test_run_uses_our_nodes_despite_a_foreign_node_and_a_black_hole(lan, tmp_path):
    result, took = _edgeweave("run", "--interface", "127.0.0.1", "--discovery-timeout", "1.5", "--prompt", "Hi",
                              "--max-tokens", "2", "--weights", "1,1", "--json", "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    used = {n["address"] for n in json.loads(result.stdout.strip().splitlines()[-1])["nodes"]}
    assert used == set(lan["ours"].addresses)
    assert f"skipping node {lan['hole']}" in result.stderr and "never answers" in result.stderr
    assert took < 90, took


def test_node_start_timeout_is_configurable_and_grows_with_load(monkeypatch):
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    per_core = os.getloadavg()[0] / len(os.sched_getaffinity(0))
    assert default_start_timeout() >= 60.0 * max(1.0, per_core) * 0.5  # the load moves while we look
    monkeypatch.setenv(START_TIMEOUT_ENV, "240")
    assert default_start_timeout() == 240.0
    monkeypatch.setenv(START_TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="positive number of seconds"):
        default_start_timeout()

