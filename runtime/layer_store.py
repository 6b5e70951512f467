"""The sliding-window weight scheduler (TPI-LLM's memory scheduler): hold only the layers needed next.

A node whose shard of the model does not fit in memory keeps at most `window` layer files
resident. Accessing layer i releases every resident layer outside the upcoming window
[i, i+window) and queues background loads of i+1 .. i+window-1 on ONE I/O thread, in order, so
the next layer needed is read first while layer i computes. The window is cyclic: after the last
layer comes layer 0, because the next token starts there again. With window >= 2 the read of
layer i+1 overlaps the compute of layer i; window=1 still works, reading each layer on demand.
Any access order is correct (attention and MLP of one layer, prefill, decode, a restart at
layer 0 after a failure); only the amount of overlap depends on it.

Loads are real reads into fresh memory (see `safetensors_read`), the page cache of the file is
dropped, and released layers are freed and returned to the OS (`malloc_trim` on glibc), so the
resident set really follows the window. At most `window` layers are resident or being read,
except transiently after a jump in the access order: a background read already in flight for a
layer no longer wanted finishes and is then discarded (window + 1 layers for that moment).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from edgeweave.runtime.memory_budget import choose_window
from edgeweave.runtime.safetensors_read import read_safetensors

Layer = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def _libc_malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS): then freed memory returns to the OS lazily."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


def return_freed_memory(collect: bool = False) -> None:
    """Hand free heap pages back to the OS so RSS drops after a release.

    Layer dicts hold no cycles, so reference counting frees them at once; `gc.collect` (tens of
    ms in a process with torch loaded) is only worth it on close.
    """
    if collect:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def layer_file_sizes(paths: Sequence[str | Path]) -> list[int]:
    """Bytes of each layer file: what one resident layer costs (header included, a few KB)."""
    return [Path(p).stat().st_size for p in paths]


def window_for_budget(
    paths: Sequence[str | Path], memory_budget: int, kv_cache_bytes: int = 0, overhead: int = 0
) -> int | None:
    """The window for these layer files under `memory_budget` bytes (0 = unlimited: all resident).

    Raises `MemoryBudgetError` (with the numbers) when not even one layer fits.
    """
    if memory_budget <= 0:
        return None
    return choose_window(layer_file_sizes(paths), memory_budget, kv_cache_bytes, overhead)


class LayerStoreClosed(RuntimeError):
    """The store was closed (the job was unloaded) while someone still asked for a layer."""


class LayerStore:
    """Per-layer weights of one node, all resident or through a sliding window of `window` layers.

    `layer(i)` returns layer i's tensors (blocking only while they are read; that time is the
    stall). Callers must not keep the returned dict after asking for a layer outside the window,
    or the memory cannot be freed. Thread-safe.
    """

    def __init__(self, paths: Sequence[str | Path], window: int | None = None, *, dtype: torch.dtype | None = None) -> None:
        if not paths:
            raise ValueError("a layer store needs at least one layer file")
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be at least 1 layer (or None for all resident), got {window}")
        self.paths = [Path(p) for p in paths]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"layer files not found: {', '.join(missing[:3])}")
        self.n_layers = len(self.paths)
        self.dtype = dtype
        self.window = None if window is None or int(window) >= self.n_layers else int(window)
        self._sizes = layer_file_sizes(self.paths)
        self._resident: dict[int, Layer] = {}
        self._in_flight: set[int] = set()
        self._queue: deque[int] = deque()
        self._wanted: set[int] = set(range(self.n_layers))
        self._cond = threading.Condition()
        self._closed = False
        self._process = psutil.Process()
        self.bytes_read = 0
        self.loads = 0
        self.stall_s = 0.0
        self.last_stall_s = 0.0
        self.peak_resident_bytes = 0
        self.peak_rss = self._process.memory_info().rss
        self._thread: threading.Thread | None = None
        if self.window is None:
            for i in range(self.n_layers):
                self._store(i, self._read(i))
        else:
            self._thread = threading.Thread(target=self._io_loop, name="layer-store-io", daemon=True)
            self._thread.start()
            with self._cond:
                self._slide(0, include_current=True)

    # -- public API ------------------------------------------------------------------------

    def layer(self, index: int) -> Layer:
        """Layer `index`'s tensors by shard key name; slides the window to start at `index`."""
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} is out of range: this store holds layers 0..{self.n_layers - 1}")
        if self.window is None:
            with self._cond:
                self._check_open()
                return self._resident[index]
        start = time.perf_counter()
        with self._cond:
            self._check_open()
            released = self._slide(index, include_current=False)
            if released:  # drop them now, before waiting, so the next read never coexists with them
                released.clear()
                return_freed_memory()
            while (tensors := self._resident.get(index)) is None:
                if index in self._in_flight:  # the I/O thread is reading it: wait for that read
                    self._cond.wait()
                    self._check_open()
                    continue
                self._in_flight.add(index)
                self._note_resident_bytes()
                self._cond.release()
                try:
                    tensors = self._read(index)
                finally:
                    self._cond.acquire()
                    self._in_flight.discard(index)
                if index in self._wanted:  # another caller may have moved the window meanwhile
                    self._store(index, tensors)
                self._cond.notify_all()
                break
            self.last_stall_s = time.perf_counter() - start
            self.stall_s += self.last_stall_s
        return tensors

    def stats(self) -> dict[str, Any]:
        """Counters for the node's job stats and for benchmarks."""
        with self._cond:
            return {
                "window": self.window,
                "layers": self.n_layers,
                "resident_layers": sorted(self._resident),
                "in_flight_layers": sorted(self._in_flight),
                "resident_bytes": self._resident_bytes(),
                "bytes_read": self.bytes_read,
                "loads": self.loads,
                "stall_s": self.stall_s,
                "last_stall_s": self.last_stall_s,
                "peak_resident_bytes": self.peak_resident_bytes,
                "peak_rss": self.peak_rss,
            }

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no background read is queued or running (tests and benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._in_flight) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Stop the I/O thread and free every layer."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._resident.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        return_freed_memory(collect=True)

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling (all called with self._cond held) ------------------------------------------

    def _slide(self, index: int, include_current: bool) -> list[Layer]:
        """Make [index, index+window) the wanted set; return the released layers (freed by the caller)."""
        assert self.window is not None
        upcoming = [(index + k) % self.n_layers for k in range(self.window)]
        self._wanted = set(upcoming)
        released = [self._resident.pop(i) for i in list(self._resident) if i not in self._wanted]
        todo = upcoming if include_current else upcoming[1:]
        self._queue = deque(i for i in todo if i not in self._resident and i not in self._in_flight)
        if self._queue:
            self._cond.notify_all()
        return released

    def _io_loop(self) -> None:
        """The one background reader: takes the next queued layer, reads it, keeps it if still wanted."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                index = self._queue.popleft()
                self._in_flight.add(index)
                self._note_resident_bytes()
                self._cond.release()
                tensors: Layer | None = None
                try:
                    tensors = self._read(index)
                except Exception as exc:  # the caller that needs this layer reads it again and sees the error
                    log.warning("background read of layer %d (%s) failed: %s", index, self.paths[index], exc)
                finally:
                    self._cond.acquire()
                    self._in_flight.discard(index)
                if tensors is not None and index in self._wanted and not self._closed:
                    self._store(index, tensors)
                else:
                    tensors = None
                    self._cond.release()
                    return_freed_memory()
                    self._cond.acquire()
                self._cond.notify_all()

    def _read(self, index: int) -> Layer:
        tensors, nbytes = read_safetensors(self.paths[index])
        if self.dtype is not None:
            tensors = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        with self._cond:
            self.bytes_read += nbytes
            self.loads += 1
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        return tensors

    def _store(self, index: int, tensors: Layer) -> None:
        self._resident[index] = tensors
        self._note_resident_bytes()

    def _resident_bytes(self) -> int:
        return sum(self._sizes[i] for i in self._resident) + sum(self._sizes[i] for i in self._in_flight)

    def _note_resident_bytes(self) -> None:
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes())

    def _check_open(self) -> None:
        if self._closed:
            raise LayerStoreClosed("this layer store was closed (its job was unloaded); load the job again")
