"""The sliding-window layer store, the window rule and the cluster memory plan.

Layer files are written here with safetensors (the shard key names, mixed dtypes, an empty
tensor as on a node without KV heads); every access through the store is compared with
`safetensors.torch.load_file` of the same file.
"""

from __future__ import annotations

import math
import os
import random
import struct
import threading

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
    """Recovery restarts, skipped layers, concurrent callers: always the right tensors, never more than the window."""
    reference = [load_file(str(p)) for p in layer_files]
    rng = random.Random(window)
    order = [rng.randrange(N_LAYERS) for _ in range(60)] + [0, 1, 2, 0, 0, 6, 5, 4]
    with LayerStore(layer_files, window) as store:
        for i in order:
            _assert_same(store.layer(i), reference[i])
        # a jump may leave a useless background read in flight: it finishes in a slot of its own
        assert store.stats()["peak_resident_bytes"] <= window * max(p.stat().st_size for p in layer_files)
        errors: list[BaseException] = []
        use = threading.Lock()

        def worker(seed: int, checked: bool) -> None:
            local = random.Random(seed)
            try:
                for _ in range(30):
                    i = local.randrange(N_LAYERS)
                    if checked:  # the contract: "get a layer, use it" is serialized, like the executor's ops
                        with use:
                            _assert_same(store.layer(i), reference[i])
                    else:  # unserialized callers: the store itself must stay consistent (no deadlock, no error)
                        store.layer(i)
            except BaseException as exc:
                errors.append(exc)

        for checked in (False, True):
            threads = [threading.Thread(target=worker, args=(s, checked)) for s in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a caller hung"
            assert not errors
        for i in range(N_LAYERS):
            _assert_same(store.layer(i), reference[i])
        stats = store.stats()
        assert stats["slots"] == window and stats["peak_resident_bytes"] <= window * stats["slot_bytes"]


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


def _storages(layer: dict[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in layer.values() if t.numel()}


@pytest.mark.parametrize("window", [2, 3])
def test_slots_are_reused_and_contents_stay_bit_exact_over_many_tokens(layer_files, window):
    """After the first pass no slot is mapped again; 12 tokens of slides give the file contents every time."""
    reference = [load_file(str(p)) for p in layer_files]
    with LayerStore(layer_files, window) as store:
        _two_passes(store, reference)
        for i in range(N_LAYERS):  # slots are mapped lazily: let the look-ahead fill the whole window once
            assert store.wait_idle()
            _assert_same(store.layer(i), reference[i])
        warm = store.stats()
        assert warm["slots"] == window and warm["buffer_bytes"] == window * warm["slot_bytes"]
        assert warm["slot_bytes"] % 4096 == 0 and warm["slot_bytes"] >= max(p.stat().st_size for p in layer_files)
        buffers: set[int] = set()
        for _ in range(12):
            for i in range(N_LAYERS):
                for _op in ("attn", "mlp"):
                    layer = store.layer(i)
                    _assert_same(layer, reference[i])
                    buffers |= _storages(layer)
                stats = store.stats()
                assert stats["resident_bytes"] <= window * stats["slot_bytes"]
        assert len(buffers) <= window  # every layer lived in one of the `window` slot buffers
        for i in range(N_LAYERS):  # with the look-ahead complete before each access, all slots hold layers
            assert store.wait_idle()
            layer = store.layer(i)
            _assert_same(layer, reference[i])
            buffers |= _storages(layer)
        assert len(buffers) == window
        assert store.wait_idle()
        stats = store.stats()
    assert stats["slots"] == window and stats["buffer_bytes"] == warm["buffer_bytes"]
    assert stats["loads"] == 16 * N_LAYERS + window - 1
    assert stats["peak_resident_bytes"] <= window * stats["slot_bytes"]
    assert stats["read_s"] > 0 and stats["read_threads"] >= 1


def test_all_resident_store_maps_one_buffer_per_layer(layer_files):
    with LayerStore(layer_files) as store:
        stats = store.stats()
        assert stats["slots"] == N_LAYERS and stats["free_slots"] == 0
        assert stats["buffer_bytes"] == sum(-(-p.stat().st_size // 4096) * 4096 for p in layer_files)
        assert len(set().union(*(_storages(store.layer(i)) for i in range(N_LAYERS)))) == N_LAYERS


def test_jump_while_a_background_read_is_in_flight_recycles_its_slot(layer_files, monkeypatch):
    """Window 2: the read of layer 1 hangs; the caller jumps to 4, then 3, and must wait for that read's slot.

    It must neither map a third slot nor overwrite the slot being read into.
    """
    from edgeweave.runtime import layer_store

    reference = [load_file(str(p)) for p in layer_files]
    started, release = threading.Event(), threading.Event()
    real_read = layer_store.read_file_into

    def slow_read(path, buffer, threads):
        if path == layer_files[1]:
            started.set()
            assert release.wait(30)
        return real_read(path, buffer, threads)

    monkeypatch.setattr(layer_store, "read_file_into", slow_read)
    with LayerStore(layer_files, 2) as store:
        _assert_same(store.layer(0), reference[0])
        assert started.wait(30)
        assert store.stats()["in_flight_layers"] == [1]
        _assert_same(store.layer(4), reference[4])  # layer 0's slot is free: no wait
        stats = store.stats()
        assert stats["in_flight_layers"] == [1] and stats["resident_layers"] == [4] and stats["slots"] == 2
        threading.Timer(0.3, release.set).start()
        # back to 3: the window [3, 4] keeps 4 in its slot, the other slot is busy until the useless read ends
        _assert_same(store.layer(3), reference[3])
        assert store.stats()["last_stall_s"] >= 0.25
        assert store.wait_idle()
        stats = store.stats()
        assert stats["slots"] == 2 and 1 not in stats["resident_layers"]
        assert stats["peak_resident_bytes"] <= 2 * stats["slot_bytes"]
        for i in [6, 0, 1, 2, 3]:
            _assert_same(store.layer(i), reference[i])


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_buffered_fallback_when_the_file_system_refuses_o_direct(layer_files, monkeypatch, refused_at):
    """tmpfs here does O_DIRECT (Linux >= 6.6), so the refusal is simulated: EINVAL at open or at the first read."""
    import errno
    import fcntl

    from edgeweave.runtime import safetensors_read

    real_open, real_preadv, real_fadvise = os.open, os.preadv, os.posix_fadvise
    refused, dropped = [], []

    def fake_open(path, flags, *args, **kwargs):
        if refused_at == "open" and flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def fake_preadv(fd, buffers, offset):
        if refused_at == "read" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    def spy_fadvise(fd, offset, length, advice):
        dropped.append(advice)
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(safetensors_read.os, "open", fake_open)
    monkeypatch.setattr(safetensors_read.os, "preadv", fake_preadv)
    monkeypatch.setattr(safetensors_read.os, "posix_fadvise", spy_fadvise)
    reference = [load_file(str(p)) for p in layer_files]
    tensors, size = read_safetensors(layer_files[2])
    assert size == layer_files[2].stat().st_size
    _assert_same(tensors, reference[2])
    with LayerStore(layer_files, 2) as store:
        _two_passes(store, reference)
    assert refused and dropped and set(dropped) == {os.POSIX_FADV_DONTNEED}


def test_a_file_larger_than_its_slot_is_a_clear_error(layer_files, tmp_path):
    """Slots are sized when the store opens; a file that grew afterwards is refused, never read past the slot."""
    import shutil

    from edgeweave.runtime.safetensors_read import aligned_buffer, read_file_into

    paths = [shutil.copy(p, tmp_path / p.name) for p in layer_files[:3]]
    with LayerStore(paths, 1) as store:
        slot_bytes = store.stats()["slot_bytes"]
        save_file({"w": torch.zeros(slot_bytes // 4 + 1024)}, str(paths[2]))
        with pytest.raises(SafetensorsFormatError, match=r"more than the \d+-byte buffer it is read into"):
            store.layer(2)
        _assert_same(store.layer(0), load_file(str(layer_files[0])))
        assert store.stats()["slots"] == 1
    small = aligned_buffer(4096)
    with pytest.raises(SafetensorsFormatError, match="more than the 4096-byte buffer"):
        read_file_into(paths[2], small)
    assert not small.any()  # nothing was written


def test_quantized_layers_cost_their_kernels_copy_resident_and_the_slot_too_in_a_window():
    """A quantized layer's kernels hold a prepacked copy of its file; in a window the file's slot
    stays as well, so budgets size windows by those costs, not by file bytes."""
    from edgeweave.runtime.memory_budget import KERNEL_BYTES_PER_SHARD_BYTE, held_layer_bytes

    assert held_layer_bytes([100, 100], "float") == ([100, 100], [100, 100])
    factor = KERNEL_BYTES_PER_SHARD_BYTE["ort"]
    resident, windowed = held_layer_bytes([100] * 4, "ort")
    assert resident == [math.ceil(100 * factor)] * 4 and windowed == [math.ceil(100 * (1 + factor))] * 4
    assert choose_window(resident, sum(resident), windowed_bytes=windowed) is None  # all resident fits
    assert choose_window(resident, 2 * windowed[0], windowed_bytes=windowed) == 2  # by the windowed cost
    assert choose_window([100] * 4, 2 * windowed[0]) is None  # file bytes alone: all 4 "fit", 720 held
    with pytest.raises(MemoryBudgetError):
        choose_window(resident, windowed[0] - 1, windowed_bytes=windowed)
