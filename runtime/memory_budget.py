"""How many layers a node may hold: parse a memory budget and size the sliding window from it.

The rule: a node's budget pays first for fixed costs (the runtime's overhead and the KV cache,
which grows with the context and cannot be evicted), and what is left holds layer files. If every
layer fits, all stay resident (window None, nothing is ever re-read). Otherwise the window is the
largest w such that ANY w cyclically consecutive layers fit, since the scheduler holds
[i, i+w) for every i. w >= 2 is needed to overlap reading layer i+1 with computing layer i;
w = 1 still runs, reading every layer on demand with no overlap. If not even the largest layer
fits, the model cannot run on this node: MemoryBudgetError says how much is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeweave.runtime.resources import memory_totals, parse_memory_budget

GIB = 1024**3

#: what a node process needs besides weights and KV cache (interpreter, torch, gRPC, ONNX Runtime,
#: activations): the RSS of an idle node (about 300 MB here) plus headroom. The coordinator's
#: plan and the node's own window use this same number, so a plan's windows are the node's.
NODE_OVERHEAD_BYTES = 400 * 1024**2

#: the context a node's KV cache is sized for when fitting (the model's own maximum if smaller)
FIT_CONTEXT = 4096


def fit_context(max_position_embeddings: int, context: int | None = None) -> int:
    """The context length memory is planned for: `context` if given, else the model's maximum
    capped at FIT_CONTEXT (the same on the coordinator, in `edgeweave plan` and on the node)."""
    return int(context) if context else min(int(max_position_embeddings), FIT_CONTEXT)


class MemoryBudgetError(ValueError):
    """The budget cannot hold the fixed costs plus one layer; the message carries the numbers."""


def format_bytes(n: float) -> str:
    """Human size with two significant decimals: '3.20 GiB', '512.00 MiB', '900 B'."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_budget(text: str | int | float, available: int | None = None) -> int:
    """Bytes from '2GiB', '512M', '1e9', a plain byte count, or a fraction like '0.5' of available RAM.

    `available` defaults to this process's available memory (psutil's, capped by its cgroup's
    memory limit; only read for fractions).
    """
    if isinstance(text, bool):
        raise ValueError(f"memory budget {text!r} is not understood; use e.g. 2GiB, 512M, 0.5 (of free RAM) or bytes")
    try:
        value = float(text)
    except (TypeError, ValueError):
        return parse_memory_budget(text, available)  # '2GiB', '512 MB', ...: the unit-aware parser
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"memory budget {text!r} must be a finite number of bytes >= 0 or a fraction in (0, 1)")
    if 0 < value < 1:
        return int(value * (available if available is not None else memory_totals()[1]))
    return int(value)


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, context: int, itemsize: int = 4, sessions: int = 1) -> int:
    """Keys and values of `context` tokens for `sessions` sequences over this node's KV heads."""
    return 2 * n_layers * n_kv_heads * head_dim * context * itemsize * sessions


def resident_layers(budget: int, layer_bytes: int, kv_per_layer: int, overhead: int = NODE_OVERHEAD_BYTES) -> int:
    """How many layers of `layer_bytes` (as held) with their KV cache a `budget` holds all resident
    after the node's fixed `overhead`."""
    return max(0, (budget - overhead) // (layer_bytes + kv_per_layer))


def max_window_bytes(layer_bytes: Sequence[int], window: int) -> int:
    """The largest total of `window` cyclically consecutive layers (what the scheduler may hold)."""
    n = len(layer_bytes)
    window = min(window, n)
    return max(sum(layer_bytes[(i + k) % n] for k in range(window)) for i in range(n))


#: bytes a node holds per byte of a layer's shard file, by the kernels the layer runs on. Float layers
#: are views of the file's bytes (1.0). Quantized kernels hold their own prepacked copy: measured by
#: benchmarks/quantized.py on the 1B Q4_0 file, a resident node held 1127 MB above an idle node for
#: 636 MB of shards with ONNX Runtime (1.77x) and 841 MB with torch's int4 kernels (1.32x).
KERNEL_BYTES_PER_SHARD_BYTE = {"float": 1.0, "ort": 1.8, "torch": 1.35}


def held_layer_bytes(shard_bytes: Sequence[int], kernel: str = "float") -> tuple[list[int], list[int]]:
    """What each layer costs a node (resident, in a window) for layer files of `shard_bytes` run on
    `kernel` ("float", or a quantized backend: "ort", "torch"). Resident: the kernels' copy (the file's
    buffer is freed once they are built). In a window: that copy plus the slot the file is read into."""
    factor = KERNEL_BYTES_PER_SHARD_BYTE[kernel]
    resident = [math.ceil(b * factor) for b in shard_bytes]
    windowed = list(resident) if kernel == "float" else [math.ceil(b * (1 + factor)) for b in shard_bytes]
    return resident, windowed


def choose_window(layer_bytes: Sequence[int], budget: int, kv_cache_bytes: int = 0, overhead: int = 0,
                  windowed_bytes: Sequence[int] | None = None) -> int | None:
    """The sliding window for `budget` bytes: None = all layers resident, else 1 .. len-1 layers.

    `layer_bytes` is what each layer costs resident, `windowed_bytes` what it costs in a window
    (default: the same; see `held_layer_bytes`). Raises MemoryBudgetError when the fixed costs plus
    the largest layer exceed the budget.
    """
    if not layer_bytes:
        raise ValueError("choose_window needs the size of at least one layer")
    for_layers = budget - kv_cache_bytes - overhead
    if for_layers >= sum(layer_bytes):
        return None
    layer_bytes = list(windowed_bytes) if windowed_bytes is not None else layer_bytes
    largest = max(layer_bytes)
    if for_layers < largest:
        raise MemoryBudgetError(
            f"a memory budget of {format_bytes(budget)} leaves {format_bytes(max(for_layers, 0))} for weights after "
            f"{format_bytes(kv_cache_bytes)} of KV cache and {format_bytes(overhead)} of runtime overhead, but the "
            f"largest layer needs {format_bytes(largest)}: {format_bytes(largest - for_layers)} missing for even one "
            f"layer (2 layers, {format_bytes(max_window_bytes(layer_bytes, 2))}, let reading overlap compute)"
        )
    window = 1
    while window + 1 < len(layer_bytes) and max_window_bytes(layer_bytes, window + 1) <= for_layers:
        window += 1
    return window
