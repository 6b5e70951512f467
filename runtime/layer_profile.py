"""Time one decoder layer of a given shape on this machine, through the node's own executor.

Why: the layout planner (`splitting.layout_planner`) decides between tensor, pipeline and
1-node layouts from seconds per layer per node, and a matmul GFLOP/s figure does not say what a
layer costs (attention over a KV cache, quantized kernels, the glue between them, per-call
overhead). So a node builds ONE layer of the model's shape with random weights in the layout the
plan would ship (float or block-quantized, `runtime.quantized`), writes it as a shard file, loads
it with `runtime.tp_executor.TensorParallelExecutor` (the kernels, thread settings and ORT
external-data path of a real job: no second implementation) as the layers of a small model: a
ring of copies whose weights overflow the CPU caches (`ring_size`), since a model's decode step
streams every layer's weights from memory and one layer timed over and over would not. It times:

    decode   op "layers", one token at position `kv_tokens` (a KV cache of that length) through
             the ring, then truncated back; divided by the ring's length
    prefill  op "layers", `prompt_tokens` tokens of a fresh session through one layer, then reset
    attn/mlp the tensor-parallel ops for one token, each call on the ring's next layer, on the
             whole layer and on its smallest shard (`floor_shape`)

Timing is sustained throughput, not a best case: each figure is the median over a few batches of
(batch wall time / runs), every batch running back to back for a slice of the budget long enough
to span CPU-quota periods (a cgroup cpu.max node runs full speed for part of every 100 ms period).
Everything it made (file, executor, KV caches) is released before it returns.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from edgeweave.runtime import cpu_dilation
from edgeweave.runtime.executor import ExecutorInputError
from edgeweave.runtime.layer_compute import BACKENDS, PROJECTIONS
from edgeweave.runtime.layer_store import return_freed_memory
from edgeweave.runtime.memory_budget import format_bytes, held_layer_bytes
from edgeweave.runtime.quantized import BlockQuantized, QuantizationError, to_shard_tensors
from edgeweave.runtime.safetensors_write import save_safetensors

#: projection kinds as the plan names them (`splitting.tensor_parallel.PROJECTION_KINDS`) -> shard keys
PROJECTION_KEYS = dict(zip(("q", "k", "v", "o", "gate", "up", "down"), PROJECTIONS, strict=True))
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT_TOKENS = 128
MAX_PROMPT_TOKENS = 8192
MAX_KV_TOKENS = 32768
#: the largest dimensions a request may ask for (well above any Llama-family model's)
MAX_HIDDEN, MAX_INTERMEDIATE, MAX_HEADS, MAX_HEAD_DIM = 32768, 131072, 1024, 512
#: a profile may allocate at most this share of the memory available now
MAX_MEMORY_SHARE = 0.5
#: batches per figure: the median of 3 ignores one disturbed batch
BATCHES = 3
#: the timing proper gets at least this share of the budget, however long building took
MIN_TIMING_SHARE = 0.25
#: shards one profile may time besides the whole layer and its floor
MAX_SHARDS = 8
#: MLP columns of the smallest shard timed (a quantization block, `splitting.quant_plan.CUT_ALIGNMENT`)
FLOOR_COLUMNS = 32
#: a ring of layer copies holds more than the last-level cache (RING_OVER_CACHE times it, or
#: RING_BYTES when it cannot be read), in at most MAX_RING copies: cycling through more than the
#: cache misses it every time, and each copy costs its build (about 40 ms for SmolLM2's on ORT)
RING_OVER_CACHE = 1.25
RING_BYTES = 40 << 20
MAX_RING = 8
_CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


class LayerShapeError(ExecutorInputError):
    """A layer shape or timing request that cannot be built or run; the node answers INVALID_ARGUMENT."""


@dataclass(frozen=True)
class ProjectionLayout:
    """How one projection is stored: float (bits None) or `bits`-bit blocks of `block` (+ offsets)."""

    bits: int | None = None
    block: int = 32
    offset: bool = False


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's dimensions and the storage of its projections (by plan kind q .. down)."""

    hidden: int
    intermediate: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    projections: tuple[tuple[str, ProjectionLayout], ...] = ()  # missing kinds are float
    attention_bias: bool = False
    qk_norm: bool = False
    float_dtype: str = "float32"  # of float tensors in the shard file

    def layout(self, kind: str) -> ProjectionLayout:
        return dict(self.projections).get(kind, ProjectionLayout())

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every projection, by plan kind."""
        q, kv, h, m = self.n_q_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (m, h), "up": (m, h), "down": (h, m)}

    def float32_bytes(self) -> int:
        """The layer's bytes were it all float32: a bound on what building it allocates."""
        return 4 * sum(r * c for r, c in self.projection_shapes().values())

    def check(self) -> LayerShape:
        """This shape, or LayerShapeError with one sentence saying what is wrong."""
        dims = {"hidden": (self.hidden, MAX_HIDDEN), "intermediate": (self.intermediate, MAX_INTERMEDIATE),
                "n_q_heads": (self.n_q_heads, MAX_HEADS), "n_kv_heads": (self.n_kv_heads, MAX_HEADS),
                "head_dim": (self.head_dim, MAX_HEAD_DIM)}
        for name, (value, most) in dims.items():
            if not 1 <= value <= most:
                raise LayerShapeError(f"layer shape {name} must be between 1 and {most}, not {value}")
        if self.n_q_heads % self.n_kv_heads:
            raise LayerShapeError(f"n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise LayerShapeError(f"head_dim must be even (RoPE rotates pairs), not {self.head_dim}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise LayerShapeError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, not {self.float_dtype!r}")
        shapes = self.projection_shapes()
        for kind, layout in self.projections:
            if kind not in shapes:
                raise LayerShapeError(f"unknown projection {kind!r}; the kinds are {', '.join(shapes)}")
            if layout.bits is None:
                continue
            if layout.bits not in (4, 8):
                raise LayerShapeError(f"projection {kind}: bits must be 4 or 8 (0 = float), not {layout.bits}")
            columns = shapes[kind][1]
            if layout.block < 16 or layout.block & (layout.block - 1) or columns % layout.block:
                raise LayerShapeError(f"projection {kind}: block {layout.block} must be a power of two >= 16 "
                                      f"that divides its {columns} input columns")
        return self


@dataclass(frozen=True)
class LayerTiming:
    """What `profile_layer` measured: seconds per whole layer, and what the layer costs in memory."""

    decode_s: float  # one token against a KV cache of `kv_tokens`
    prefill_s: float  # `prompt_tokens` tokens at once (the whole prompt, not per token)
    prompt_tokens: int
    kv_tokens: int
    file_bytes: int  # the shard file of the whole layer
    held_bytes: int  # what the node holds for it resident (`memory_budget.held_layer_bytes`)
    kernel: str  # "float", or the quantized backend ("ort", "torch")
    decode_runs: int  # layers run for the decode figure
    prefill_runs: int
    elapsed_s: float  # the whole profile, building included
    attn_decode_s: float  # op "attn", one token, every head
    mlp_decode_s: float  # op "mlp", one token, every column
    shard_attn_decode_s: float  # op "attn" of one KV-head group (`floor_shape`)
    shard_mlp_decode_s: float  # op "mlp" of `shard_mlp_columns` columns
    shard_mlp_columns: int
    ring: int  # copies of the layer timed in turn (`ring_size`)
    threads: int = field(default_factory=torch.get_num_threads)
    shards: tuple[ShardTiming, ...] = ()  # the shares asked for, in order


@dataclass(frozen=True)
class ShardTiming:
    """The tensor-parallel ops for one token on one rank's share of the layer, timed on a ring of
    that shard's copies (past the CPU caches, as a node's own shards run); 0 for an op it has no share of."""

    n_kv_heads: int
    mlp_columns: int
    attn_decode_s: float
    mlp_decode_s: float


def sustained_seconds(run: Callable[[], None], seconds: float, batches: int = BATCHES) -> tuple[float, int]:
    """(median over batches of batch wall time / calls, calls made): each batch calls `run` back to
    back until it has lasted seconds / batches (at least one call), so quota stalls land in the figure.
    A run too slow for that many batches in `seconds` gets fewer (at least one), so that a big
    layer's prefill keeps to the budget instead of taking `batches` runs whatever they cost. An
    emulated slower device (runtime/cpu_dilation.py) times the batch as that device would."""
    per_batch = max(seconds, 0.0) / batches
    figures: list[float] = []
    calls, spent = 0, 0.0
    while len(figures) < batches and (not figures or spent + per_batch <= seconds or spent + figures[-1] <= seconds):
        clock = cpu_dilation.DeviceClock()
        n = 0
        while True:
            run()
            n += 1
            elapsed = clock.elapsed()
            if elapsed >= per_batch:
                break
        figures.append(elapsed / n)
        calls += n
        spent += elapsed
    return statistics.median(figures), calls


def random_block_quantized(rows: int, columns: int, layout: ProjectionLayout, rng: np.random.Generator) -> BlockQuantized:
    """Random [rows, columns] weights in `layout`'s blocks (values do not matter to a timing, shapes do)."""
    levels = 1 << int(layout.bits or 8)
    blocks = (rows, columns // layout.block)
    q = rng.integers(0, levels, size=(rows, columns), dtype=np.uint8)
    scale = np.full(blocks, 0.04 / levels, dtype=np.float32)
    zero = np.full(blocks, levels // 2, dtype=np.uint8)
    offset = rng.standard_normal(blocks, dtype=np.float32) * 0.001 if layout.offset else None
    return BlockQuantized(q, scale, zero, offset, int(layout.bits or 8), layout.block)


def synthetic_layer(shape: LayerShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """A layer shard holding every head and column of `shape`, random weights, in its layouts."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    dtype = FLOAT_DTYPES[shape.float_dtype]
    out: dict[str, torch.Tensor] = {}
    for kind, (rows, columns) in shape.projection_shapes().items():
        key, layout = PROJECTION_KEYS[kind], shape.layout(kind)
        if layout.bits is None:
            out[key] = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
        else:
            try:
                out.update(to_shard_tensors(key, random_block_quantized(rows, columns, layout, rng)))
            except QuantizationError as exc:
                raise LayerShapeError(f"projection {kind}: {exc}") from None
    q_rows, kv_rows = shape.n_q_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    if shape.attention_bias:
        out.update(bq=torch.zeros(q_rows, dtype=dtype), bk=torch.zeros(kv_rows, dtype=dtype),
                   bv=torch.zeros(kv_rows, dtype=dtype))
    if shape.qk_norm:
        out.update(q_norm=torch.ones(shape.head_dim, dtype=dtype), k_norm=torch.ones(shape.head_dim, dtype=dtype))
    return out


def check_request(shape: LayerShape, backend: str, prompt_tokens: int, kv_tokens: int) -> None:
    """LayerShapeError when the shape, backend or token counts cannot be profiled here."""
    shape.check()
    if backend not in BACKENDS:
        raise LayerShapeError(f"matmul backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if not 1 <= prompt_tokens <= MAX_PROMPT_TOKENS:
        raise LayerShapeError(f"prompt_tokens must be between 1 and {MAX_PROMPT_TOKENS}, not {prompt_tokens}")
    if not 0 <= kv_tokens <= MAX_KV_TOKENS:
        raise LayerShapeError(f"kv_tokens must be between 0 and {MAX_KV_TOKENS}, not {kv_tokens}")
    kv_bytes = 8 * shape.n_kv_heads * shape.head_dim * (kv_tokens + prompt_tokens) * MAX_RING
    need = shape.float32_bytes() * 2 + RING_BYTES + kv_bytes
    allowed = int(psutil.virtual_memory().available * MAX_MEMORY_SHARE)
    if need > allowed:
        raise LayerShapeError(f"profiling a layer of this shape may take {format_bytes(need)}, more than the "
                              f"{format_bytes(allowed)} this node lets a profile use (half its available memory)")


def shard_shape(shape: LayerShape, n_kv_heads: int, mlp_columns: int) -> LayerShape:
    """The shard of `shape` holding `n_kv_heads` KV-head groups and `mlp_columns` MLP columns (a
    share of 0 still builds one group or one column block, which is then not timed), or
    LayerShapeError when the layer has no such shard."""
    if not (0 <= n_kv_heads <= shape.n_kv_heads and 0 <= mlp_columns <= shape.intermediate
            and n_kv_heads + mlp_columns > 0):
        raise LayerShapeError(f"a shard of {n_kv_heads} KV heads and {mlp_columns} MLP columns is not a share of a "
                              f"layer with {shape.n_kv_heads} KV heads and {shape.intermediate} columns")
    floor = floor_shape(shape)
    heads = n_kv_heads or 1
    return replace(shape, n_kv_heads=heads, n_q_heads=shape.n_q_heads // shape.n_kv_heads * heads,
                   intermediate=mlp_columns or floor.intermediate).check()


def floor_shape(shape: LayerShape) -> LayerShape:
    """The smallest shard of `shape` a node can get: one KV-head group and one column block of the
    MLP. Its op times are the fixed part of a shard's (what does not shrink with the share)."""
    blocks = [shape.layout(k).block for k in ("gate", "up", "down") if shape.layout(k).bits is not None]
    columns = min(shape.intermediate, max([FLOOR_COLUMNS, *blocks]))
    return replace(shape, n_kv_heads=1, n_q_heads=shape.n_q_heads // shape.n_kv_heads, intermediate=columns)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of this machine (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for index in _CPU_CACHES.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=None)


def ring_size(held_bytes: int) -> int:
    """Copies of the layer timed in turn: enough that their weights overflow the CPU caches, as a
    model's layers do (one layer timed over and over would run from cache: SmolLM2's 5 MB fit an L3)."""
    cache = last_level_cache_bytes()
    ring_bytes = RING_OVER_CACHE * cache if cache else RING_BYTES
    return max(1, min(MAX_RING, math.ceil(ring_bytes / max(held_bytes, 1))))


class _Bench:
    """A ring of copies of one synthetic layer of `shape`, loaded by the node's executor (as the
    layers of one model), and the calls that are timed."""

    def __init__(self, shape: LayerShape, backend: str, kv: int, prompt_tokens: int, folder: Path,
                 ring: bool = True) -> None:
        from edgeweave.runtime.tp_executor import TensorParallelExecutor

        folder.mkdir()
        layer, norms = folder / "layer.safetensors", folder / "norms.safetensors"
        save_safetensors(synthetic_layer(shape), layer)
        self.file_bytes = layer.stat().st_size
        self.kernel = backend if any(lay.bits is not None for _, lay in shape.projections) else "float"
        self.held_bytes = held_layer_bytes([self.file_bytes], self.kernel)[0][0]
        self.ring = ring_size(self.held_bytes) if ring else 1
        ones = torch.ones(shape.hidden)
        save_safetensors({f"{kind}.{i}": ones for i in range(self.ring) for kind in ("input_norm", "post_norm")}, norms)
        names = [f"layer.{i:03d}" for i in range(self.ring)]
        model = {"hidden_size": shape.hidden, "num_layers": self.ring, "head_dim": shape.head_dim,
                 "rope_theta": 10000.0, "num_kv_heads": shape.n_kv_heads, "intermediate_size": shape.intermediate,
                 "max_position_embeddings": max(kv + 1, prompt_tokens)}
        config = {"model": model, "n_layers": self.ring, "layer_files": names, "window": None, "dtype": "float32",
                  "backend": backend}
        self.executor = TensorParallelExecutor(config, {**dict.fromkeys(names, layer), "norms": norms})
        self.kv, self.turn = kv, 0
        generator = torch.Generator().manual_seed(1)
        self.one = torch.randn(1, shape.hidden, generator=generator)
        self.prompt = torch.randn(prompt_tokens, shape.hidden, generator=generator)
        self.forward = self.executor.forward
        if kv:  # the decode sessions' caches, and a warm-up of the prefill path
            cache = torch.randn(kv, shape.hidden, generator=generator)
            self.forward("layers", 0, 0, "decode", [cache])
            for i in range(self.ring):
                self.forward("attn", i, 0, "attn", [cache])
        else:
            self.prefill()
        self.decode()
        self.attn()
        self.mlp()

    def decode(self) -> None:
        """op "layers" for one token against the KV cache (norms, attention, MLP, residuals), every
        layer of the ring: a call is `ring` layers."""
        self.forward("layers", 0, self.kv, "decode", [self.one])
        self.forward("truncate", 0, self.kv, "decode", [])

    def prefill(self) -> None:
        """The prompt through the ring's last layer only (compute-bound: the caches do not matter)."""
        self.forward("layers", self.ring - 1, 0, "prefill", [self.prompt])
        self.forward("reset", 0, 0, "prefill", [])

    def _next(self) -> int:
        self.turn = (self.turn + 1) % self.ring
        return self.turn

    def attn(self) -> None:
        """op "attn" for one token on the next layer of the ring: what a tensor-parallel rank computes for its heads."""
        self.forward("attn", self._next(), self.kv, "attn", [self.one])
        self.forward("truncate", 0, self.kv, "attn", [])

    def mlp(self) -> None:
        self.forward("mlp", self._next(), 0, "", [self.one])

    def close(self) -> None:
        self.executor.close()


def profile_layer(shape: LayerShape, backend: str = "ort", prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                  kv_tokens: int | None = None, budget_s: float = 1.0, work_dir: Path | None = None,
                  shards: Sequence[tuple[int, int]] = ()) -> LayerTiming:
    """Seconds of one whole layer of `shape` on this machine (module docstring), decode and
    prefill, and of the tensor-parallel ops "attn" and "mlp" for one token on the whole layer and
    on its smallest shard (`floor_shape`), within about `budget_s` (building counts against it;
    each figure gets at least one run). `kv_tokens` defaults to `prompt_tokens`: the first decode
    step after such a prompt. `shards`: (KV heads, MLP columns) of shares whose ops to time too,
    each on a ring of its own copies, built and freed one after another; each adds about a tenth of
    `budget_s` of timing to its building."""
    kv = prompt_tokens if kv_tokens is None else kv_tokens
    check_request(shape, backend, prompt_tokens, kv)
    if len(shards) > MAX_SHARDS:
        raise LayerShapeError(f"a profile times at most {MAX_SHARDS} shards, not {len(shards)}")
    shard_shapes = [shard_shape(shape, heads, columns) for heads, columns in shards]  # all checked before any work
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=".layer-profile-", dir=work_dir))
    benches: list[_Bench] = []
    try:
        benches.append(_Bench(shape, backend, kv, prompt_tokens, folder / "whole"))
        # the smallest shard is mostly fixed cost (kernel calls, glue): one copy, not a ring
        benches.append(_Bench(floor_shape(shape), backend, kv, prompt_tokens, folder / "floor", ring=False))
        whole, floor = benches
        # what building left of the budget, but never less than a quarter of it for the timing itself
        left = max(budget_s - (time.perf_counter() - start), budget_s * MIN_TIMING_SHARE)
        prefill_s, prefill_runs = sustained_seconds(whole.prefill, left * 0.3)
        ring_s, decode_runs = sustained_seconds(whole.decode, left * 0.3)
        ops = [sustained_seconds(run, left * 0.1)[0] for run in (whole.attn, whole.mlp, floor.attn, floor.mlp)]
        ring, threads = whole.ring, whole.executor.threads
        for bench in benches:
            bench.close()
        benches.clear()
        timed = []
        for k, ((heads, columns), part) in enumerate(zip(shards, shard_shapes, strict=True)):
            bench = _Bench(part, backend, kv, prompt_tokens, folder / f"shard-{k}")
            benches.append(bench)
            timed.append(ShardTiming(heads, columns, sustained_seconds(bench.attn, budget_s * 0.05)[0] if heads else 0.0,
                                     sustained_seconds(bench.mlp, budget_s * 0.05)[0] if columns else 0.0))
            benches.pop().close()
        return LayerTiming(ring_s / whole.ring, prefill_s, prompt_tokens, kv, whole.file_bytes, whole.held_bytes,
                           whole.kernel, decode_runs * whole.ring, prefill_runs, time.perf_counter() - start, *ops,
                           floor_shape(shape).intermediate, ring, threads, tuple(timed))
    finally:
        for bench in benches:
            bench.close()
        benches.clear()
        shutil.rmtree(folder, ignore_errors=True)
        return_freed_memory(collect=True)
