"""Generation through the tensor-parallel executor is the same token for token, whatever the window.

A 6-layer random Llama (written by `splitting.random_llama`) is cut over 2 nodes; the nodes'
executors read their layers through the sliding window (1, 2 and 3 layers) or keep them all. The
all-resident run is checked against Hugging Face transformers on the same checkpoint, and the
windowed runs must give bit-identical logits: the same weights through the same kernels.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.random_llama import PRESETS, write_random_llama
from edgeweave.splitting.tensor_parallel import plan_shards, write_shards

transformers = pytest.importorskip("transformers")

N_LAYERS = 6
PROMPT = [1, 17, 230, 5, 99, 400, 12]
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    config = replace(PRESETS["tiny"], num_layers=N_LAYERS)
    folder = write_random_llama(tmp_path_factory.mktemp("random-llama"), config, seed=3)
    checkpoint = open_checkpoint(folder)
    manifest = write_shards(checkpoint, plan_shards(checkpoint.config, [2.0, 1.0]), tmp_path_factory.mktemp("shards"))
    return folder, checkpoint, manifest


def _generate(checkpoint, manifest, window):
    """Greedy tokens and per-step logits through two executors and the hub; plus the executors' stats."""
    base = {"model": manifest.data["config"], "n_layers": N_LAYERS, "window": window}
    executors = [TensorParallelExecutor({**base, "rank": r}, manifest.node_files(r)) for r in range(2)]
    hub = TensorParallelHub.from_file(checkpoint.config, manifest.coordinator_file)

    def reduce(op, layer, x, position):
        return sum(e.forward(op, layer, position, "s", [x])[0] for e in executors)

    logits = hub.forward(PROMPT, 0, reduce)[-1]
    tokens, steps = [], [logits]
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = hub.forward([tokens[-1]], len(PROMPT) + len(tokens) - 1, reduce)[-1]
        steps.append(logits)
    stats = [e.stats()["layer_store"] for e in executors]
    for e in executors:
        e.close()
    return tokens, torch.stack(steps), stats


def test_window_1_2_3_and_resident_generate_identically(sharded):
    folder, checkpoint, manifest = sharded
    tokens, logits, stats = _generate(checkpoint, manifest, None)
    assert [s["loads"] for s in stats] == [N_LAYERS, N_LAYERS]

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        theirs = model(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 :]
    torch.testing.assert_close(logits, theirs, rtol=0, atol=1e-4)
    assert tokens == theirs[:-1].argmax(-1).tolist()

    for window in (1, 2, 3):
        got_tokens, got_logits, got_stats = _generate(checkpoint, manifest, window)
        assert got_tokens == tokens
        assert torch.equal(got_logits, logits), f"window={window} changed the logits"
        passes = 1 + NEW_TOKENS  # prefill + one pass per decode step
        for s in got_stats:
            assert s["window"] == window
            # every pass re-reads every layer, the look-ahead may have read up to w-1 layers of the next pass
            assert passes * N_LAYERS <= s["loads"] <= passes * N_LAYERS + window - 1
            assert s["stall_s"] > 0
            # the window's slots, mapped once and reused for every pass
            assert s["slots"] <= window and s["peak_resident_bytes"] <= window * s["slot_bytes"]
