"""Sessions and jobs are leases (node/leases.py), and local nodes die with their launcher.

Against real node processes: a real coordinator process holding the full session cap is killed
with SIGKILL and the node frees everything on its own; a live but idle coordinator keeps its
sessions and job past both timeouts; a refusal at the cap is that request's error, not a node
failure; and the nodes of a LocalCluster exit when the process that started them is SIGKILLed,
while detached ones (`cluster up`) stay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from llm_reference import ONE_THREAD, one_torch_thread  # noqa: F401 - autouse: one torch thread here

from edgeweave.config import NodeSettings
from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.node.leases import JOB_IDLE_S, SESSION_GRACE_S
from edgeweave.proto import pb
from edgeweave.runtime.batch import SequenceStep
from edgeweave.runtime.tp_executor import MAX_SESSIONS
from edgeweave.splitting.checkpoints import open_checkpoint

transformers = pytest.importorskip("transformers")

GRACE_S = 1.0
JOB_IDLE_TEST_S = 3.0
PROMPT = [5, 17, 3, 88, 42]

#: a coordinator process: opens `n` sessions on the node, says "ready", then idles until killed
COORDINATOR = textwrap.dedent("""
    import sys, time
    from edgeweave.coordinator import identity
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.runtime.batch import SequenceStep
    from edgeweave.splitting.checkpoints import open_checkpoint
    model, cache, secret, address, n = sys.argv[1:6]
    identity.configure(secret)
    llm = DistributedLlama(open_checkpoint(model), [NodeClient(address)], [1.0], cache_dir=cache)
    for i in range(int(n)):
        llm.step([SequenceStep(f"crashed-{i}", [5, 17, 3], 0)])
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama in HF format (fast to shard, load and prefill 64 times)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def node() -> Iterator[LocalCluster]:
    """One real node with a short session grace and job idle timeout."""
    args = ["--session-grace-s", str(GRACE_S), "--job-idle-s", str(JOB_IDLE_TEST_S)]
    with LocalCluster(1, advertise=False, env=ONE_THREAD, extra_args=args) as cluster:
        yield cluster


def _health(cluster: LocalCluster) -> pb.HealthReply:
    with NodeClient(cluster.addresses[0], cluster=cluster.identity) as client:
        return client.health()


def _wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held (polled every 50 ms); fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_defaults_are_the_settings_defaults():
    """The node's built-in defaults (NodeOptions, the servicer) are those of [node] in config.toml."""
    assert (NodeSettings().session_grace_s, NodeSettings().job_idle_s) == (SESSION_GRACE_S, JOB_IDLE_S)


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_sigkilled_coordinator_frees_the_session_cap(node, tiny_model, tmp_path, transport):
    """A coordinator process holding all 64 sessions is SIGKILLed: the node frees them within the
    grace (then the unheld job after job_idle_s), and a new coordinator opens all 64 again; its
    65th is refused as RESOURCE_EXHAUSTED without evicting the healthy node, and the reconnect after
    that refusal keeps its 64 sessions past the grace."""
    secret = node.identity.secret_file
    argv = [sys.executable, "-c", COORDINATOR, str(tiny_model), str(tmp_path / "cache"), str(secret),
            node.addresses[0], str(MAX_SESSIONS)]
    env = {**os.environ, **ONE_THREAD, "EDGEWEAVE_DATA_PLANE": transport}
    coordinator = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert coordinator.stdout is not None
        line = coordinator.stdout.readline()
        assert line == "ready\n", coordinator.stderr.read() if coordinator.stderr else line
        before = _health(node)
        assert before.sessions == MAX_SESSIONS and len(before.jobs) == 1
    finally:
        coordinator.kill()  # SIGKILL: no reset, no unload, no FIN-time cleanup of its own
        coordinator.wait()
    freed_after = _wait_for(lambda: _health(node).sessions == 0, GRACE_S + 4.0)
    assert freed_after >= GRACE_S * 0.8  # freed by the lease's expiry, not at the stream's close
    _wait_for(lambda: not _health(node).jobs, JOB_IDLE_TEST_S + 4.0)

    checkpoint = open_checkpoint(tiny_model)
    with NodeClient(node.addresses[0], cluster=node.identity) as client, \
            DistributedLlama(checkpoint, [client], [1.0], cache_dir=tmp_path / "cache") as llm:
        logits = {}
        for i in range(MAX_SESSIONS):
            logits[i] = llm.step([SequenceStep(f"new-{i}", PROMPT, 0)])[0]
        assert _health(node).sessions == MAX_SESSIONS
        with pytest.raises(NodeError) as refused:
            llm.step([SequenceStep("one-too-many", PROMPT, 0)])
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"already holds {MAX_SESSIONS} sessions" in refused.value.message
        assert llm.nodes == [client] and not llm.recoveries  # a refusal, not a lost node
        time.sleep(GRACE_S + 1.0)  # the old streams closed at the refusal: their lease must not expire
        assert _health(node).sessions == MAX_SESSIONS
        token = int(logits[0].argmax())
        nxt = llm.step([SequenceStep("new-0", [*PROMPT, token], len(PROMPT))])  # continues from its cache
        assert torch.isfinite(nxt).all()
    assert _health(node).sessions == 0 and not _health(node).jobs  # closed cleanly: unloaded at once


def test_idle_live_coordinator_keeps_sessions_and_job(node, tiny_model, tmp_path):
    """A coordinator that sends nothing for longer than both the grace and job_idle_s keeps its
    sessions and its job (its open streams are the lease), and continues its sessions exactly."""
    checkpoint = open_checkpoint(tiny_model)
    with NodeClient(node.addresses[0], cluster=node.identity) as client, \
            DistributedLlama(checkpoint, [client], [1.0], cache_dir=tmp_path / "cache",
                             fuse_single_node=False) as llm:  # per-layer attn/mlp ops, not the fused one
        first = [llm.step([SequenceStep(f"idle-{i}", PROMPT, 0)])[0] for i in range(3)]
        tokens = [int(row.argmax()) for row in first]
        time.sleep(max(GRACE_S, JOB_IDLE_TEST_S) + 1.5)
        health = _health(node)
        assert health.sessions == 3 and list(health.jobs) == llm.job_ids
        after_idle = llm.step([SequenceStep("idle-1", [*PROMPT, tokens[1]], len(PROMPT))])[0]
        fresh = llm.step([SequenceStep("fresh", [*PROMPT, tokens[1]], 0)])[0]  # the same tokens from scratch
        torch.testing.assert_close(after_idle, fresh, rtol=1e-4, atol=1e-4)


#: starts one attached and one detached LocalCluster, prints their node pids, idles until killed
LAUNCHER = textwrap.dedent("""
    import json, sys, time
    from edgeweave.coordinator.local_cluster import LocalCluster
    attached = LocalCluster(1, advertise=False).start()
    detached = LocalCluster(1, advertise=False, detach=True).start()
    print(json.dumps([attached.procs[0].pid, detached.procs[0].pid]), flush=True)
    time.sleep(600)
""")


def test_local_nodes_exit_with_their_sigkilled_launcher():
    """SIGKILL of a process that started a LocalCluster: its nodes exit within a few seconds (the
    inherited pipe's EOF), while the nodes of a detached cluster (`cluster up`) keep serving."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **ONE_THREAD})
    assert launcher.stdout is not None
    attached_pid, detached_pid = json.loads(launcher.stdout.readline())
    attached, detached = psutil.Process(attached_pid), psutil.Process(detached_pid)
    try:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        start = time.monotonic()
        attached.wait(timeout=10)  # psutil.TimeoutExpired fails the test
        assert time.monotonic() - start < 5.0
        time.sleep(1.0)
        assert detached.is_running() and detached.status() != psutil.STATUS_ZOMBIE
    finally:
        for proc in (attached, detached):
            if proc.is_running():
                proc.terminate()
        psutil.wait_procs([attached, detached], timeout=10)
