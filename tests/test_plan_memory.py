"""The planner uses memory budgets: windows where they are needed, a refusal with the numbers
where not even one layer fits, before a single shard is written or sent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from llm_reference import smollm

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.memory_plan import MemoryPlanError


def _plan(*args: str) -> subprocess.CompletedProcess:
    """`edgeweave plan` for equal nodes: no discovery (and never on the host's own interfaces)."""
    return subprocess.run([sys.executable, "-m", "edgeweave", "plan", "--discovery-timeout", "0", *args],
                          capture_output=True, text=True, timeout=120)


def test_plan_windows_a_small_node_and_keeps_a_big_one_resident():
    # 560 MiB: the node's runtime (400 MiB) and KV cache for 4096 tokens (120 MiB) leave room for a few layers
    result = _plan("--json", "--memory-budget", "560MiB", "--memory-budget", "4GiB")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["nodes"]
    assert rows[1]["window"] is None  # everything resident
    assert isinstance(rows[0]["window"], int) and 1 <= rows[0]["window"] < 30


def test_plan_refuses_a_node_too_small_for_one_layer_with_the_numbers():
    result = _plan("--memory-budget", "30MiB", "--memory-budget", "4GiB")
    assert result.returncode == 2
    assert "does not fit" in result.stderr and "node 0 has a 30.00 MiB budget" in result.stderr
    assert "missing for even one layer" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_driver_refuses_before_sending_any_shard(tmp_path):
    with LocalCluster(1, base_dir=tmp_path, advertise=False, memory_budgets=["30MiB"]) as cluster:
        with NodeClient(cluster.addresses[0]) as client, pytest.raises(MemoryPlanError, match="missing"):
            DistributedLlama(smollm(), [client], [1.0], cache_dir=tmp_path / "cache", show_progress=False)
        shards = tmp_path / cluster.names[0] / "shards"
        assert not shards.exists() or not any(shards.iterdir())
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing written either


@pytest.mark.slow
def test_an_explicit_pipeline_gives_a_small_node_only_the_layers_it_holds(tmp_path):
    """`--layout pipeline` over equal-speed nodes cuts 15 | 15 by speed; a node whose budget holds
    about 9 SmolLM2 layers resident (the runtime's 400 MiB, then ~12 MB a layer with its KV cache)
    gets only those (9), the other node the rest: both all resident, where the speed split alone had
    the small node stream its 15 through a window. The answer is still the model's."""
    from edgeweave.splitting.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(smollm())
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    with LocalCluster(2, base_dir=tmp_path, advertise=False, memory_budgets=["500MiB", "0"]) as cluster:
        clients = [NodeClient(a) for a in cluster.addresses]
        try:
            with DistributedLlama(smollm(), clients, [1.0, 1.0], cache_dir=tmp_path / "cache", show_progress=False,
                                  layout="pipeline") as llm:
                counts = [stage.n_layers for stage in llm.layout.stages]
                windows = llm.memory_plan.windows
                text = tokenizer.decode(list(llm.generate(prompt, 8)))
        finally:
            for client in clients:
                client.close()
    assert counts == [9, 21], counts
    assert windows == [None, None], windows
    assert text.startswith("The capital of France is Paris"), text
