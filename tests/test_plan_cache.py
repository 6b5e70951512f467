"""Stable plans and a bounded coordinator cache.

Units: hysteresis and the 1/8 grid (coordinator/plan_cache.py) keep noisy measurements on one cut.
Cluster: a second DistributedLlama over the same real node processes, weights measured (not given),
writes 0 bytes, sends 0 bytes and adds no cache folder. CLI: `edgeweave cache list/prune` on
folders written by the real shard writer.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import pytest
from llm_reference import local_cluster_fixture, one_torch_thread  # noqa: F401 - autouse: one torch thread
from typer.testing import CliRunner

from edgeweave.cli import app
from edgeweave.coordinator import plan_cache
from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.random_llama import write_random_llama
from edgeweave.splitting.tensor_parallel import plan_shards, write_shards

cluster = local_cluster_fixture(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer random Llama (a few MB): shards are written in well under a second."""
    return open_checkpoint(write_random_llama(tmp_path_factory.mktemp("tiny-llama"), "tiny", seed=1))


# -- weight stabilization -------------------------------------------------------------------------
def test_a_measurement_inside_the_band_keeps_the_stored_capacity():
    assert plan_cache.stabilize(None, 10.0) == (10.0, False)
    assert plan_cache.stabilize(10.0, 12.4) == (10.0, True)
    assert plan_cache.stabilize(10.0, 7.6) == (10.0, True)
    assert plan_cache.stabilize(10.0, 12.6) == (12.6, False)  # a real change replaces it
    assert plan_cache.stabilize(10.0, 7.4) == (7.4, False)


def test_grid_rounds_to_eighths_of_the_fastest():
    assert plan_cache.grid_weights([10.0, 9.5]) == [10.0, 10.0]  # near-equal nodes: equal shares
    assert plan_cache.grid_weights([8.0, 4.2, 0.1]) == [8.0, 4.0, 1.0]  # at least one step each
    assert plan_cache.grid_weights([20.0, 13.0]) == [20.0, 12.5]
    with pytest.raises(ValueError, match="positive"):
        plan_cache.grid_weights([1.0, 0.0])


def test_noisy_measurements_give_one_plan_run_after_run(tmp_path: Path, tiny):
    """±20% noise on two nodes of 10 and 6 GFLOP/s over 50 runs: one cut; the file survives each run."""
    rng = random.Random(0)
    ids = ["node-a", "node-b"]
    plan_ids = set()
    for _ in range(50):
        measured = [10.0 * rng.uniform(0.8, 1.2), 6.0 * rng.uniform(0.8, 1.2)]
        if not plan_ids:
            measured = [10.0, 6.0]  # the first run sets the stored capacities
        capacities, cached = plan_cache.stable_capacities(tmp_path, ids, measured)
        plan_ids.add(plan_shards(tiny.config, plan_cache.grid_weights(capacities)).plan_id)
    assert len(plan_ids) == 1 and cached == [True, True]
    stored = json.loads((tmp_path / plan_cache.CAPACITIES_FILE).read_text())
    assert stored == {"node-a": {"capacity": 10.0}, "node-b": {"capacity": 6.0}}
    # a node that really got slower (a throttled board) is re-measured and re-planned
    capacities, cached = plan_cache.stable_capacities(tmp_path, ids, [10.0, 3.0])
    assert capacities == [10.0, 3.0] and cached == [True, False]


def test_an_unreadable_cache_file_is_ignored_with_a_warning(tmp_path: Path, caplog):
    (tmp_path / plan_cache.CAPACITIES_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert plan_cache.stable_capacities(tmp_path, ["n"], [5.0]) == ([5.0], [False])
    assert "ignoring the unreadable cache file" in caplog.text
    assert json.loads((tmp_path / plan_cache.CAPACITIES_FILE).read_text()) == {"n": {"capacity": 5.0}}


# -- a re-run over the same real nodes ------------------------------------------------------------
def _folders(root: Path) -> list[Path]:
    return [p for fp in root.iterdir() if fp.is_dir() for p in fp.iterdir() if p.is_dir()]


def test_second_run_on_the_same_nodes_writes_and_sends_nothing(cluster, tiny, tmp_path: Path, caplog):
    """No --weights: the first run profiles the nodes, the second reuses that plan (and its shards)."""
    root = tmp_path / "shards"
    clients = [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]
    try:
        with DistributedLlama(tiny, clients, cache_dir=root) as first:
            assert first.weights_source == "measured"
            assert first.bytes_written > 0 and first.bytes_sent > 0
            tokens = list(first.generate([1, 5, 9, 3], 3))
            plan_id, used = first.plan.plan_id, first.manifest.root.stat().st_mtime
        assert len(_folders(root)) == 1
        time.sleep(0.02)
        with caplog.at_level(logging.INFO, logger="edgeweave.coordinator.plan_cache"), \
                DistributedLlama(tiny, clients, cache_dir=root) as second:
            assert second.weights_source == "cached plan" and second.plan.plan_id == plan_id
            assert (second.bytes_written, second.bytes_sent) == (0, 0)
            assert list(second.generate([1, 5, 9, 3], 3)) == tokens
            assert second.manifest.root.stat().st_mtime > used  # touched: its last use is now
        assert "from the cached plan" in caplog.text
        assert len(_folders(root)) == 1
        # explicit weights still win, and a different cut is a new folder
        with DistributedLlama(tiny, clients, [3.0, 1.0], cache_dir=root) as given:
            assert given.weights_source == "given" and given.plan.plan_id != plan_id
        assert len(_folders(root)) == 2
    finally:
        for client in clients:
            client.close()


# -- edgeweave cache list / prune -----------------------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output


def test_cache_list_and_prune_on_folders_written_by_the_shard_writer(tiny, tmp_path: Path):
    root = tmp_path / "shards"
    folders = []
    for age, weights in ((300, [1.0, 1.0]), (200, [3.0, 1.0]), (100, [1.0])):
        plan = plan_shards(tiny.config, weights)
        folder = root / tiny.fingerprint / f"{plan.plan_id}-float32"
        write_shards(tiny, plan, folder)
        os.utime(folder, (time.time() - age, time.time() - age))
        folders.append(folder)
    sizes = [sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in folders]

    code, out = _invoke("cache", "list", "--cache-dir", str(root), "--json")
    assert code == 0, out
    listed = json.loads(out)
    assert [p["path"] for p in listed["plans"]] == [str(f) for f in reversed(folders)]  # most recent first
    assert listed["total_bytes"] == sum(sizes) and [p["bytes"] for p in listed["plans"]] == sizes[::-1]
    code, out = _invoke("cache", "list", "--cache-dir", str(root))
    assert code == 0 and "3 plan folder(s)" in " ".join(out.split()) and "5 min ago" in out

    code, out = _invoke("cache", "prune", "--cache-dir", str(root), "--keep-last", "2", "--dry-run")
    assert code == 0 and f"would free {sizes[0]} bytes" in out and folders[0].exists()
    code, out = _invoke("cache", "prune", "--cache-dir", str(root), "--keep-last", "2", "--json")
    report = json.loads(out)
    assert [p["path"] for p in report["removed"]] == [str(folders[0])] and report["bytes_freed"] == sizes[0]
    assert not folders[0].exists() and folders[1].exists()
    code, out = _invoke("cache", "prune", "--cache-dir", str(root), "--max-size", str(sizes[2]))
    assert code == 0 and f"removed 1 plan folder(s): {sizes[1]} bytes" in out
    assert not folders[1].exists() and folders[2].exists()
    code, out = _invoke("cache", "prune", "--cache-dir", str(root), "--all")
    assert code == 0 and not folders[2].exists() and not (root / tiny.fingerprint).exists()
    code, out = _invoke("cache", "list", "--cache-dir", str(root), "--json")
    assert json.loads(out)["plans"] == [] and json.loads(out)["total_bytes"] == 0


@pytest.mark.parametrize(("args", "sentence"), [
    ((), "say what to remove"),
    (("--max-size", "a lot"), "--max-size 'a lot' is not understood"),
    (("--keep-last", "-1"), "must be 0 or more"),
])
def test_prune_refuses_bad_input_in_one_sentence(tmp_path: Path, args, sentence):
    code, out = _invoke("cache", "prune", "--cache-dir", str(tmp_path), *args)
    assert code == 2 and sentence in out and "Traceback" not in out
