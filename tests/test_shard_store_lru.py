"""The node's shard store under a size bound: LRU eviction, pinned shards, refusal; and the same
rules through a real node process (`edgeweave node --shard-cache-max`, gRPC PutShard/Load/Health)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from rich.console import Console

from edgeweave.coordinator.cli_serve import node_rows, nodes_status_table
from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.discovery import NodeRecord
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.node.shard_store import ShardCacheFull, ShardStore

KIB = 1024


def _blob(tag: str, size: int) -> tuple[bytes, str]:
    data = (tag.encode() * (size // len(tag) + 1))[:size]
    return data, hashlib.sha256(data).hexdigest()


def _put(store: ShardStore, tag: str, size: int) -> str:
    """Upload one shard as PutShard chunks would arrive (header in the first chunk)."""
    data, digest = _blob(tag, size)
    half = size // 2
    chunks = [SimpleNamespace(name=f"{tag}.bin", sha256=digest, size=size, offset=0, data=data[:half]),
              SimpleNamespace(name="", sha256="", size=0, offset=half, data=data[half:])]
    assert store.receive(chunks)[0] == digest
    return digest


def _age(store: ShardStore, digest: str, seconds_ago: float) -> None:
    """Set a shard's last use explicitly (mtime resolution would make back-to-back uploads tie)."""
    when = time.time() - seconds_ago
    os.utime(store.root / f"{digest}.ok", (when, when))


def test_evicts_least_recently_used_and_use_refreshes_recency(tmp_path: Path):
    store = ShardStore(tmp_path, max_bytes=30 * KIB)
    a, b, c = (_put(store, t, 10 * KIB) for t in "abc")
    _age(store, a, 30), _age(store, b, 20), _age(store, c, 10)
    assert store.present([a]) == [a]  # HasShards: `a` is now the most recently used
    d = _put(store, "d", 10 * KIB)  # over the bound by 10 KiB: the oldest (`b`) goes
    assert store.present([a, b, c, d]) == [a, c, d]
    assert store.used_bytes == 30 * KIB
    assert not (store.root / b).exists() and not (store.root / f"{b}.ok").exists()
    assert store.verify(c)  # Load's check refreshes too: `a` is now the oldest
    _age(store, a, 5), _age(store, d, 3)
    store.verify(c)
    e = _put(store, "e", 15 * KIB)  # needs 15 KiB: `a` then `d`
    assert store.present([a, c, d, e]) == [c, e]
    assert ShardStore(tmp_path, max_bytes=30 * KIB).used_bytes == 25 * KIB  # a restart counts the same bytes


def test_never_evicts_pinned_shards_and_refuses_what_cannot_fit(tmp_path: Path):
    pinned: set[str] = set()
    store = ShardStore(tmp_path, max_bytes=30 * KIB, pinned=lambda: set(pinned))
    a, b = _put(store, "a", 10 * KIB), _put(store, "b", 10 * KIB)
    _age(store, a, 20), _age(store, b, 10)
    pinned.add(a)  # a loaded job's shard: never evicted, however old
    c = _put(store, "c", 15 * KIB)
    assert store.present([a, b, c]) == [a, c]
    pinned.add(c)
    data, digest = _blob("z", 25 * KIB)  # 25 KiB cannot fit beside the 25 KiB of pinned shards
    with pytest.raises(ShardCacheFull, match="bounded to 30720 bytes and only 5120 can be freed"):
        store.receive([SimpleNamespace(name="z.bin", sha256=digest, size=len(data), offset=0, data=data)])
    assert store.present([a, c]) == [a, c] and store.used_bytes == 25 * KIB  # nothing was evicted for it
    assert not any(p.name.endswith(".part") for p in store.root.iterdir())


def test_unbounded_store_keeps_everything(tmp_path: Path):
    store = ShardStore(tmp_path)
    digests = [_put(store, t, 10 * KIB) for t in "abcd"]
    assert store.present(digests) == digests and store.used_bytes == 40 * KIB and store.max_bytes == 0


def _upload(client: NodeClient, folder: Path, tag: str, size: int) -> str:
    data, digest = _blob(tag, size)
    path = folder / f"{tag}.bin"
    path.write_bytes(data)
    client.put_shard(path, f"{tag}.bin", digest)
    return digest


def test_real_node_bounds_its_store_keeps_loaded_shards_and_reports_sizes(tmp_path: Path):
    """--shard-cache-max 3MiB on a real node: Health reports bytes and bound; an upload evicts the
    LRU shard no job uses, one that cannot fit is refused with RESOURCE_EXHAUSTED; the log says so."""
    with LocalCluster(1, advertise=False, extra_args=["--shard-cache-max", "3MiB"]) as cluster, \
            NodeClient(cluster.addresses[0], cluster=cluster.identity, timeout=30) as client:
        mib = 1 << 20
        a = _upload(client, tmp_path, "a", mib)
        b = _upload(client, tmp_path, "b", mib)
        client.load("pin", "echo", {}, {"a": a})  # the job references `a` (and Load touched it last)
        c = _upload(client, tmp_path, "c", mib)
        health = client.health()
        assert (health.shard_store_bytes, health.shard_store_max) == (3 * mib, 3 * mib)
        time.sleep(0.05)
        client.has_shards([c])  # `c` is now more recent than `b`
        d = _upload(client, tmp_path, "d", mib)
        assert client.has_shards([a, b, c, d]) == {a, c, d}
        with pytest.raises(NodeError) as refused:
            _upload(client, tmp_path, "big", 5 * mib // 2)  # 2.5 MiB beside the pinned 1 MiB of `a`
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--shard-cache-max" in refused.value.message
        assert client.has_shards([a, c, d]) == {a, c, d} and client.health().shard_store_bytes == 3 * mib
        client.unload("pin")
        rows = node_rows([NodeRecord("n", cluster.addresses[0], "", "", source="static")])
        assert (rows[0]["shard_store_bytes"], rows[0]["shard_store_max"]) == (3 * mib, 3 * mib)
        console = Console(width=250, record=True)
        console.print(nodes_status_table(rows))
        table = console.export_text()
        assert "shards/bound" in table and "3.0 MiB / 3.0 MiB" in table
        log = cluster.log_path(0).read_text()
    assert f"evicted shard {b[:12]}" in log


def test_node_refuses_a_malformed_bound(tmp_path: Path):
    from typer.testing import CliRunner

    from edgeweave.cli import app

    result = CliRunner().invoke(app, ["node", "--data-dir", str(tmp_path), "--port", "0", "--no-advertise",
                                      "--shard-cache-max", "lots"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "shard cache bound 'lots' is not understood" in result.output
