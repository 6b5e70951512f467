"""The node side of tensor-parallel LLM inference: this node's heads and columns of every layer.

The coordinator sends the normed hidden state of one layer (`attn` or `mlp`); the executor
computes its shard with the kernels of `runtime.llama` and returns a partial sum, keeping its own
KV cache per session. Weights come from a layer store that may hold only a window of layers.

A node that holds the WHOLE model (a 1-node plan) also gets the layers' norms (the `norms` shard)
and answers `layers`: the embedded hidden state in, every layer with norms and residuals run
here, the last layer's output back. With one participant there is nothing to reduce, so one
message per step replaces 2 x layers round trips.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

from edgeweave.runtime.batch import Row, RowsError, check_rows
from edgeweave.runtime.codec import Quantized
from edgeweave.runtime.executor import Executor, ExecutorInputError, ExecutorStateError, TensorLike
from edgeweave.runtime.layer_compute import (
    BACKENDS,
    FloatMatmuls,
    LayerMatmuls,
    config_allows_fusion,
    matmuls_factory,
    torch_threads,
)
from edgeweave.runtime.layer_store import LayerStore, layer_file_sizes
from edgeweave.runtime.llama import KVCache, LayerNorms, Rotary, batched_attention, decoder_layer, mlp_shard
from edgeweave.runtime.memory_budget import (
    NODE_OVERHEAD_BYTES,
    MemoryBudgetError,
    choose_window,
    fit_context,
    held_layer_bytes,
    kv_cache_bytes,
)

_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED_MODEL_KEYS = ("hidden_size", "num_layers", "head_dim", "rope_theta")
MAX_SESSIONS = 64


class SessionLimitError(ExecutorStateError):
    """The node holds MAX_SESSIONS sessions: a refusal of this request (RESOURCE_EXHAUSTED), not a node failure."""


class TensorParallelExecutor(Executor):
    """kind "tp_llm": ops attn / mlp / reset / truncate over this node's shard of a Llama model."""

    kind = "tp_llm"

    def __init__(self, config: dict[str, Any], shards: dict[str, Path], memory_budget: int = 0,
                 file_checks: dict[str, int | None] | None = None) -> None:
        super().__init__(config, shards, memory_budget, file_checks)
        model = config.get("model")
        if not isinstance(model, dict) or any(k not in model for k in _REQUIRED_MODEL_KEYS):
            raise ExecutorInputError(f"tp_llm config needs a 'model' object with {', '.join(_REQUIRED_MODEL_KEYS)}")
        self.hidden_size = int(model["hidden_size"])
        self.head_dim = int(model["head_dim"])
        self.n_layers = int(config.get("n_layers", model["num_layers"]))
        #: the model's number of this node's first layer (a pipeline stage holds layers first..first+n_layers-1;
        #: messages name layers by their place in this node's range, 0..n_layers-1)
        self.first_layer = config.get("first_layer", 0)
        if not isinstance(self.first_layer, int) or not 0 <= self.first_layer <= int(model["num_layers"]) - self.n_layers:
            raise ExecutorInputError(f"tp_llm first_layer must be an integer in 0..{int(model['num_layers']) - self.n_layers}, "
                                     f"not {self.first_layer!r}")
        dtype_name = config.get("dtype") or "float32"
        if dtype_name not in _COMPUTE_DTYPES:
            raise ExecutorInputError(f"tp_llm dtype must be one of {', '.join(_COMPUTE_DTYPES)}, not {dtype_name!r}")
        self.dtype = _COMPUTE_DTYPES[dtype_name]
        names = config.get("layer_files") or [f"layer.{i:03d}" for i in range(self.first_layer,
                                                                             self.first_layer + self.n_layers)]
        if len(names) != self.n_layers:
            raise ExecutorInputError(f"tp_llm got {len(names)} layer_files for n_layers={self.n_layers}")
        missing = [n for n in names if n not in shards]
        if missing:
            raise ExecutorInputError(f"tp_llm layer files {missing[:3]} are not among the job's shards")
        self.rank = int(config.get("rank", 0))
        paths = [Path(shards[n]) for n in names]
        self.backend = str(config.get("backend") or BACKENDS[0])
        if self.backend not in BACKENDS:
            raise ExecutorInputError(f"matmul backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        self.window = self._window(config.get("window"), paths, model, memory_budget)
        self.threads = int(config.get("threads") or torch.get_num_threads())
        self.batch_invariant = config.get("batch_invariant", False)
        if not isinstance(self.batch_invariant, bool):
            raise ExecutorInputError(f"tp_llm batch_invariant must be true or false, not {self.batch_invariant!r}")
        #: rows at an offset attend token by token (`runtime.llama.batched_attention`): with batch-invariant
        #: matmuls, a verified speculative draft then gets bitwise the numbers of decoding it token by token
        self.token_invariant = config.get("token_invariant", False)
        if not isinstance(self.token_invariant, bool):
            raise ExecutorInputError(f"tp_llm token_invariant must be true or false, not {self.token_invariant!r}")
        self.sliding_window = int(model["sliding_window"]) if model.get("sliding_window") is not None else None
        fuse = config_allows_fusion(self.dtype, self.sliding_window, self.token_invariant)
        try:
            build = matmuls_factory(self.backend, self.threads, self.dtype, self.batch_invariant,
                                    fused_head_dim=self.head_dim if fuse else None)
            self.store = LayerStore(paths, self.window, prepare=build,
                                    checksums=[self.file_checks.get(n) for n in names])
            first = self.store.layer(0)
        except (ValueError, KeyError) as exc:  # QuantizationError is a ValueError: a malformed shard
            raise ExecutorInputError(f"tp_llm cannot use its layer shards: {exc}") from None
        self.quantized = not isinstance(getattr(first, "inner", first), FloatMatmuls)
        #: attention in one ORT call per layer (runtime/ort_attention.py), where config and shard allow it
        self.fused_attention = getattr(first, "fused_attention", None) is not None
        #: torch's threads for the ops between the matmuls: all of them where torch runs the matmuls
        #: too, one where ONNX Runtime's pool does (see `layer_compute.torch_threads`)
        self.torch_threads = 1 if self.quantized and self.backend == "ort" else torch.get_num_threads()
        self.n_kv_heads = first.n_kv_rows // self.head_dim
        self.n_q_heads = first.n_q_rows // self.head_dim
        self.n_columns = first.n_columns
        if first.in_features != self.hidden_size:
            raise ExecutorInputError(
                f"shard {names[0]} has hidden size {first.in_features}, config says {self.hidden_size}"
            )
        self.rotary = Rotary(self.head_dim, float(model["rope_theta"]), model.get("rope_scaling"),
                             model.get("rope_freq_factors"))
        self.rms_norm_eps = float(model.get("rms_norm_eps", 1e-5))
        self.norms = self._load_norms(shards.get("norms"), model)
        self.caches: dict[str, KVCache] = {}
        self.tokens = 0
        self.compute_s = 0.0
        self._lock = threading.Lock()

    def _load_norms(self, path: Path | None, model: dict[str, Any]) -> list[LayerNorms] | None:
        """The norms of this node's layers when it holds every head and column of them (a 1-node
        plan or a pipeline stage), else None (no `layers` op)."""
        if path is None:
            return None
        complete = self.n_kv_heads == int(model.get("num_kv_heads", -1)) and self.n_columns == int(
            model.get("intermediate_size", -1))
        if not complete:
            raise ExecutorInputError("a 'norms' shard is only for a node that holds all heads and MLP columns")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            mine = range(self.first_layer, self.first_layer + self.n_layers)
            missing = [f"input_norm.{i}" for i in mine if f"input_norm.{i}" not in names]
            if missing:
                raise ExecutorInputError(f"the norms shard lacks {missing[:3]}")
            return [
                LayerNorms(f.get_tensor(f"input_norm.{i}").to(self.dtype), f.get_tensor(f"post_norm.{i}").to(self.dtype),
                           f.get_tensor(f"o_bias.{i}").to(self.dtype) if f"o_bias.{i}" in names else None)
                for i in mine
            ]

    def _window(self, window: Any, paths: list[Path], model: dict[str, Any], memory_budget: int) -> int | None:
        """The configured window, else one sized from the node's memory budget (None = all resident)."""
        if window is not None:
            if not isinstance(window, int) or window < 1:
                raise ExecutorInputError(f"tp_llm window must be a positive number of layers or null, not {window!r}")
            return window
        if memory_budget <= 0:
            return None
        # the coordinator's accounting (splitting.memory_plan.plan_memory), term for term: the same
        # runtime overhead, KV cache context and held bytes per layer file, so its plan is our window
        context = fit_context(model.get("max_position_embeddings", 2048), self.config.get("context"))
        quantized, kv_rows = self._shard_header(paths[0])
        kv = kv_cache_bytes(self.n_layers, kv_rows // self.head_dim, self.head_dim, context)
        resident, windowed = held_layer_bytes(layer_file_sizes(paths), self.backend if quantized else "float")
        try:
            return choose_window(resident, memory_budget, kv_cache_bytes=kv, overhead=NODE_OVERHEAD_BYTES,
                                 windowed_bytes=windowed)
        except MemoryBudgetError as exc:
            raise ExecutorInputError(str(exc)) from None

    @staticmethod
    def _shard_header(first_layer: Path) -> tuple[bool, int]:
        """(block-quantized?, this node's wk rows: its KV cache's size) from the shard header only."""
        from safetensors import safe_open

        with safe_open(str(first_layer), framework="pt") as f:
            quantized = "wk.q" in f.keys()  # noqa: SIM118 (not a dict)
            return quantized, f.get_slice("wk.q" if quantized else "wk").get_shape()[0]

    def details(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "n_layers": self.n_layers,
            "first_layer": self.first_layer,
            "q_heads": self.n_q_heads,
            "kv_heads": self.n_kv_heads,
            "columns": self.n_columns,
            "window": self.window,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantized": self.quantized,
            "backend": self.backend if self.quantized else "float",
            "threads": self.threads,
            "batch_invariant": self.batch_invariant,
            "token_invariant": self.token_invariant,
            "fused_attention": self.fused_attention,
            "ops": ["attn", "mlp", "reset", "truncate"] + (["layers"] if self.norms is not None else []),
        }

    def forward(
        self, op: str, layer: int, position: int, session: str, tensors: list[TensorLike],
        rows: list[Row] | None = None,
    ) -> list[TensorLike]:
        """One message. `rows` (runtime.batch) batch several sessions into one hidden state; without
        them the whole state is one row of `session` starting at `position`."""
        with self._lock:
            if op == "reset":
                for name in [r.session for r in rows] if rows else [session]:
                    self.caches.pop(name, None)
                return []
            if op == "truncate":
                if position < 0:
                    raise ExecutorInputError(f"truncate needs position >= 0, got {position}")
                if session in self.caches:
                    self.caches[session].truncate(position)
                return []
            if op not in ("attn", "mlp", "layers"):
                raise ExecutorInputError(f"tp_llm knows ops attn, mlp, layers, reset, truncate; not {op!r}")
            x = self._check_input(op, layer, tensors)
            rows = rows or [Row(session, position, x.shape[0])]
            try:
                check_rows(rows, x.shape[0])
            except RowsError as exc:
                raise ExecutorInputError(str(exc)) from None
            start = time.perf_counter()
            with torch.inference_mode(), torch_threads(self.torch_threads):
                if op == "layers":
                    out = self._layers(x, layer, rows)
                elif op == "attn":
                    out = self._attention(x, self.store.layer(layer), layer, rows)
                    if layer == 0:
                        self.tokens += x.shape[0]
                else:
                    out = mlp_shard(x, self.store.layer(layer))
            self.compute_s += time.perf_counter() - start
            return [out.to(torch.float32) if out.dtype != torch.float32 else out]

    def _layers(self, x: torch.Tensor, first: int, rows: list[Row]) -> torch.Tensor:
        """Layers first .. last with norms and residuals (the hub's loop, run where the weights are)."""
        if self.norms is None:
            raise ExecutorInputError("op 'layers' needs a node that holds all heads and columns of its layers "
                                     "and their 'norms' shard")
        for i in range(first, self.n_layers):

            def attend(h: torch.Tensor, w: LayerMatmuls, i: int = i) -> torch.Tensor:
                return self._attention(h, w, i, rows)

            x = decoder_layer(x, self.store.layer(i), self.norms[i], self.rms_norm_eps, attend)
        if first == 0:
            self.tokens += x.shape[0]
        return x

    def _attention(self, x: torch.Tensor, weights: LayerMatmuls, layer: int, rows: list[Row]) -> torch.Tensor:
        if self.n_kv_heads == 0:
            return torch.zeros_like(x)
        caches = []
        for row in rows:
            kv = self._cache(row.session).layer(layer)
            if row.position != kv.length:
                raise ExecutorStateError(
                    f"attn for session {row.session!r} layer {layer} at position {row.position}, but this node has "
                    f"{kv.length} tokens cached there; send position {kv.length} or truncate first"
                )
            caches.append(kv)
        return batched_attention(x, weights, caches, [r.position for r in rows], [r.length for r in rows],
                                 self.rotary, self.head_dim, eps=self.rms_norm_eps, sliding_window=self.sliding_window,
                                 token_invariant=self.token_invariant)

    def _cache(self, session: str) -> KVCache:
        cache = self.caches.get(session)
        if cache is None:
            if len(self.caches) >= MAX_SESSIONS:
                raise SessionLimitError(
                    f"this node already holds {MAX_SESSIONS} sessions; reset finished sessions before starting new "
                    "ones (sessions of a coordinator that died are freed after the node's session_grace_s)"
                )
            cache = self.caches[session] = KVCache(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)
        return cache

    def _check_input(self, op: str, layer: int, tensors: list[TensorLike]) -> torch.Tensor:
        if not 0 <= layer < self.n_layers:
            raise ExecutorInputError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}")
        if len(tensors) != 1:
            raise ExecutorInputError(f"{op} takes exactly one tensor (the normed hidden state), got {len(tensors)}")
        x = tensors[0].dequantize() if isinstance(tensors[0], Quantized) else tensors[0]
        if not x.is_floating_point():
            raise ExecutorInputError(f"{op} needs a floating-point hidden state, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.hidden_size or x.shape[0] == 0:
            raise ExecutorInputError(
                f"{op} needs a hidden state of shape [tokens, {self.hidden_size}], got {list(x.shape)}"
            )
        return x.to(self.dtype)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = {sid: max(cache.lengths(), default=0) for sid, cache in self.caches.items()}
            kv_bytes = sum(cache.nbytes() for cache in self.caches.values())
        return {
            "sessions": sessions,
            "kv_cache_bytes": kv_bytes,
            "tokens_computed": self.tokens,
            "executor_compute_s": self.compute_s,
            "layer_store": self.store.stats(),
        }

    def session_count(self) -> int:
        with self._lock:
            return len(self.caches)

    def drop_sessions(self, sessions: set[str]) -> int:
        with self._lock:
            return sum(self.caches.pop(name, None) is not None for name in sessions)

    def close(self) -> None:
        self.caches.clear()
        self.store.close()
