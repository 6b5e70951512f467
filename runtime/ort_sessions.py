"""ONNX Runtime session options for this process: one policy for every ORT user in edgeweave.

Why one place: ORT allows a single process-wide intra-op thread pool, and once it exists every
session created afterwards must use it (a session asking for threads of its own is refused). So
the quantized matmuls (`runtime.ort_quantized`), the split-computing executor
(`runtime.onnx_executor`) and the export check (`splitting.onnx_export`) all take their options here.

The policy: sessions of one thread run in the caller's thread (no pool) until some session asks
for more; that request creates the shared pool with its thread count, and every session created
after it shares that pool, whatever it asks for (`pool_threads` says which). Shared rather than
per session because a node holds ~3 quantized sessions per layer: a pool per session (its threads
woken per call, none spinning) made 2 threads slower than 1 (24 vs 13 ms per SmolLM2 token),
pools per session that spin were 50x slower still, while one shared pool whose threads spin
briefly between the calls of one step speeds up even a 576x1536 matmul (21 -> 12 us).
"""

from __future__ import annotations

import threading

import onnxruntime as ort

_shared_pool: list[int] = []  # the shared pool's size, once it exists
_lock = threading.Lock()


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options for a new session that wants `threads` intra-op threads (see the module docstring)."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    with _lock:
        if threads > 1 and not _shared_pool:
            ort.set_global_thread_pool_sizes(threads, 1)
            _shared_pool.append(threads)
        shared = bool(_shared_pool)
    if shared:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return options


def pool_threads() -> int:
    """The intra-op threads a session created now runs with."""
    with _lock:
        return _shared_pool[0] if _shared_pool else 1
