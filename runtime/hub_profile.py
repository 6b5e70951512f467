"""Time what the coordinator itself computes per token: the hub's embedding, norms and LM head.

The layout planner (`splitting.layout_planner`) adds these to every layout's prediction: the
embedding, final norm and LM head once per step (head(T)), one RMSNorm and residual add per
reduction of a tensor-parallel stage (h(T)). They run here on `runtime.tp_hub.TensorParallelHub`
itself, built from random tensors in the layout the plan gives the LM head (8-bit blocks on
ONNX Runtime for a quantized plan, float32 `lm_head_t` otherwise), with the embedding read from
the head's rows as with tied embeddings. A head larger than HEAD_BYTES is timed on its first
rows and scaled by vocab / rows (a memory-bound GEMV costs in proportion to its rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from edgeweave.runtime.batch import Row
from edgeweave.runtime.layer_compute import torch_threads
from edgeweave.runtime.layer_profile import ProjectionLayout, random_block_quantized, sustained_seconds
from edgeweave.runtime.layer_store import return_freed_memory
from edgeweave.runtime.llama import rms_norm
from edgeweave.runtime.quantized import to_shard_tensors
from edgeweave.runtime.tp_hub import TensorParallelHub

#: the largest head timed whole; bigger ones are timed on their first rows and scaled
HEAD_BYTES = 64 << 20


@dataclass(frozen=True)
class HubTiming:
    token_s: float  # head(1): embed one token, final norm, LM head
    prefill_s: float  # head(P): embed P tokens, final norm and LM head of the last
    reduction_s: float  # h(1): one RMSNorm and residual add of a [1, H] state
    reduction_prefill_s: float  # h(P)
    head_rows: int  # rows of the head actually timed (scaled up to the vocabulary)


def _head_tensors(hidden: int, rows: int, head: ProjectionLayout | None) -> dict[str, torch.Tensor]:
    tensors = {"model.norm.weight": torch.ones(hidden), "model.layers.0.input_layernorm.weight": torch.ones(hidden),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden)}
    if head is None or head.bits is None:
        tensors["lm_head_t"] = torch.randn(hidden, rows) * 0.02
    else:
        tensors.update(to_shard_tensors("lm_head", random_block_quantized(rows, hidden, head, np.random.default_rng(0))))
    return tensors


def profile_hub(hidden: int, vocab: int, head: ProjectionLayout | None, prompt_tokens: int, eps: float = 1e-5,
                budget_s: float = 0.5, threads: int = 1) -> HubTiming:
    """Sustained seconds of the hub's per-step work (module docstring) within about `budget_s`;
    `threads` as the driver gives its hub (1 by default)."""
    bytes_per_row = hidden * (4 if head is None or head.bits is None else max(1, head.bits // 8))
    rows = max(1, min(vocab, HEAD_BYTES // bytes_per_row))
    config = SimpleNamespace(num_layers=1, rms_norm_eps=eps)
    hub = TensorParallelHub(config, _head_tensors(hidden, rows, head), threads)  # type: ignore[arg-type]
    try:
        ids = [torch.randint(0, rows, (n,)).tolist() for n in (1, prompt_tokens)]
        spans = [[Row("", 0, 1)], [Row("", 0, prompt_tokens)]]
        states = [torch.randn(n, hidden) for n in (1, prompt_tokens)]
        weight = torch.ones(hidden)
        share = budget_s / 6
        timed = []
        for k in (0, 1):
            def full(k: int = k) -> None:
                hub.forward_rows(ids[k], spans[k], stack=lambda x, _rows: x)

            def embed(k: int = k) -> None:
                hub.embed(torch.as_tensor(ids[k]))

            def reduction(k: int = k) -> None:
                x = states[k]
                x + rms_norm(x, weight, eps)

            full()
            whole, _ = sustained_seconds(full, share)
            # the hub's own thread setting (`TensorParallelHub.forward_rows`) for the parts timed alone
            with torch.inference_mode(), torch_threads(1 if head is not None and head.bits else torch.get_num_threads()):
                lookup, _ = sustained_seconds(embed, share / 2)
                norm, _ = sustained_seconds(reduction, share / 2)
            timed.append((lookup + max(whole - lookup, 0.0) * vocab / rows, norm))
        return HubTiming(timed[0][0], timed[1][0], timed[0][1], timed[1][1], rows)
    finally:
        hub = None  # free the head before trimming the heap
        return_freed_memory(collect=True)

