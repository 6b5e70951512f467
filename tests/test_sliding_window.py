"""The sliding-window layer store, the window rule and the cluster memory plan.

Layer files are written here with safetensors (the shard key names, mixed dtypes, an empty
tensor as on a node without KV heads); every access through the store is compared with
`safetensors.torch.load_file` of the same file.
"""

from __future__ import annotations

import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeweave.runtime.layer_store import LayerStore, LayerStoreClosed, window_for_budget
from edgeweave.runtime.memory_budget import (
    MemoryBudgetError,
    choose_window,
    kv_cache_bytes,
    max_window_bytes,
    parse_budget,
)
from edgeweave.runtime.safetensors_read import SafetensorsFormatError, read_safetensors
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.memory_plan import MemoryPlanError, fit_cluster, plan_memory
from edgeweave.splitting.tensor_parallel import plan_shards

N_LAYERS = 7
HIDDEN = 32


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory):
    """7 layer files of unequal size: float32 attention, float16/bfloat16 MLP, an empty bias."""
    root = tmp_path_factory.mktemp("layers")
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(N_LAYERS):
        columns = 16 + 8 * (i % 3)
        tensors = {
            "wq": torch.randn(64, HIDDEN, generator=gen),
            "wk": torch.randn(32, HIDDEN, generator=gen),
            "wv": torch.randn(32, HIDDEN, generator=gen),
            "wo": torch.randn(HIDDEN, 64, generator=gen),
            "bq": torch.randn(0, generator=gen),
            "w_gate": torch.randn(columns, HIDDEN, generator=gen).half(),
            "w_up": torch.randn(columns, HIDDEN, generator=gen).bfloat16(),
            "w_down": torch.randn(HIDDEN, columns, generator=gen).half(),
        }
        path = root / f"layer.{i:03d}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _two_passes(store: LayerStore, reference: list[dict]) -> None:
    """Prefill then decode: attn and mlp of each layer ask for it twice."""
    for _ in range(2):
        for i in range(N_LAYERS):
            _assert_same(store.layer(i), reference[i])
            _assert_same(store.layer(i), reference[i])


@pytest.mark.parametrize("window", [1, 2, 3, None])
def test_every_window_returns_the_file_contents_and_reads_as_expected(layer_files, window):
    reference = [load_file(str(p)) for p in layer_files]
    sizes = [p.stat().st_size for p in layer_files]
    with LayerStore(layer_files, window) as store:
        _two_passes(store, reference)
        assert store.wait_idle()
        stats = store.stats()
    if window is None:  # read once, never again, never stalled
        assert stats["loads"] == N_LAYERS and stats["bytes_read"] == sum(sizes)
        assert stats["stall_s"] == 0.0 and stats["resident_layers"] == list(range(N_LAYERS))
        return
    # each pass reads every layer once; the cyclic look-ahead also reads layers 0..w-2 of the next token
    assert stats["loads"] == 2 * N_LAYERS + window - 1
    assert stats["bytes_read"] == 2 * sum(sizes) + sum(sizes[: window - 1])
    assert len(stats["resident_layers"]) == window
    assert stats["peak_resident_bytes"] <= max_window_bytes(sizes, window)
    assert stats["stall_s"] > 0 and stats["last_stall_s"] >= 0
    assert stats["window"] == window and stats["layers"] == N_LAYERS and stats["peak_rss"] > 0


@pytest.mark.parametrize("window", [1, 3])
def test_random_access_order_is_correct_and_bounded(layer_files, window):
    """Recovery restarts, skipped layers, concurrent callers: always the right tensors."""
    reference = [load_file(str(p)) for p in layer_files]
    rng = random.Random(window)
    order = [rng.randrange(N_LAYERS) for _ in range(60)] + [0, 1, 2, 0, 0, 6, 5, 4]
    with LayerStore(layer_files, window) as store:
        for i in order:
            _assert_same(store.layer(i), reference[i])
        largest = max(p.stat().st_size for p in layer_files)
        # window layers, plus one background read that a jump made useless (discarded when done)
        assert store.stats()["peak_resident_bytes"] <= (window + 1) * largest
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            local = random.Random(seed)
            try:
                for _ in range(30):
                    i = local.randrange(N_LAYERS)
                    _assert_same(store.layer(i), reference[i])
            except BaseException as exc:
                errors.append(exc)

        import threading

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_dtype_conversion_and_errors(layer_files, tmp_path):
    with LayerStore(layer_files, 2, dtype=torch.float32) as store:
        assert {t.dtype for t in store.layer(3).values()} == {torch.float32}
        torch.testing.assert_close(store.layer(3)["w_gate"], load_file(str(layer_files[3]))["w_gate"].float())
        with pytest.raises(IndexError, match="out of range: this store holds layers 0..6"):
            store.layer(7)
    with pytest.raises(LayerStoreClosed, match="closed"):
        store.layer(0)
    with pytest.raises(ValueError, match="at least 1 layer"):
        LayerStore(layer_files, 0)
    with pytest.raises(FileNotFoundError, match="nope"):
        LayerStore([tmp_path / "nope.safetensors"], 1)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(layer_files[0].read_bytes()[:-10])
    with pytest.raises(SafetensorsFormatError, match="claims bytes"):
        read_safetensors(truncated)
    huge_header = tmp_path / "header.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="declares a 1099511627776-byte header"):
        read_safetensors(huge_header)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{]x[")
    with pytest.raises(SafetensorsFormatError, match="unreadable safetensors header"):
        read_safetensors(garbage)
    # a store whose file broke still answers with the reader's error, and stays usable for other layers
    with LayerStore([layer_files[0], truncated], 1) as store:
        with pytest.raises(SafetensorsFormatError):
            store.layer(1)
        _assert_same(store.layer(0), load_file(str(layer_files[0])))


def test_parse_budget():
    gib = 1024**3
    assert parse_budget("2GiB") == 2 * gib
    assert parse_budget("512M") == 512 * 1000**2
    assert parse_budget("1e9") == 10**9
    assert parse_budget(123456) == 123456
    assert parse_budget("0.5", available=10 * gib) == 5 * gib
    for bad in ("lots", "-1", "nan", "2 parsecs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_budget(bad)


def test_choose_window_rule():
    layers = [100, 100, 300, 100]
    assert choose_window(layers, budget=600 + 50 + 10, kv_cache_bytes=50, overhead=10) is None
    # any 2 cyclically consecutive layers must fit: 100+300 = 400
    assert choose_window(layers, budget=400) == 2
    assert choose_window(layers, budget=399) == 1  # no overlap of read and compute, but it runs
    assert choose_window(layers, budget=500) == 3
    with pytest.raises(MemoryBudgetError) as info:
        choose_window(layers, budget=350, kv_cache_bytes=40, overhead=20)
    message = str(info.value)
    assert "290 B for weights" in message and "largest layer needs 300 B: 10 B missing" in message
    assert kv_cache_bytes(n_layers=30, n_kv_heads=3, head_dim=64, context=2048, itemsize=4) == 2 * 30 * 3 * 64 * 2048 * 4


def test_memory_plan_windows_and_refusal():
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=8, num_heads=8,
                      num_kv_heads=4, head_dim=32)
    plan = plan_shards(cfg, [3.0, 1.0])
    per_layer = [plan.layer_bytes(r) for r in range(2)]
    kv = [kv_cache_bytes(8, s.n_kv_heads, 32, 128) for s in plan.shards]
    budgets = [10**9, kv[1] + 1000 + 3 * per_layer[1]]
    fitted = plan_memory(plan, budgets, names=["a", "b"], context_length=128, overhead=1000, coordinator_bytes=5000)
    assert fitted.windows == [None, 3]
    assert fitted.nodes[1].resident_weight_bytes == 3 * per_layer[1]
    assert fitted.nodes[0].fixed_bytes == 6000 and fitted.nodes[1].fixed_bytes == 1000

    with pytest.raises(MemoryPlanError) as info:
        fit_cluster(["a", "b", "c"], [2 * 1024**3, 150 * 1024**2, 100 * 1024**2],
                    [[1024**3] * 2, [200 * 1024**2] * 2, [312 * 1024**2] * 2], [0, 0, 0], [0, 0, 0])
    message = str(info.value)
    assert message.startswith("the model needs 3.00 GiB of weights per token across 3 nodes but ")
    assert ("node b has a 150.00 MiB budget, which after its runtime (0 B) and KV cache (0 B) leaves 150.00 MiB "
            "for weights: 50.00 MiB missing for even one layer") in message
    assert ("node c has a 100.00 MiB budget, which after its runtime (0 B) and KV cache (0 B) leaves 100.00 MiB "
            "for weights: 212.00 MiB missing for even one layer") in message
    assert "262.00 MiB missing in total" in message and "node a" not in message


def test_window_for_budget_uses_the_file_sizes(layer_files):
    sizes = [p.stat().st_size for p in layer_files]
    assert window_for_budget(layer_files, 0) is None  # 0 = no budget given
    assert window_for_budget(layer_files, sum(sizes) + 100, overhead=100) is None
    assert window_for_budget(layer_files, max_window_bytes(sizes, 3) + 10, kv_cache_bytes=10) == 3
    with pytest.raises(MemoryBudgetError, match="missing for even one layer"):
        window_for_budget(layer_files, max(sizes) - 1)
