"""Pure pieces of the LLM path: shard planning, sampling, KV cache (no checkpoint needed)."""

from __future__ import annotations

import pytest
import torch

from edgeweave.runtime.llama import KVCache
from edgeweave.runtime.sampling import Sampler, SamplingParams, filter_logits
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.tensor_parallel import largest_remainder, plan_shards

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize(
    ("weights", "heads", "columns"),
    [
        ([1.0], [3], [1536]),
        ([1.0, 1.0], [2, 1], [768, 768]),
        ([2.0, 1.0], [2, 1], [1024, 512]),
        ([3.0, 1.0], [2, 1], [1152, 384]),
        ([1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0], [384, 384, 384, 384]),
    ],
)
def test_plan_shards_is_proportional_and_complete(weights, heads, columns):
    plan = plan_shards(SMOL, weights)
    described = plan.describe()
    assert [d["n_kv_heads"] for d in described] == heads
    assert [d["n_q_heads"] for d in described] == [3 * h for h in heads]
    assert [d["n_columns"] for d in described] == columns
    assert all(c % 32 == 0 for c in columns)
    # contiguous, disjoint, covering ranges
    assert plan.shards[0].kv_heads[0] == 0 and plan.shards[-1].kv_heads[1] == 3
    assert plan.shards[-1].columns[1] == 1536
    assert all(a.columns[1] == b.columns[0] for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    assert sum(d["bytes"] for d in described) == 4 * 30 * (SMOL.layer_parameter_count() - 2 * 576)


def test_plan_rejects_bad_weights_and_has_stable_id():
    with pytest.raises(ValueError, match="positive"):
        plan_shards(SMOL, [1.0, 0.0])
    assert plan_shards(SMOL, [2, 1]).plan_id == plan_shards(SMOL, [4, 2]).plan_id
    assert plan_shards(SMOL, [2, 1]).plan_id != plan_shards(SMOL, [1, 1]).plan_id
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]


def test_sampling_greedy_seeded_and_filtered():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert Sampler(SamplingParams()).choose(logits) == 1
    params = SamplingParams(temperature=1.0, top_k=3, seed=7)
    a = [Sampler(params).choose(logits) for _ in range(3)]
    run = Sampler(params)
    b = [run.choose(logits) for _ in range(50)]
    assert a == [a[0]] * 3 and set(b) <= {1, 2, 4} and len(set(b)) > 1
    kept = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(kept).tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_kv_cache_grows_in_chunks_and_truncates():
    cache = KVCache(n_layers=2, n_kv_heads=1, head_dim=4)
    layer = cache.layer(0)
    k = torch.arange(300 * 4, dtype=torch.float32).view(1, 300, 4)
    keys, _ = layer.append(k, k)
    assert layer.k.shape[1] == 512 and torch.equal(keys, k)
    cache.truncate(100)
    keys, _ = layer.append(k[:, :1], k[:, :1])
    assert cache.lengths() == [101, 0] and torch.equal(keys[:, 100], k[:, 0])
