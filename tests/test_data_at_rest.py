"""Data at rest is checked where it is read, and a node's memory budget is the plan's.

Real node processes on loopback, the shipped Q4_1 model. A windowed node re-reads its layer
files every token: a byte flipped in one of them mid-run must become FAILED_PRECONDITION, the
file's removal and a re-fetch, never a wrong token. And a node whose budget forces a window
picks the window the coordinator planned (one accounting) and stays under its budget.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from llm_reference import (
    local_cluster_fixture,
    one_torch_thread,  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
    smollm,
)

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.runtime.memory_budget import NODE_OVERHEAD_BYTES, fit_context, held_layer_bytes, kv_cache_bytes
from edgeweave.splitting.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.llm]

CHAT = [{"role": "user", "content": "Name three rivers of Europe and say where they flow."}]
N_TOKENS = 12
cluster = local_cluster_fixture(2)


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return Tokenizer.from_checkpoint(smollm()).encode_chat(CHAT)


def _clients(cluster) -> list[NodeClient]:
    return [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]


def _flip(path, offset: int, length: int) -> None:
    """Invert `length` bytes in place (same size, as a failing disk or a stray writer would)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_layer_file_changed_mid_run_is_refetched_and_the_answer_stays_right(cluster, tmp_path, prompt_ids):
    clients = _clients(cluster)
    with DistributedLlama(smollm(), clients, [1.0, 1.0], cache_dir=tmp_path / "shards", window=3) as llm:
        reference = list(llm.generate(prompt_ids, N_TOKENS))
        assert [d["window"] for d in llm.load_details] == [3, 3]
        rel = llm.manifest.shard_files(1)["layer.017"]
        stored = cluster.base_dir / cluster.names[1] / "shards" / llm.manifest.sha256(rel)
        assert stored.is_file()
        tokens = []
        for token in llm.generate(prompt_ids, N_TOKENS):
            tokens.append(token)
            if len(tokens) == 3:  # the next token re-reads layer 17 from disk through the window
                _flip(stored, stored.stat().st_size // 4, 256 << 10)  # unchecked, this garbles the answer
        assert tokens == reference
        assert llm.shard_refetches == 1
        assert llm.manifest.sha256(rel) in clients[1].has_shards([llm.manifest.sha256(rel)])  # sent again
    for client in clients:
        client.close()
    log = cluster.log_path(1).read_text()
    assert "changed on disk" in log and "deleting" in log


def test_a_budget_that_forces_a_window_gives_the_planned_window_and_rss_under_it(cluster, tmp_path, prompt_ids):
    """Node 0's budget holds its runtime, KV cache and 6 windowed layers: the node must pick the
    window the coordinator's memory plan shows, and its RSS must stay below the budget."""
    checkpoint = smollm()
    cfg = checkpoint.config
    with DistributedLlama(checkpoint, _clients(cluster), [1.0, 1.0], cache_dir=tmp_path / "shards") as sizing:
        files = sizing._layer_file_bytes()[0]
        n_kv = sizing.plan.shards[0].n_kv_heads
    _, windowed = held_layer_bytes(files, "ort")
    kv = kv_cache_bytes(cfg.num_layers, n_kv, cfg.head_dim, fit_context(cfg.max_position_embeddings))
    budget = NODE_OVERHEAD_BYTES + kv + sum(sorted(windowed)[-6:]) + 1
    cluster.memory_budgets = [str(budget), "0"]
    cluster.restart(0)
    node = psutil.Process(cluster.procs[0].pid)
    peak, done = [node.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(node.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = _clients(cluster)
    try:
        with DistributedLlama(checkpoint, clients, [1.0, 1.0], cache_dir=tmp_path / "shards") as llm:
            planned = llm.memory_plan.windows
            chosen = [d["window"] for d in llm.load_details]
            tokens = list(llm.generate(prompt_ids, N_TOKENS))
    finally:
        done.set()
        sampler.join()
        for client in clients:
            client.close()
        cluster.memory_budgets = None  # node 0 keeps its budget: this module's last test
    assert chosen == planned and planned[0] == 6 and planned[1] is None
    assert len(tokens) > 0
    assert max(peak) < budget, f"node peak RSS {max(peak) / 2**20:.0f} MiB over its {budget / 2**20:.0f} MiB budget"
