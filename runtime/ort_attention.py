"""A layer shard's whole attention as ONE ONNX Runtime call: the q/k/v projection, RoPE, the KV
cache append, grouped-query attention and o_proj, for block-quantized weights on MatMulNBits.

Why: the unfused path (`runtime.llama.batched_attention` over `OrtQuantizedMatmuls`) is two ORT
calls with ~30 small torch ops between them (RoPE, cache append, the attention itself). For a
quarter shard of a 1B model those cost more than its matmuls: 358 us per decode step against
80 us of projections (one thread, this VM), and every tensor-parallel token pays it on every node
for every layer. Here the graph is MatMulNBits (q|k|v, with biases) -> Split -> ORT's
`com.microsoft.GroupQueryAttention` (RoPE from our cos/sin tables, causal, grouped heads) ->
MatMulNBits (o_proj): one call, no torch op but a copy of the output.

The KV cache stays ours (`runtime.llama.LayerKV`, [kv heads, capacity, head_dim]: GQA's BNSH layout
with batch 1). It is bound as both the past and the present of GQA (ORT's shared-buffer mode), so
the kernel writes the new keys and values in place after the cached ones; `truncate` keeps working
(GQA reads only `length` of them). Rows of a batch run one call each, so a row's numbers never
depend on what it is batched with.

Only for what GQA computes exactly as our kernels do: float32, rotate-half RoPE over the whole head
(any of `runtime.llama`'s scalings: they live in the tables), no sliding window, no per-head q/k
norms (Qwen3), and not for token-invariant verification (that attends token by token with the
projections batched: `runtime.llama._attend`): `layer_compute.config_allows_fusion` and `shard_allows_fusion`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from onnx import TensorProto, helper

from edgeweave.runtime.layer_compute import QK_NORMS, projection_rows, shard_dimensions
from edgeweave.runtime.ort_quantized import _BoundCall, _Graph

_PAST_INPUTS = ("past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")


class FusedAttention:
    """`FusedAttention(tensors, head_dim, threads)`: one session for the shard's attention;
    `rows(x, caches, positions, lengths, rotary)` runs it (the signature of `batched_attention`'s
    rows, minus what it does not support)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], head_dim: int, threads: int = 1) -> None:
        n_q_rows, n_kv_rows, _, hidden = shard_dimensions(tensors)
        self.head_dim, self.hidden = head_dim, hidden
        self.n_q, self.n_kv = n_q_rows // head_dim, n_kv_rows // head_dim
        g = _Graph(hidden, tensors)
        qkv = g.fused_linear("x", tensors, ["wq", "wk", "wv"], ["bq", "bk", "bv"])
        q, k, v = g.name("q"), g.name("k"), g.name("v")
        sizes = g.constant(np.array([projection_rows(tensors, n) for n in ("wq", "wk", "wv")], np.int64), "sizes")
        g.nodes.append(helper.make_node("Split", [qkv, sizes], [q, k, v], axis=-1))
        axis = g.constant(np.array([0], np.int64), "axis")
        batched = [g.node("Unsqueeze", [t, axis]) for t in (q, k, v)]  # [1, T, heads * head_dim]
        attended = g.name("attended")
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [*batched, *_PAST_INPUTS], [attended, "present_key", "present_value"],
            domain="com.microsoft", num_heads=self.n_q, kv_num_heads=self.n_kv, do_rotary=1, rotary_interleaved=0,
        ))
        out = g.linear(g.node("Squeeze", [attended, axis]), tensors, "wo")
        float_, int32 = TensorProto.FLOAT, TensorProto.INT32
        cache = [1, self.n_kv, "capacity", head_dim]
        inputs = [helper.make_tensor_value_info("past_key", float_, cache),
                  helper.make_tensor_value_info("past_value", float_, cache),
                  helper.make_tensor_value_info("seqlens_k", int32, [1]),
                  helper.make_tensor_value_info("total_sequence_length", int32, []),
                  helper.make_tensor_value_info("cos_cache", float_, ["positions", head_dim // 2]),
                  helper.make_tensor_value_info("sin_cache", float_, ["positions", head_dim // 2])]
        self._session = g.session([out], threads, inputs=inputs, direct=["present_key", "present_value"])
        self.external_bytes = g.external_bytes
        #: per KV cache, its decode call's binding; held here, not by the cache, so that an evicted layer
        #: (a sliding window) takes its session with it, and a reset session its bindings
        self._decode_bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def rows(self, x: torch.Tensor, caches: Sequence, positions: Sequence[int], lengths: Sequence[int],
             rotary) -> torch.Tensor:
        """This shard's partial attention output [T, hidden] of the stacked rows of x [T, hidden];
        each row's keys and values are appended to its cache."""
        if len(caches) == 1:
            return self._run(x, caches[0], positions[0], rotary)
        parts, start = [], 0
        for kv, position, length in zip(caches, positions, lengths, strict=True):
            parts.append(self._run(x[start:start + length], kv, position, rotary))
            start += length
        return torch.cat(parts)

    def _run(self, x: torch.Tensor, kv, position: int, rotary) -> torch.Tensor:
        T = x.shape[0]
        end = position + T
        kv.reserve(end)
        cos, sin = rotary.half_tables(max(end, kv.capacity))
        bound = self._decode_bindings.get(kv) if T == 1 else None
        if bound is None or not bound.fits(kv, cos):
            bound = _Binding(self._session, kv, T, self.hidden, cos, sin)
            if T == 1:
                self._decode_bindings[kv] = bound  # reused by this cache's next decode step
        bound.lengths[0] = end - 1
        bound.total[...] = end
        out = bound(x)
        kv.length = end
        return out


class _Binding(_BoundCall):
    """A `_BoundCall` of the fused session for one KV cache and one row length, with the cache, the
    RoPE tables and the lengths bound too: binding a call from Python costs more than the call
    (110 us against 85 us for a quarter shard of a 1B model), so a decode step only copies its
    input in and writes its lengths in place. Rebuilt when the cache grows (new buffers) or the
    RoPE tables do."""

    def __init__(self, session, kv, rows: int, hidden: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__(session, rows, hidden, hidden)
        self.k_ptr, self.cos_ptr = kv.k.data_ptr(), cos.data_ptr()
        self.lengths, self.total = np.zeros(1, np.int32), np.zeros((), np.int32)
        io = self.io
        cache_shape = [1, *kv.k.shape]
        for name, tensor, shape in (("past_key", kv.k, cache_shape), ("past_value", kv.v, cache_shape),
                                    ("cos_cache", cos, list(cos.shape)), ("sin_cache", sin, list(sin.shape))):
            io.bind_input(name, "cpu", 0, np.float32, shape, tensor.data_ptr())
        io.bind_input("seqlens_k", "cpu", 0, np.int32, [1], self.lengths.ctypes.data)
        io.bind_input("total_sequence_length", "cpu", 0, np.int32, [], self.total.ctypes.data)
        io.bind_output("present_key", "cpu", 0, np.float32, cache_shape, kv.k.data_ptr())
        io.bind_output("present_value", "cpu", 0, np.float32, cache_shape, kv.v.data_ptr())

    def fits(self, kv, cos: torch.Tensor) -> bool:
        return kv.k.data_ptr() == self.k_ptr and cos.data_ptr() == self.cos_ptr


def shard_allows_fusion(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether this shard's attention can run fused: it has KV heads and no per-head q/k norms."""
    return projection_rows(tensors, "wk") > 0 and not any(name in tensors for name in QK_NORMS)
