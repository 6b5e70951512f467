"""The matmuls of one decoder layer's shard, behind one small interface whatever the precision.

`runtime.llama`'s kernels (attention over the KV cache, RoPE, norms, residuals) are one code path
for every precision; only the projections depend on how the weights are stored. A shard's
tensors become a `LayerMatmuls` with three calls, grouped so that a quantized backend runs each
group as ONE kernel launch (call overhead counts: 7 projections per layer, 30+ layers per token):

    qkv(x)   -> [q | k | v] the attention input projections (+ their biases), side by side in one
                           tensor [T, q rows + 2 x kv rows], so RoPE can rotate q and k in one go
    out(a)   -> o_proj(a)  this shard's columns of the output projection
    mlp(x)   -> down(silu(gate(x)) * up(x))

The shard's other per-head tensors (Qwen3's q/k RMSNorm weights) are no matmuls: each backend
only keeps them, as `qk_norms` (see `qk_norm_weights`), for the attention kernel.

`FloatMatmuls` is the float32 reference (plain `F.linear`); `runtime.ort_quantized` runs
block-quantized weights on ONNX Runtime's MatMulNBits, `runtime.torch_quantized` on torch's
int4/int8 weight-only kernels. `build_matmuls` picks one by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from edgeweave.runtime.quantized import QuantizationError, is_quantized

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
BIASES = ("bq", "bk", "bv")
#: Qwen3's per-head RMSNorm weights of q and k ([head_dim] each, full in every shard with KV heads): not matmuls,
#: so every backend keeps them as float tensors in `qk_norms` for `runtime.llama.attention_shard`
QK_NORMS = ("q_norm", "k_norm")
#: the matmul backends a node can run quantized shards with; the first is the default
BACKENDS = ("ort", "torch")


class LayerMatmuls(Protocol):
    """One shard's projections of one layer (see the module docstring)."""

    n_q_rows: int  # rows of wq (= this shard's query heads x head_dim)
    n_kv_rows: int
    n_columns: int  # MLP intermediate columns
    in_features: int  # the hidden size
    nbytes: int  # weight bytes held
    qk_norms: tuple[torch.Tensor, torch.Tensor] | None  # Qwen3's q/k RMSNorm weights (see `qk_norm_weights`)

    def qkv(self, x: torch.Tensor) -> torch.Tensor: ...

    def out(self, attn: torch.Tensor) -> torch.Tensor: ...

    def mlp(self, x: torch.Tensor) -> torch.Tensor: ...


def projection_rows(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    """Output rows of a projection, quantized or float."""
    return int(tensors[f"{name}.q"].shape[0]) if is_quantized(tensors, name) else int(tensors[name].shape[0])


def _in_features(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    if is_quantized(tensors, name):
        return int(tensors[f"{name}.layout"][2])
    return int(tensors[name].shape[1])


def shard_dimensions(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(wq rows, wk rows, MLP columns, hidden) of a layer shard, quantized or not."""
    for name in PROJECTIONS:
        if name not in tensors and not is_quantized(tensors, name):
            raise QuantizationError(f"the layer shard has no {name!r} weight")
    return projection_rows(tensors, "wq"), projection_rows(tensors, "wk"), projection_rows(tensors, "w_gate"), _in_features(tensors, "wq")


def qk_norm_weights(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shard's (q_norm, k_norm) weights in `dtype`, or None when it has none (all but Qwen3)."""
    if not any(name in tensors for name in QK_NORMS):
        return None
    missing = [name for name in QK_NORMS if name not in tensors]
    if missing:
        raise QuantizationError(f"the layer shard has one of the q/k norms but no {missing[0]!r}")
    q_norm, k_norm = (tensors[name].to(dtype) for name in QK_NORMS)
    return q_norm, k_norm


class FloatMatmuls:
    """The float reference: `F.linear` over float tensors, cast once to the compute dtype."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        self.w = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in tensors.items()}
        self.n_q_rows, self.n_kv_rows, self.n_columns, self.in_features = shard_dimensions(self.w)
        self.nbytes = sum(v.numel() * v.element_size() for v in self.w.values())
        self.qk_norms = qk_norm_weights(self.w, dtype)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return torch.cat((F.linear(x, w["wq"], w.get("bq")), F.linear(x, w["wk"], w.get("bk")),
                          F.linear(x, w["wv"], w.get("bv"))), dim=-1)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        return F.linear(attn, self.w["wo"])

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_columns == 0:
            return torch.zeros_like(x)
        w = self.w
        return F.linear(F.silu(F.linear(x, w["w_gate"])) * F.linear(x, w["w_up"]), w["w_down"])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's ops with `n` intra-op threads, then restore the count (cheap: ~0.1 us a switch).

    Where ONNX Runtime's pool runs the matmuls, torch only does the small glue between them (RoPE,
    attention over one token, norms); torch's OpenMP threads spinning there next to ORT's on the
    same cores made a SmolLM2 layer loop 5x slower (72 vs 13 ms/token on 2 cores)."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def has_quantized(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(is_quantized(tensors, name) for name in PROJECTIONS)


def at_least_two_rows(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`matmul(x)`, with a one-row x run as two identical rows (and the first row kept).

    Why: the kernels have a separate one-row (GEMV) path that sums in another order than their
    many-row path (measured on MatMulNBits: 1e-7 relative; rows of an M >= 2 call are bitwise the
    same whatever M and whatever their place). The 4-bit kernels then round activations to int8, a
    step function, so that tiny difference can flip a rounding and, 30 layers on, a greedy token.
    Never taking the one-row path makes a sequence's numbers independent of what it is batched with."""
    if x.shape[0] != 1:
        return matmul(x)
    return matmul(x.expand(2, -1))[:1]


#: torch's float32 CPU GEMM picks its kernel (and so how a row's sums are ordered) by the row
#: count, and where it switches depends on the CPU and the matrix: torch 2.13's MKL took 1 | 2-3 |
#: 4+ rows on AVX2 (with 2+ threads also splitting tail rows by count), and 1 | 2-15 | 16+ rows for
#: 576 x 1536 but 1 | 2-4 | 5+ for 64 x 96 on AVX-512. Every call of exactly this many rows is the one
#: thing every BLAS keeps invariant: a row's bits then never depend on the batch it came in.
FLOAT_ROW_BLOCK = 4


def in_row_blocks(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  block: int = FLOAT_ROW_BLOCK) -> torch.Tensor:
    """`matmul(x)` as calls of exactly `block` rows (the last padded by repeating x's last row): the
    float counterpart of `at_least_two_rows`. A lone float decode row then costs a 4-row GEMM
    instead of a GEMV (2.7x the time of a 576 x 1536 projection on one thread, against 1.9x for 2
    rows); a long prompt costs rows / 4 calls (~3x one big GEMM's time on a float model)."""
    rows = x.shape[0]
    pad = -rows % block
    if pad:
        x = torch.cat((x, x[-1:].expand(pad, -1)))
    if x.shape[0] == block:
        return matmul(x)[:rows]
    return torch.cat([matmul(part) for part in x.split(block)])[:rows]


class BatchInvariantMatmuls:
    """`LayerMatmuls` whose results for a row do not depend on the other rows of the batch
    (`at_least_two_rows` for quantized kernels, `in_row_blocks` for float ones): what a server
    batching many users needs, so a request's greedy answer is the same under load as alone, and
    what lets speculative decoding verify a draft with exactly the numbers of decoding it. About
    5% more matmul time for a lone quantized decode row."""

    def __init__(self, inner: LayerMatmuls) -> None:
        self.inner = inner
        self._rows = in_row_blocks if isinstance(inner, FloatMatmuls) else at_least_two_rows

    def __getattr__(self, name: str):  # n_q_rows, n_kv_rows, qk_norms, nbytes, ... of the wrapped matmuls
        return getattr(self.inner, name)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(self.inner.qkv, x)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        return self._rows(self.inner.out, attn)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(self.inner.mlp, x)


def config_allows_fusion(dtype: torch.dtype, sliding_window: int | None, token_invariant: bool) -> bool:
    """Whether an executor of this configuration may run its shards' attention fused
    (`runtime.ort_attention`): float32, no sliding window, no token-by-token verification."""
    return dtype == torch.float32 and sliding_window is None and not token_invariant


def matmuls_factory(backend: str = "ort", threads: int = 1, dtype: torch.dtype = torch.float32,
                    batch_invariant: bool = False, fused_head_dim: int | None = None,
                    ) -> Callable[[Mapping[str, torch.Tensor]], LayerMatmuls]:
    """A function from a layer shard's tensors to its `LayerMatmuls`: float tensors take the float
    path, quantized ones the named backend (ValueError for an unknown one); `batch_invariant`
    wraps them in `BatchInvariantMatmuls`. `fused_head_dim`: quantized shards on "ort" run their
    attention as one call where they can (`runtime.ort_attention`; the caller checks that its
    configuration allows it: `config_allows_fusion`). A fused attention runs each row of a batch
    alone, so it is batch-invariant as it is."""
    if backend not in BACKENDS:
        raise ValueError(f"matmul backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if batch_invariant:
        plain = matmuls_factory(backend, threads, dtype, fused_head_dim=fused_head_dim)
        return lambda tensors: BatchInvariantMatmuls(plain(tensors))

    def build(tensors: Mapping[str, torch.Tensor]) -> LayerMatmuls:
        if not has_quantized(tensors):
            return FloatMatmuls(tensors, dtype)
        matmuls: LayerMatmuls
        if backend == "torch":
            from edgeweave.runtime.torch_quantized import TorchQuantizedMatmuls

            matmuls = TorchQuantizedMatmuls(tensors)
        else:
            from edgeweave.runtime.ort_quantized import OrtQuantizedMatmuls

            matmuls = OrtQuantizedMatmuls(tensors, threads=threads, fused_head_dim=fused_head_dim)
        matmuls.qk_norms = qk_norm_weights(tensors)  # float32: what both quantized backends return
        return matmuls

    return build
