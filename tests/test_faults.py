"""Fault tolerance against real node processes: kill -9 mid-generation, corrupt shards, rejoin,
survivors too small, and a full disk. The reference is always the same cluster's uninterrupted run."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from llm_reference import (
    ONE_THREAD,
    local_cluster_fixture,
    one_torch_thread,  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
    smollm,
    smollm_in_memory,
)

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.engine import DistributedEngine
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.recovery import ClusterLostError
from edgeweave.coordinator.scheduler import GenerationJob, Scheduler
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.runtime.memory_budget import FIT_CONTEXT, kv_cache_bytes
from edgeweave.runtime.sampling import SamplingParams
from edgeweave.splitting.memory_plan import DEFAULT_NODE_OVERHEAD
from edgeweave.splitting.tensor_parallel import layer_file, plan_shards, write_shards
from edgeweave.splitting.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
N_TOKENS = 32  # the reference and the killed run: 24 tokens after the kill show the recovery exact
KILL_AFTER = 8


def LLM(test):  # noqa: N802 - reads as a marker
    """Loads SmolLM2 on a real 3-node cluster."""
    return pytest.mark.llm(pytest.mark.slow(test))


cluster = local_cluster_fixture(3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


@pytest.fixture(scope="module")
def prompt_ids():
    return Tokenizer.from_checkpoint(smollm()).encode_chat(CHAT)


@pytest.fixture(scope="module")
def uninterrupted(cluster, cache_dir, prompt_ids):
    """N_TOKENS greedy tokens on the intact 3-node cluster (the reference every fault must reproduce), and its manifest."""
    clients = _clients(cluster, range(3))
    with DistributedLlama(smollm_in_memory(), clients, [1.0, 1.0, 1.0], cache_dir=cache_dir) as llm:
        return list(llm.generate(prompt_ids, N_TOKENS)), llm.manifest


def _clients(cluster, ranks):
    return [NodeClient(cluster.addresses[r], cluster=cluster.identity) for r in ranks]


def _shard_bytes(manifest, ranks) -> int:
    return sum(manifest.path(layer_file(r, i)).stat().st_size for r in ranks for i in range(manifest.config.num_layers))


@LLM
def test_corrupted_shard_is_refetched_at_load(cluster, cache_dir, prompt_ids, uninterrupted):
    """Flip bytes in a stored shard, keeping its size and mtime: Load notices, the file is re-sent once."""
    clients = _clients(cluster, range(3))
    reference, manifest = uninterrupted
    victim = cluster.base_dir / cluster.names[1] / "shards" / manifest.sha256(layer_file(1, 7))
    before = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(before.st_size // 2)
        f.write(b"\x00\x01\x02\x03" * 64)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size
    with DistributedLlama(smollm_in_memory(), clients, [1.0, 1.0, 1.0], cache_dir=cache_dir) as llm:
        assert llm.bytes_sent == before.st_size  # only the corrupt file travelled again
        assert list(llm.generate(prompt_ids, 8)) == reference[:8]
    for client in clients:
        client.close()


@LLM
def test_kill_minus_nine_mid_generation_continues_identically(cluster, cache_dir, prompt_ids, uninterrupted):
    clients = _clients(cluster, range(3))
    # the survivors' plan: node 0 already holds half of its new shards, so exactly the rest must travel
    checkpoint = smollm_in_memory()
    survivor_plan = plan_shards(checkpoint.config, [1.0, 1.0])
    survivor_manifest = write_shards(checkpoint, survivor_plan, cache_dir / checkpoint.fingerprint /
                                     f"{survivor_plan.plan_id}-float32", "float32")
    half = checkpoint.config.num_layers // 2
    preloaded = 0
    for i in range(half):
        path = survivor_manifest.path(layer_file(0, i))
        clients[0].put_shard(path, f"layer.{i:03d}", survivor_manifest.sha256(layer_file(0, i)))
        preloaded += path.stat().st_size

    with DistributedLlama(checkpoint, clients, [1.0, 1.0, 1.0], cache_dir=cache_dir) as llm:
        tokens, killer = [], None
        for token in llm.generate(prompt_ids, N_TOKENS):
            tokens.append(token)
            if len(tokens) == KILL_AFTER:
                killer = threading.Thread(target=cluster.kill, args=(2,))
                killer.start()
        killer.join()
        assert tokens == uninterrupted[0]
        [record] = llm.last_stats.recoveries
        assert record["lost_node"] == cluster.addresses[2]
        assert record["nodes_left"] == 2 and 0 < record["detected_after_s"] <= record["stall_s"]
        assert llm.plan.plan_id == survivor_plan.plan_id
        assert record["resent_bytes"] == _shard_bytes(survivor_manifest, [0, 1]) - preloaded
    for client in clients:
        client.close()


@LLM
def test_pipeline_loses_a_middle_stage_and_continues_identically(cluster, cache_dir, prompt_ids, uninterrupted):
    """kill -9 of the node holding the middle layers of a 3-stage pipeline: the survivors split the
    layers again as a 2-stage pipeline and the run gives exactly the uninterrupted tokens."""
    for r in range(3):  # the tensor-parallel test above killed one
        if cluster.procs[r].poll() is not None:
            cluster.restart(r)
    clients = _clients(cluster, range(3))
    with DistributedLlama(smollm_in_memory(), clients, [1.0, 1.0, 1.0], cache_dir=cache_dir, layout="pipeline") as llm:
        assert [tuple(row["layers"]) for row in llm.describe()] == [(0, 10), (10, 20), (20, 30)]
        tokens = []
        for token in llm.generate(prompt_ids, 24):
            tokens.append(token)
            if len(tokens) == 6:
                cluster.kill(1)
        assert tokens == uninterrupted[0][:24]
        [record] = llm.last_stats.recoveries
        assert record["lost_node"] == cluster.addresses[1] and record["nodes_left"] == 2
        assert llm.layout.describe() == "pipeline 0-14|15-29" and llm.messages_per_token == 2
    cluster.restart(1)
    for client in clients:
        client.close()


def _serve_batch(engine, prompts: list[list[int]], n_tokens: int, on_token=None) -> list[list[int]]:
    """Greedy answers of `prompts` submitted together to a Scheduler over `engine` (rows of one batch)."""
    scheduler = Scheduler(engine, max_active=len(prompts), prefill_chunk=64)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    errors = []
    try:
        for i, prompt in enumerate(prompts):
            def token(choice, i=i):
                outputs[i].append(choice.token)
                if on_token:
                    on_token(i, outputs[i])

            def done(reason, error):
                if error is not None:
                    errors.append(error)
                finished.release()

            scheduler.submit(GenerationJob(prompt, n_tokens, SamplingParams(), on_token=token, on_done=done))
        for _ in prompts:
            assert finished.acquire(timeout=300), "a request did not finish"
    finally:
        scheduler.close()
    assert not errors, errors
    return outputs


@LLM
def test_engine_recovers_mid_batch_and_uses_a_restarted_node_next(cluster, cache_dir, prompt_ids, uninterrupted):
    """Three requests batched together survive a kill -9 mid-batch, each with exactly the tokens of
    the uninterrupted run (their sessions are rebuilt on the survivors in one step); after a restart
    the next request runs on 3 nodes again with nothing re-sent (the node kept its shards)."""
    if cluster.procs[2].poll() is not None:
        cluster.restart(2)
    engine = DistributedEngine.open(smollm(), cluster.addresses, weights=[1.0, 1.0, 1.0],
                                    cache_dir=cache_dir, quantize="none")  # the float32 tokens of `uninterrupted`
    try:
        def kill_at_second_token(i, tokens):
            if i == 0 and len(tokens) == 2:
                cluster.kill(2)

        # the third request joins with a shorter prompt: rows of different lengths in one batch
        short = prompt_ids[:-3]
        alone_short = list(engine.llm.generate(short, 12))
        outputs = _serve_batch(engine, [prompt_ids, prompt_ids, short], 12, kill_at_second_token)
        assert outputs == [uninterrupted[0][:12], uninterrupted[0][:12], alone_short]
        assert len(engine.llm.nodes) == 2 and len(engine.describe()["recoveries"]) == 1

        cluster.restart(2)
        assert _serve_batch(engine, [prompt_ids], 12) == [uninterrupted[0][:12]]
        assert [row["address"] for row in engine.describe()["nodes"]] == cluster.addresses
        assert engine.rejoins[-1] == {"joined": [cluster.addresses[2]], "nodes": 3, "resent_bytes": 0}
    finally:
        engine.close()


def _one_layer_budget(plan, rank: int) -> int:
    """The smallest budget with which `rank` of `plan` passes the memory plan (one layer at a time)."""
    cfg = plan.config
    context = min(cfg.max_position_embeddings, FIT_CONTEXT)
    kv = kv_cache_bytes(cfg.num_layers, plan.shards[rank].n_kv_heads, cfg.head_dim, context)
    return DEFAULT_NODE_OVERHEAD + kv + plan.layer_bytes(rank, 4)


@LLM
def test_survivors_too_small_raise_a_clear_error(cluster, cache_dir, prompt_ids):
    """Budgets that hold a 2-node share but not the whole model on one node -> ClusterLostError naming
    the lost node (the initial deploy passes the memory plan; the survivor alone cannot)."""
    config = smollm_in_memory().config
    two, one = plan_shards(config, [1.0, 1.0]), plan_shards(config, [1.0])
    fits_two = max(_one_layer_budget(two, r) for r in (0, 1))
    fits_one = _one_layer_budget(one, 0)
    assert fits_two < fits_one
    cluster.memory_budgets = [str((fits_two + fits_one) // 2)] * 3
    for r in (0, 1):
        cluster.restart(r)
    clients = _clients(cluster, [0, 1])
    with DistributedLlama(smollm_in_memory(), clients, [1.0, 1.0], cache_dir=cache_dir,
                          window=smollm_in_memory().config.num_layers) as llm:
        tokens = llm.generate(prompt_ids, 8)
        next(tokens)
        cluster.kill(1)
        with pytest.raises(ClusterLostError, match=rf"lost node\(s\) {cluster.addresses[1]}.*missing") as info:
            list(tokens)
        assert info.value.lost == [cluster.addresses[1]]
    for client in clients:
        client.close()


@pytest.mark.root
def test_put_shard_on_a_full_disk_is_resource_exhausted(tmp_path):
    """A 2 MiB tmpfs as the data dir: a 3 MiB shard is refused with free vs needed, the node keeps serving."""
    base = tmp_path / "cluster"
    data_dir = base / "full"
    data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data_dir)], check=True)
    try:
        with LocalCluster(1, base_dir=base, names=["full"], advertise=False, env=ONE_THREAD) as node:
            big, small = tmp_path / "big.bin", tmp_path / "small.bin"
            big.write_bytes(os.urandom(3 << 20))
            small.write_bytes(os.urandom(100_000))
            with NodeClient(node.addresses[0], cluster=node.identity) as client:
                with pytest.raises(NodeError) as info:
                    client.put_shard(big, "big")
                assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "needs 3145728 bytes" in info.value.message and "bytes free" in info.value.message
                assert not list((data_dir / "shards").glob("*.part"))
                assert client.put_shard(small, "small").size == 100_000
                assert client.health().status == "SERVING"
    finally:
        subprocess.run(["umount", str(data_dir)], check=False)


def test_enospc_mid_write_is_resource_exhausted(tmp_path, monkeypatch):
    """The in-process store: a disk that fills up during the write (the early free-space check passed)."""
    from edgeweave.node.shard_store import ShardNoSpace, ShardStore
    from edgeweave.proto import pb

    store = ShardStore(tmp_path)
    data = os.urandom(4096)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.raises(ShardNoSpace, match="needs 4096 bytes"):
        store.receive([pb.ShardChunk(name="x", sha256=digest, size=len(data), offset=0, data=data)])
    assert not list(Path(store.root).iterdir())
