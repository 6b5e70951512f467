"""Llama-family kernels, written so that one shard and the whole model share the same code.

A tensor-parallel node computes only its KV-head groups of attention and its columns of the MLP
and returns a *partial* hidden state; summing the partials of all shards (plus the residual) gives
exactly what the unsharded layer computes. The single-process `LlamaModel` below is those same
kernels run with every head and every column (= one shard): it is the reference the distributed
run is compared against, and the "1 process" baseline.

Weights use the shard key names written by `splitting.tensor_parallel` (`wq wk wv wo bq bk bv
w_gate w_up w_down`, and Qwen3's per-head `q_norm k_norm`), in HF orientation ([out, in]); the projections run through
`runtime.layer_compute.LayerMatmuls`, so float and block-quantized shards share these kernels.
Nothing here knows about networking or about the checkpoint format.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from edgeweave.runtime.layer_compute import FloatMatmuls, LayerMatmuls


class LlamaShape(Protocol):
    """The configuration attributes the kernels read (satisfied by `splitting.llama_config.LlamaConfig`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_freq_factors: tuple[float, ...] | None  # llama.cpp's RoPE factors (GGUF llama3 scaling)
    sliding_window: int | None  # each query sees at most this many newest keys


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as HF does), returned in x's dtype."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, freq_factors: Sequence[float] | None = None
) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with HF's "linear" and "llama3" scalings.

    `freq_factors` (llama.cpp's `rope_freqs` tensor, head_dim/2 values) then divide the frequencies,
    as ggml's rope does (theta / freq_factor): that is how GGUF files carry llama3 scaling.
    """
    inv_freq = _scaled_inverse_frequencies(head_dim, theta, scaling)
    if freq_factors is None:
        return inv_freq
    factors = torch.as_tensor(list(freq_factors), dtype=torch.float32)
    if factors.shape != inv_freq.shape:
        raise ValueError(f"rope frequency factors need {inv_freq.numel()} values (head_dim / 2), got {factors.numel()}")
    return inv_freq / factors


def _scaled_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported; use a checkpoint with default, linear or llama3 RoPE")


class Rotary:
    """cos/sin tables for RoPE in HF's rotate-half layout, grown on demand."""

    def __init__(
        self, head_dim: int, theta: float, scaling: dict[str, Any] | None,
        freq_factors: Sequence[float] | None = None, size: int = 2048,
    ) -> None:
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, freq_factors)
        self._half: tuple[torch.Tensor, torch.Tensor] | None = None
        self._build(size)

    def _build(self, size: int) -> None:
        positions = torch.arange(size, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def rows(self, positions: Sequence[int], lengths: Sequence[int], dtype: torch.dtype,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [sum of lengths, head_dim] for stacked rows (row r: lengths[r] positions from positions[r])."""
        if len(positions) == 1:
            return self.tables(positions[0], lengths[0], dtype)
        end = max(p + n for p, n in zip(positions, lengths, strict=True))
        if end > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], end))
        index = torch.cat([torch.arange(p, p + n) for p, n in zip(positions, lengths, strict=True)])
        return self.cos[index].to(dtype), self.sin[index].to(dtype)

    def half_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous float32 cos and sin [>= positions, head_dim / 2] (the halves are equal in the
        rotate-half layout): the tables ORT's GroupQueryAttention takes (`runtime.ort_attention`)."""
        if positions > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], positions))
        if self._half is None or self._half[0].shape[0] != self.cos.shape[0]:
            half = self.cos.shape[1] // 2
            self._half = (self.cos[:, :half].contiguous(), self.sin[:, :half].contiguous())
        return self._half

    def tables(self, position: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] for positions position .. position+length-1."""
        if position + length > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], position + length))
        end = position + length
        return self.cos[position:end].to(dtype), self.sin[position:end].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos + _rotate_half(x) * sin


class LayerKV:
    """One layer's keys and values for one sequence, preallocated in chunks so appends are cheap."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, chunk: int = 256) -> None:
        self.chunk = chunk
        self.length = 0
        self.k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype)
        self.v = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, length: int) -> None:
        """Room for `length` tokens (grown in chunks; the cached ones kept). The buffers are
        contiguous [n_kv, capacity, hd]: what `runtime.ort_attention` binds as GQA's KV cache."""
        if length > self.k.shape[1]:
            capacity = math.ceil(length / self.chunk) * self.chunk
            grown_k = self.k.new_empty(self.k.shape[0], capacity, self.k.shape[2])
            grown_v = self.v.new_empty(self.v.shape[0], capacity, self.v.shape[2])
            grown_k[:, : self.length] = self.k[:, : self.length]
            grown_v[:, : self.length] = self.v[:, : self.length]
            self.k, self.v = grown_k, grown_v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [n_kv, T, hd] keys/values; return views of everything cached so far."""
        new_length = self.length + k.shape[1]
        self.reserve(new_length)
        self.k[:, self.length : new_length] = k
        self.v[:, self.length : new_length] = v
        self.length = new_length
        return self.k[:, :new_length], self.v[:, :new_length]

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """The KV cache of one sequence (session) over all layers of one shard."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        self.layers = [LayerKV(n_kv_heads, head_dim, dtype) for _ in range(n_layers)]

    def layer(self, index: int) -> LayerKV:
        return self.layers[index]

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (used to resume after a failure or to roll back a speculative step)."""
        for layer in self.layers:
            layer.truncate(n)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Causal GQA attention of the T newest tokens: q [nq, T, hd], keys/values [nkv, S, hd] -> [nq, T, hd].

    The query heads of one KV group are stacked into one matrix ([nkv, g*T, hd]), so each KV head
    is read once and never repeated; token t (absolute S-T+t) sees keys 0 .. S-T+t. Written out
    instead of SDPA because SDPA's CPU kernel is slow on the strided views of a growing cache.
    With a `sliding_window` W it sees only the W newest of those (keys S-T+t-W+1 .. S-T+t, itself
    included: transformers' `kv_idx > q_idx - W`); keys no query can see are not multiplied at all.
    """
    n_q, T, hd = q.shape
    if sliding_window is not None and keys.shape[1] > sliding_window + T - 1:
        start = keys.shape[1] - (sliding_window + T - 1)
        keys, values = keys[:, start:], values[:, start:]
    n_kv, S, _ = keys.shape
    group = n_q // n_kv
    scores = q.reshape(n_kv, group * T, hd) @ keys.transpose(1, 2) * hd**-0.5
    if T > 1:
        hidden = torch.ones(T, S, dtype=torch.bool).triu(diagonal=S - T + 1)  # the future
        if sliding_window is not None:  # and what slid out of the window
            hidden |= torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T - sliding_window)
        scores = scores.masked_fill(hidden.repeat(group, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ values).reshape(n_q, T, hd)


def attention_shard(
    x_normed: torch.Tensor, matmuls: LayerMatmuls, kv: LayerKV, position: int, rotary: Rotary, head_dim: int,
    *, eps: float = 1e-6, sliding_window: int | None = None,
) -> torch.Tensor:
    """This shard's attention for one sequence: `batched_attention` with a single row."""
    return batched_attention(x_normed, matmuls, [kv], [position], [x_normed.shape[0]], rotary, head_dim,
                             eps=eps, sliding_window=sliding_window)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sliding_window: int | None,
            one_by_one: bool) -> torch.Tensor:
    """`grouped_attention` of q's T tokens, the newest of keys/values; with `one_by_one` each token
    alone against the keys up to itself: the very shapes, so the very sums, of a one-token decode
    at its position (what makes a verified speculative draft bitwise equal to decoding it)."""
    T = q.shape[1]
    if not one_by_one or T == 1:
        return grouped_attention(q, keys, values, sliding_window)
    S = keys.shape[1]
    return torch.cat([grouped_attention(q[:, t : t + 1].contiguous(), keys[:, : S - T + t + 1],
                                        values[:, : S - T + t + 1], sliding_window) for t in range(T)], dim=1)


def batched_attention(
    x_normed: torch.Tensor, matmuls: LayerMatmuls, caches: Sequence[LayerKV], positions: Sequence[int],
    lengths: Sequence[int], rotary: Rotary, head_dim: int, *, eps: float = 1e-6, sliding_window: int | None = None,
    token_invariant: bool = False,
) -> torch.Tensor:
    """This shard's KV-head groups of one attention layer: x_normed [T, H] -> partial output [T, H].

    The T tokens are rows of several sequences stacked (row r: `lengths[r]` tokens starting at
    `positions[r]`, attending to `caches[r]`; see `runtime.batch`). The projections, q/k norms and
    RoPE run once over all T tokens; only the cache append and the attention itself are per row.
    The shard holds `wq [nq*hd, H]`, `wk/wv [nkv*hd, H]` (query heads follow their KV head) and
    `wo [H, nq*hd]`, the matching columns of o_proj, so the output is this shard's share of the sum.
    Causal over the cache: token t (absolute position+t) sees cached tokens and new ones up to itself
    (only the `sliding_window` newest of them when set). The projections come from `matmuls`
    (`runtime.layer_compute`), whatever their precision; when the shard has Qwen3's per-head q/k
    RMSNorms (`matmuls.qk_norms`), they are applied to every head before RoPE, with `eps`.
    With `token_invariant`, a row that continues a cached sequence (position > 0) attends token
    by token (`_attend`): a few times slower per token, so prefills from position 0 keep the
    batched kernel; with row-invariant matmuls a token's output then does not depend on how many
    tokens of its sequence share the pass.
    """
    T, hidden = x_normed.shape
    n_q, n_kv = matmuls.n_q_rows // head_dim, matmuls.n_kv_rows // head_dim
    if n_kv == 0:
        return x_normed.new_zeros(T, hidden)
    fused = getattr(matmuls, "fused_attention", None)
    if fused is not None:  # the whole attention in one ORT call (runtime.ort_attention)
        if sliding_window is not None or token_invariant:
            raise ValueError("a fused attention shard runs neither a sliding window nor token-invariant attention")
        return fused.rows(x_normed, caches, positions, lengths, rotary)
    qkv = matmuls.qkv(x_normed)  # [T, (n_q + 2 n_kv) * head_dim]: q, k and v heads side by side
    qk = qkv[:, : (n_q + n_kv) * head_dim].reshape(T, n_q + n_kv, head_dim)
    qk_norms = getattr(matmuls, "qk_norms", None)
    if qk_norms is not None:  # Qwen3: q heads take one weight, k heads the other
        weight = torch.cat((qk_norms[0].expand(n_q, head_dim), qk_norms[1].expand(n_kv, head_dim))).to(qk.dtype)
        qk = rms_norm(qk, weight, eps)
    v = qkv[:, (n_q + n_kv) * head_dim :].reshape(T, n_kv, head_dim).transpose(0, 1)
    cos, sin = rotary.rows(positions, lengths, qkv.dtype)
    qk = apply_rope(qk.transpose(0, 1), cos, sin)  # q and k heads of every token rotated in one go
    if len(caches) == 1:
        keys, values = caches[0].append(qk[n_q:], v)
        out = _attend(qk[:n_q], keys, values, sliding_window, token_invariant and positions[0] > 0)
    else:
        parts, start = [], 0
        for kv, position, length in zip(caches, positions, lengths, strict=True):
            end = start + length
            keys, values = kv.append(qk[n_q:, start:end], v[:, start:end])
            parts.append(_attend(qk[:n_q, start:end], keys, values, sliding_window, token_invariant and position > 0))
            start = end
        out = torch.cat(parts, dim=1)
    return matmuls.out(out.transpose(0, 1).reshape(T, n_q * head_dim))


def mlp_shard(x_normed: torch.Tensor, matmuls: LayerMatmuls) -> torch.Tensor:
    """SwiGLU on this shard's intermediate columns: x_normed [T, H] -> partial [T, H]."""
    return matmuls.mlp(x_normed)


def decoder_layer(
    x: torch.Tensor, matmuls: LayerMatmuls, norms: LayerNorms, eps: float,
    attend: Callable[[torch.Tensor, LayerMatmuls], torch.Tensor],
) -> torch.Tensor:
    """One whole decoder layer where every head and column is held: norm, attention (`attend`:
    normed state, matmuls -> attention output, so callers bring their own KV cache), o_proj bias,
    residual; norm, MLP, residual."""
    x = x + attend(rms_norm(x, norms.input_norm, eps), matmuls)
    if norms.o_bias is not None:
        x = x + norms.o_bias
    return x + mlp_shard(rms_norm(x, norms.post_attention_norm, eps), matmuls)


def full_layer_weights(get: Callable[[str], torch.Tensor], names: set[str], layer: int) -> dict[str, torch.Tensor]:
    """All heads and columns of one HF-named layer under the shard key names (= a single shard)."""
    prefix = f"model.layers.{layer}."
    keys = {
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
        "q_norm": "self_attn.q_norm.weight",
        "k_norm": "self_attn.k_norm.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    return {short: get(prefix + name) for short, name in keys.items() if prefix + name in names}


@dataclass
class LayerNorms:
    """What the coordinator keeps per layer: the two norms and an optional o_proj bias."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    o_bias: torch.Tensor | None = None


class LlamaModel:
    """The whole model in one process, built from the shard kernels with one shard holding everything.

    `get(name)` returns an HF-named tensor (a `Checkpoint.tensor`); `names` lists what exists.
    """

    def __init__(
        self, config: LlamaShape, get: Callable[[str], torch.Tensor], names: set[str], dtype: torch.dtype = torch.float32
    ) -> None:
        self.config, self.dtype = config, dtype
        self.embed = get("model.embed_tokens.weight").to(dtype)
        self.lm_head = self.embed if "lm_head.weight" not in names else get("lm_head.weight").to(dtype)
        self.final_norm = get("model.norm.weight").to(dtype)
        self.layers = [FloatMatmuls(full_layer_weights(get, names, i), dtype) for i in range(config.num_layers)]
        self.norms = [
            LayerNorms(
                get(f"model.layers.{i}.input_layernorm.weight").to(dtype),
                get(f"model.layers.{i}.post_attention_layernorm.weight").to(dtype),
                get(f"model.layers.{i}.self_attn.o_proj.bias").to(dtype)
                if f"model.layers.{i}.self_attn.o_proj.bias" in names
                else None,
            )
            for i in range(config.num_layers)
        ]
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling,
                             getattr(config, "rope_freq_factors", None))

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(self, token_ids: list[int] | torch.Tensor, cache: KVCache, position: int) -> torch.Tensor:
        """Logits [T, vocab] of the tokens placed at `position` (the cache must hold exactly `position` tokens)."""
        return self.forward_rows(token_ids, [cache], [position], [len(token_ids)], last_only=False)

    @torch.inference_mode()
    def forward_rows(
        self, token_ids: list[int] | torch.Tensor, caches: Sequence[KVCache], positions: Sequence[int],
        lengths: Sequence[int], last_only: bool = True,
    ) -> torch.Tensor:
        """A batched step (rows as in `batched_attention`): the next-token logits of every row
        [rows, vocab], or of every token [T, vocab] without `last_only`."""
        cfg = self.config
        x = self.embed[torch.as_tensor(token_ids, dtype=torch.long)]
        for i, (weights, norms) in enumerate(zip(self.layers, self.norms, strict=True)):

            def attend(h: torch.Tensor, w: LayerMatmuls, i: int = i) -> torch.Tensor:
                return batched_attention(h, w, [c.layer(i) for c in caches], positions, lengths, self.rotary,
                                         cfg.head_dim, eps=cfg.rms_norm_eps,
                                         sliding_window=getattr(cfg, "sliding_window", None))

            x = decoder_layer(x, weights, norms, cfg.rms_norm_eps, attend)
        if last_only:
            x = x[torch.as_tensor(lengths).cumsum(0) - 1]
        return F.linear(rms_norm(x, self.final_norm, cfg.rms_norm_eps), self.lm_head).float()

    def generate(
        self, prompt_ids: list[int], max_tokens: int, choose: Callable[[torch.Tensor], int], stop: set[int] = frozenset()
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (token, logits of the position that chose it) until max_tokens or a stop token."""
        cache = self.new_cache()
        logits = self.forward(prompt_ids, cache, 0)[-1]
        position = len(prompt_ids)
        for _ in range(max_tokens):
            token = choose(logits)
            yield token, logits
            if token in stop:
                return
            logits = self.forward([token], cache, position)[-1]
            position += 1
