"""The fused attention (runtime/ort_attention.py: qkv, RoPE, cache append, GQA and o_proj in one ONNX
Runtime call) against the unfused kernels on the same quantized shard: prefill, decode, a chunked
continuation, batched rows of two sessions, a rollback, and a cache that grows past its buffer."""

from __future__ import annotations

import pytest
import torch

from edgeweave.runtime.llama import LayerKV, Rotary, batched_attention
from edgeweave.runtime.ort_quantized import OrtQuantizedMatmuls
from edgeweave.runtime.safetensors_read import read_safetensors
from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.random_llama import write_random_llama
from edgeweave.splitting.tensor_parallel import layer_layouts, plan_shards, write_shards

CONFIG = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=6,
                     num_kv_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=10000.0)
ATOL = 2e-5  # the same int8-activation matmuls; only the attention's sums run in another order


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    ck = open_checkpoint(write_random_llama(root / "hf", CONFIG))
    return write_shards(ck, plan_shards(ck.config, [1.0, 1.0], layer_layouts(ck, "q4"), "q4"), root / "q4")


def _shard(manifest, rank=0, layer=1):
    tensors, _ = read_safetensors(manifest.path(manifest.shard_files(rank)[f"layer.{layer:03d}"]))
    return tensors


def test_fused_attention_equals_the_unfused_kernels(manifest):
    tensors = _shard(manifest)
    fused, plain = OrtQuantizedMatmuls(tensors, fused_head_dim=CONFIG.head_dim), OrtQuantizedMatmuls(tensors)
    assert fused.fused_attention is not None and plain.fused_attention is None
    rotary = Rotary(CONFIG.head_dim, CONFIG.rope_theta, None)
    n_kv = plain.n_kv_rows // CONFIG.head_dim
    # chunk 8: the 13th token grows the buffers, so a bound decode call must rebind to the new ones
    caches = {kind: [LayerKV(n_kv, CONFIG.head_dim, torch.float32, chunk=8) for _ in range(2)] for kind in ("f", "p")}
    torch.manual_seed(0)

    def step(rows):  # rows: [(session index, position, length)]
        x = torch.randn(sum(n for _, _, n in rows), CONFIG.hidden_size)
        outs = {}
        for kind, matmuls in (("f", fused), ("p", plain)):
            outs[kind] = batched_attention(x, matmuls, [caches[kind][s] for s, _, _ in rows], [p for _, p, _ in rows],
                                           [n for _, _, n in rows], rotary, CONFIG.head_dim)
        torch.testing.assert_close(outs["f"], outs["p"], rtol=0, atol=ATOL)
        for s, p, n in rows:
            f, q = caches["f"][s], caches["p"][s]
            assert f.length == q.length == p + n
            torch.testing.assert_close(f.k[:, : f.length], q.k[:, : q.length], rtol=0, atol=ATOL)
            torch.testing.assert_close(f.v[:, : f.length], q.v[:, : q.length], rtol=0, atol=ATOL)

    step([(0, 0, 5)])  # prefill
    for position in range(5, 9):
        step([(0, position, 1)])  # decode (the bound call)
    step([(0, 9, 3)])  # a continuation of 3 tokens
    step([(0, 12, 1)])  # past the first 8-token chunk: new buffers
    step([(1, 0, 4), (0, 13, 1)])  # a batch: a prefill beside a decode
    for kind in ("f", "p"):
        caches[kind][0].truncate(10)  # a rollback: the next tokens overwrite what followed
    step([(0, 10, 1), (1, 4, 1)])
    step([(0, 11, 2)])


def test_executors_fuse_only_where_the_semantics_match(manifest):
    cfg = manifest.data["config"]
    files = {k: manifest.path(v) for k, v in manifest.shard_files(0).items()}

    def fused(**extra):
        ex = TensorParallelExecutor({"model": {**cfg, **extra.pop("model", {})}, "rank": 0, "threads": 1, **extra}, files)
        try:
            return ex.details()["fused_attention"]
        finally:
            ex.close()

    assert fused() is True
    assert fused(batch_invariant=True) is True  # each row is its own call: batch-invariant as it is
    assert fused(token_invariant=True) is False  # verification attends token by token
    assert fused(model={"sliding_window": 4}) is False
    assert fused(backend="torch") is False
