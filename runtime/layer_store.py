"""The sliding-window weight scheduler (TPI-LLM's memory scheduler): hold only the layers needed next.

A node whose shard of the model does not fit in memory keeps at most `window` layer files
resident. Accessing layer i releases every resident layer outside the upcoming window
[i, i+window) and queues background loads of i+1 .. i+window-1 on ONE I/O thread, in order, so
the next layer needed is read first while layer i computes. The window is cyclic: after the last
layer comes layer 0, because the next token starts there again. With window >= 2 the read of
layer i+1 overlaps the compute of layer i; window=1 still works, reading each layer on demand.
Any access order is correct (attention and MLP of one layer, prefill, decode, a restart at
layer 0 after a failure); only the amount of overlap depends on it.

Memory is a fixed pool of `window` slots, each an anonymous page-aligned buffer as large as the
largest layer file, mapped lazily once and then reused forever: a load reads the file into a free
slot (O_DIRECT, several concurrent chunk reads: see `safetensors_read`), the layer's tensors are
views into that slot, and releasing the layer only returns the slot to the free list. So a token
costs no page faults, no zeroing, no munmap and no malloc_trim, and the resident set is exactly
the window: at most `window` layers are resident or being read at any time. After a jump in the
access order a background read already in flight for a layer no longer wanted cannot be
cancelled; it finishes, and a caller that needs its slot waits for it and reuses it.

With every layer resident (window None) each layer gets a buffer of its own, read once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from edgeweave.runtime import safetensors_read
from edgeweave.runtime.memory_budget import choose_window
from edgeweave.runtime.safetensors_read import (
    aligned_buffer,
    aligned_size,
    parse_safetensors,
    read_file_into,
)
from edgeweave.runtime.shard_files import ShardChangedOnDisk

Layer = dict[str, torch.Tensor]
_NO_BUFFER = torch.empty(0, dtype=torch.uint8)
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

    Slots never need it (they are reused, and unmapped on close); converted copies (`dtype`) live on
    the heap. Layer dicts hold no cycles, so reference counting frees them at once; `gc.collect`
    (tens of ms in a process with torch loaded) is only worth it on close.
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
    stall). Thread-safe: concurrent calls never corrupt the store or deadlock.

    THE CONTRACT (a correctness rule, not a memory hint): with a window, the dict returned by
    `layer(i)` and its tensors are views into a reused slot buffer. They are valid only while i
    stays in the window: the first later call `layer(j)`, by this caller or any other, whose
    window [j, j+window) (cyclic) does not contain i (in a forward walk: the call for layer i+1,
    whatever the window) frees i's slot, and the next read overwrites it in place at once. Finish
    with a layer's tensors before asking for a layer that moves the window past it, never keep
    them (copy what must outlive that), and let concurrent callers serialize "get a layer,
    compute with it" as a whole. The tensor-parallel executor obeys this: it runs ops one at a
    time under its lock and keeps no weights between ops. With every layer resident (window None)
    the tensors stay valid until `close`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        window: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        read_threads: int | None = None,
        prepare: Callable[[Layer], Any] | None = None,
        checksums: Sequence[int | None] | None = None,
    ) -> None:
        if not paths:
            raise ValueError("a layer store needs at least one layer file")
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be at least 1 layer (or None for all resident), got {window}")
        self.paths = [Path(p) for p in paths]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"layer files not found: {', '.join(missing[:3])}")
        self.n_layers = len(self.paths)
        #: each file's crc32 as verified at Load: every read is checked against it, so a file changed
        #: on disk since then is an error (ShardChangedOnDisk), never wrong weights (None: unchecked)
        self.checksums = list(checksums) if checksums is not None else [None] * self.n_layers
        if len(self.checksums) != self.n_layers:
            raise ValueError(f"{len(self.checksums)} checksums for {self.n_layers} layer files")
        self.dtype = dtype
        #: turns a layer's tensors into what `layer(i)` returns (e.g. its prepacked matmuls), on the
        #: reading thread; when it keeps no view of them, a resident layer's buffer is freed at once
        self.prepare = prepare
        #: concurrent chunk reads per layer file (default `safetensors_read.READ_THREADS`)
        self.read_threads = max(1, int(read_threads or safetensors_read.READ_THREADS))
        self.window = None if window is None or int(window) >= self.n_layers else int(window)
        self._sizes = layer_file_sizes(self.paths)
        #: bytes of one slot: the largest layer file, rounded up to whole pages for O_DIRECT
        self.slot_bytes = aligned_size(max(self._sizes))
        self._slots: list[torch.Tensor] = []  # buffers mapped so far (at most `window`; one per layer if resident)
        self._free: list[int] = []  # indices into _slots not holding a layer or a read
        self._slot_of: dict[int, int] = {}  # layer -> its slot, for resident layers and reads in flight
        self._resident: dict[int, Layer] = {}
        self._in_flight: set[int] = set()
        self._queue: deque[int] = deque()
        self._wanted: set[int] = set(range(self.n_layers))
        self._cond = threading.Condition()
        self._closed = False
        self._process = psutil.Process()
        self.bytes_read = 0
        self.loads = 0
        self.read_s = 0.0
        self.stall_s = 0.0
        self.last_stall_s = 0.0
        self.peak_resident_bytes = 0
        self.peak_rss = self._process.memory_info().rss
        self._thread: threading.Thread | None = None
        if self.window is None:
            with self._cond:
                for i in range(self.n_layers):
                    self._slots.append(aligned_buffer(self._sizes[i]))
                    self._load(i, i)
                    if prepare is not None:  # what prepare kept of the buffer stays alive through its views
                        self._slots[i] = _NO_BUFFER
            if prepare is not None:  # building kernels (e.g. ORT sessions) leaves freed heap behind
                return_freed_memory()
        else:
            self._thread = threading.Thread(target=self._io_loop, name="layer-store-io", daemon=True)
            self._thread.start()
            with self._cond:
                self._slide(0, include_current=True)

    # -- public API ------------------------------------------------------------------------

    def layer(self, index: int) -> Layer:
        """Layer `index`'s tensors by shard key name; slides the window to start at `index`.

        With a window the tensors are valid only until a layer outside [index, index+window) is
        asked for (see the class docstring).
        """
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} is out of range: this store holds layers 0..{self.n_layers - 1}")
        if self.window is None:
            with self._cond:
                self._check_open()
                return self._resident[index]
        start = time.perf_counter()
        with self._cond:
            self._check_open()
            self._slide(index, include_current=False)
            while (tensors := self._resident.get(index)) is None:
                if index not in self._wanted:  # another caller moved the window while this one waited
                    self._slide(index, include_current=False)
                    continue
                slot = None if index in self._in_flight else self._take_slot()
                if slot is None:  # being read, or every slot holds a wanted layer or a read in flight
                    self._cond.wait()
                    self._check_open()
                    continue
                tensors = self._load(index, slot)  # raises the reader's error
                break
            self.last_stall_s = time.perf_counter() - start
            self.stall_s += self.last_stall_s
        return tensors

    def stats(self) -> dict[str, Any]:
        """Counters for the node's job stats and for benchmarks.

        `slots` buffers of `slot_bytes` each (`buffer_bytes` in all) were ever mapped: with a
        window that stops at `window` after the first pass, however many tokens follow.
        """
        with self._cond:
            return {
                "window": self.window,
                "layers": self.n_layers,
                "resident_layers": sorted(self._resident),
                "in_flight_layers": sorted(self._in_flight),
                "resident_bytes": self._resident_bytes(),
                "slots": len(self._slots),
                "free_slots": len(self._free),
                "slot_bytes": self.slot_bytes,
                "buffer_bytes": sum(s.numel() for s in self._slots),
                "read_threads": self.read_threads,
                "bytes_read": self.bytes_read,
                "loads": self.loads,
                "read_s": self.read_s,
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
        """Stop the I/O thread and free every layer and slot."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._resident.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._cond:  # a read still in flight keeps its own reference to its slot until it ends
            self._slots.clear()
            self._free.clear()
            self._slot_of.clear()
        return_freed_memory(collect=True)

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling (all called with self._cond held) ------------------------------------------

    def _slide(self, index: int, include_current: bool) -> None:
        """Make [index, index+window) the wanted set; the slots of the layers outside it become free."""
        assert self.window is not None
        upcoming = [(index + k) % self.n_layers for k in range(self.window)]
        self._wanted = set(upcoming)
        released = [i for i in self._resident if i not in self._wanted]
        for i in released:
            del self._resident[i]
            self._free.append(self._slot_of.pop(i))
        if released and self.dtype is not None:  # converted copies live on the heap, not in the slots
            return_freed_memory()
        todo = upcoming if include_current else upcoming[1:]
        self._queue = deque(i for i in todo if i not in self._resident and i not in self._in_flight)
        if self._queue or released:
            self._cond.notify_all()

    def _take_slot(self) -> int | None:
        """A free slot (mapping a new one while fewer than `window` exist), or None when all are busy."""
        assert self.window is not None
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.window:
            self._slots.append(aligned_buffer(self.slot_bytes))
            return len(self._slots) - 1
        return None

    def _io_loop(self) -> None:
        """The one background reader: takes the next queued layer and a free slot, reads, keeps it if still wanted."""
        with self._cond:
            while True:
                while not self._closed and not (self._next_queued() and (slot := self._take_slot()) is not None):
                    self._cond.wait()
                if self._closed:
                    return
                index = self._queue.popleft()
                try:
                    self._load(index, slot)
                except Exception as exc:  # the caller that needs this layer reads it again and sees the error
                    log.warning("background read of layer %d (%s) failed: %s", index, self.paths[index], exc)

    def _next_queued(self) -> bool:
        """Drop queued layers another caller has read or is reading meanwhile; True if one is left to read."""
        while self._queue and (self._queue[0] in self._resident or self._queue[0] in self._in_flight):
            self._queue.popleft()
        return bool(self._queue)

    def _load(self, index: int, slot: int) -> Layer:
        """Read layer `index` into `slot` with the lock released; keep it if still wanted, else free the slot.

        Returns the tensors either way (a caller that asked for a layer no longer wanted still gets
        it, valid until the slot's next read). On error the slot is freed and the error raised.
        """
        assert index not in self._in_flight and index not in self._resident, f"layer {index} read twice"
        self._in_flight.add(index)
        self._slot_of[index] = slot
        self._note_resident_bytes()
        buffer = self._slots[slot]
        tensors: Layer | None = None
        self._cond.release()
        try:
            tensors = self._read(index, buffer)
        finally:
            self._cond.acquire()
            self._in_flight.discard(index)
            if tensors is not None and index in self._wanted and not self._closed:
                self._resident[index] = tensors
                self._note_resident_bytes()
            else:
                del self._slot_of[index]
                if not self._closed:
                    self._free.append(slot)
            self._cond.notify_all()
        return tensors

    def _read(self, index: int, buffer: torch.Tensor) -> Layer:
        start = time.perf_counter()
        path = self.paths[index]
        nbytes = read_file_into(path, buffer, self.read_threads)
        expected = self.checksums[index]
        if expected is not None:
            actual = zlib.crc32(memoryview(buffer.numpy())[:nbytes])
            if actual != expected:
                raise ShardChangedOnDisk(path, f"layer file {path} changed on disk since it was verified at Load "
                                               f"(crc32 {actual:08x}, expected {expected:08x})")
        elapsed = time.perf_counter() - start
        tensors = parse_safetensors(buffer, nbytes, path)
        if self.dtype is not None:
            tensors = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        if self.prepare is not None:
            tensors = self.prepare(tensors)
        with self._cond:
            self.bytes_read += nbytes
            self.loads += 1
            self.read_s += elapsed
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        return tensors

    def _resident_bytes(self) -> int:
        return sum(self._sizes[i] for i in self._resident) + sum(self._sizes[i] for i in self._in_flight)

    def _note_resident_bytes(self) -> None:
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes())

    def _check_open(self) -> None:
        if self._closed:
            raise LayerStoreClosed("this layer store was closed (its job was unloaded); load the job again")
