"""Tensor-parallel SmolLM2 over real node processes (LocalCluster), against HF transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from llm_reference import (
    ONE_THREAD,
    hf_reference,
    local_cluster_fixture,
    one_torch_thread,  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
    smollm_in_memory,
)

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.tp_driver import DistributedLlama

pytestmark = [pytest.mark.llm, pytest.mark.slow]


cluster = local_cluster_fixture(3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """$EDGEWEAVE_CACHE of these tests; DistributedLlama and the CLI share its shards/ folder."""
    return tmp_path_factory.mktemp("edgeweave-cache")


def _clients(cluster, n):
    return [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses[:n]]


def _check_against_transformers(llm: DistributedLlama) -> None:
    ref = hf_reference()
    logits: list[torch.Tensor] = []
    tokens = list(llm.generate(ref.prompt_ids, len(ref.tokens), logits_out=logits))
    assert tokens == ref.tokens
    p = len(ref.prompt_ids)
    torch.testing.assert_close(torch.stack(logits), ref.logits[p - 1 : -1], rtol=0, atol=1e-3)
    stats = llm.last_stats
    per_step = 1 if llm.fused else 2 * llm.config.num_layers
    assert stats.round_trips == per_step * len(ref.tokens)
    assert stats.ttft_s > 0 and len(stats.token_s) == len(ref.tokens) - 1


def test_one_node_runs_every_layer_in_one_message_and_matches_transformers(cluster, cache_dir):
    """A node holding the whole model gets the norms and runs all layers per step ("layers" op).
    (The per-layer star path is what the 2- and 3-node runs below use.)"""
    client = NodeClient(cluster.addresses[0], cluster=cluster.identity)
    with client, DistributedLlama(smollm_in_memory(), [client], [1.0], cache_dir=cache_dir / "shards") as llm:
        assert llm.fused
        _check_against_transformers(llm)
        assert client.job_stats(llm.job_ids[0])["tokens_computed"] == len(hf_reference().prompt_ids) + 31


@pytest.mark.parametrize(("n_nodes", "weights"), [(2, [1.0, 1.0]), (3, [3.0, 2.0, 1.0])])
def test_greedy_tokens_match_transformers(cluster, cache_dir, n_nodes, weights):
    """[1, 1] cuts 3 KV heads 2 + 1; [3, 2, 1] leaves the third node with MLP columns only."""
    clients = _clients(cluster, n_nodes)
    with DistributedLlama(smollm_in_memory(), clients, weights, cache_dir=cache_dir / "shards") as llm:
        if n_nodes == 3:
            assert [row["n_kv_heads"] for row in llm.describe()] == [2, 1, 0]
        _check_against_transformers(llm)
        stats = llm.node_stats()
        assert all(s["kind"] == "tp_llm" for s in stats)
    # the same plan again: nodes already hold every shard, nothing is sent
    with DistributedLlama(smollm_in_memory(), clients, weights, cache_dir=cache_dir / "shards") as again:
        assert again.bytes_sent == 0
        ref = hf_reference()
        assert list(again.generate(ref.prompt_ids, 2)) == ref.tokens[:2]
    for client in clients:
        client.close()


def test_cli_run_answers_paris(cache_dir):
    """`edgeweave run` with no peers starts its own local cluster (1 node here) and streams the
    answer; --coordinator-share makes this process the second member."""
    env = {**os.environ, **ONE_THREAD, "EDGEWEAVE_CACHE": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "edgeweave", "run", "--prompt", "What is the capital of France? Answer in one sentence.", "--nodes", "1",
         "--weights", "1", "--coordinator-share", "1", "--interface", "127.0.0.1", "--discovery-timeout", "0",
         "--max-tokens", "16", "--json"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"]
    assert [n["address"] == "local" for n in out["nodes"]] == [True, False]
    assert out["ttft_s"] > 0 and out["per_token_s"] > 0


def test_coordinator_share_with_one_node_matches_transformers(cluster, cache_dir):
    """The coordinator computes rank 0's share in process (TPI-LLM's master) next to a real node:
    nothing is shipped to it, and tokens and logits still match transformers."""
    from edgeweave.coordinator.local_member import LocalMember

    me, client = LocalMember(), NodeClient(cluster.addresses[0], cluster=cluster.identity)
    with me, client, DistributedLlama(smollm_in_memory(), [me, client], [1.0, 1.0],
                                      cache_dir=cache_dir / "shards") as llm:
        assert [row["address"] for row in llm.describe()] == ["local", client.address]
        node_bytes = sum(llm.manifest.path(rel).stat().st_size for rel in llm.manifest.shard_files(1).values())
        assert llm.bytes_sent <= node_bytes  # rank 0's files stay where they were written
        _check_against_transformers(llm)
        assert me.job_stats(llm.job_ids[0])["tokens_computed"] > 0


def test_quantized_three_nodes_windowed_equal_the_same_plan_in_process(cluster, cache_dir, tmp_path):
    """The shipped Q4_1 file kept 4-bit over 3 real nodes, each holding a window of 3 layers, gives
    exactly the tokens (logits within 1e-4) of the same plan run in one process, resident, with the
    same kernels and weights: neither the wire nor the window changes the math."""
    from test_quantized import N_TOKENS, InProcess, prompt_ids, smollm

    from edgeweave.runtime.sampling import SamplingParams

    weights = [1.0, 1.0, 1.0]
    steps = N_TOKENS // 3  # every step re-reads every layer of the window: a dozen show it as well as 32
    same_plan = InProcess(tmp_path / "in-process", weights)
    want_tokens, want_logits = same_plan.greedy(steps)
    same_plan.close()
    logits: list[torch.Tensor] = []
    clients = _clients(cluster, 3)
    with DistributedLlama(smollm(), clients, weights, cache_dir=cache_dir / "shards", window=3, hub_threads=1) as llm:
        assert llm.plan.plan_id == same_plan.plan.plan_id and llm.manifest.data["precision"] == "file"
        assert [d["window"] for d in llm.load_details] == [3, 3, 3] and all(d["quantized"] for d in llm.load_details)
        tokens = list(llm.generate(prompt_ids(), steps, SamplingParams(), logits_out=logits))
    for client in clients:
        client.close()
    assert tokens == want_tokens
    torch.testing.assert_close(torch.stack([row.reshape(-1) for row in logits]), want_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("n_nodes", "weights", "layout"), [
    (3, [2.0, 1.0, 1.0], "pipeline"),
    (3, [1.0, 1.0, 1.0], "hybrid"),
])
def test_pipeline_and_hybrid_layouts_match_transformers(cluster, cache_dir, n_nodes, weights, layout):
    """Pipeline stages (each node all heads and columns of a contiguous range of layers, one message
    per stage and token) and a hybrid (a 2-node tensor-parallel stage, then a 1-node stage) give
    transformers' greedy tokens and logits, with the round trips their layout promises."""
    from edgeweave.splitting import layouts

    request = layouts.hybrid([12, 18], [2, 1]) if layout == "hybrid" else layout
    clients = _clients(cluster, n_nodes)
    with DistributedLlama(smollm_in_memory(), clients, weights, cache_dir=cache_dir / "shards", layout=request) as llm:
        rows = llm.describe()
        if layout == "pipeline":
            ranges = [tuple(row["layers"]) for row in rows]
            assert ranges == [(0, 15), (15, 23), (23, 30)]  # in proportion to the weights
            assert all(row["n_kv_heads"] == 3 and row["n_columns"] == 1536 for row in rows)
            assert llm.messages_per_token == n_nodes
        else:
            assert [tuple(row["layers"]) for row in rows] == [(0, 12), (0, 12), (12, 30)]
            assert llm.messages_per_token == 2 * 12 + 1
        ref = hf_reference()
        logits: list[torch.Tensor] = []
        assert list(llm.generate(ref.prompt_ids, len(ref.tokens), logits_out=logits)) == ref.tokens
        p = len(ref.prompt_ids)
        torch.testing.assert_close(torch.stack(logits), ref.logits[p - 1: -1], rtol=0, atol=1e-3)
        assert llm.last_stats.round_trips == llm.messages_per_token * len(ref.tokens)
        details = llm.load_details
        assert [d["n_layers"] for d in details] == [row["layers"][1] - row["layers"][0] for row in rows]
    for client in clients:
        client.close()
