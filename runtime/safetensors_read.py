"""Read a whole safetensors file into page-aligned memory, leaving nothing in the page cache.

`safetensors.safe_open` maps the file, so the kernel keeps its pages resident and counts them
against the process: useless for a scheduler whose point is to hold only a few layers. Here the
whole file is read straight into a buffer of anonymous memory (`aligned_buffer`) and the tensors
are views of that buffer. The caller owns the buffer: the sliding-window store reuses a fixed
pool of them (one per window slot), so a read costs no page faults, no zeroing and no munmap;
`read_safetensors` without a buffer maps a fresh one, freed when the last view dies.

A read is split into up to `READ_THREADS` concurrent chunk reads (page-aligned boundaries, one
small persistent thread pool; `preadv` releases the GIL): a virtual or NVMe disk only reaches its
bandwidth with several requests in flight. Files are opened with O_DIRECT, so the bytes go from
the disk into the buffer with no copy through the page cache (CPU the compute threads need) and
no cached pages left behind; where O_DIRECT is refused (tmpfs on older kernels, some network file
systems) a buffered read is followed by posix_fadvise(DONTNEED).

The format is simple and parsed here: 8-byte little-endian header length, a JSON header, raw
little-endian data. Nothing is unpickled.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

#: safetensors dtype names -> torch dtypes (those a Llama shard can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: a header larger than this is not a shard header but a broken or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: concurrent chunk reads per file (the calling thread reads one chunk, the pool the others).
READ_THREADS = 4
ALIGN = 4096  # O_DIRECT needs page-aligned buffers, offsets and lengths
_HUGE_PAGE = 2 << 20  # buffers start on a 2 MiB boundary so transparent huge pages can back them
_MIN_CHUNK = 4 << 20  # smaller files are read by the calling thread alone
_READ_CHUNK = 1 << 28  # Linux returns at most ~2 GiB per read(); a multiple of the page size for O_DIRECT

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file; the message names the file and the problem."""


def aligned_size(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages: what a buffer for an O_DIRECT read of that file needs."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """Page-aligned uint8 memory of its own anonymous mapping, at least `aligned_size(nbytes)` long.

    Nothing is committed until written; the mapping is unmapped when the last view dies.
    Transparent huge pages are requested (the buffer starts on a 2 MiB boundary): filling 2 MiB
    pages costs half the faults of 4 KiB ones, and the compute that streams through the weights
    takes fewer TLB misses.
    """
    size = aligned_size(nbytes)
    pad = _HUGE_PAGE if size >= _HUGE_PAGE else 0
    region = mmap.mmap(-1, size + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view
    skip = -whole.data_ptr() % _HUGE_PAGE if pad else 0  # untouched padding costs no memory
    return whole[skip : skip + size]


def _reader_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, READ_THREADS - 1), thread_name_prefix="safetensors-read")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the pool's threads: it starts its own on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _read_range(fd: int, view: memoryview, start: int, end: int, size: int, path: Path) -> None:
    """Fill view[start:min(end, size)] from the same offsets of the file (lengths stay page multiples)."""
    done, stop = start, min(end, size)
    while done < stop:
        n = os.preadv(fd, [view[done : min(done + _READ_CHUNK, end)]], done)
        if n == 0:
            raise SafetensorsFormatError(f"{path} ended after {done} of {size} bytes; it changed while being read")
        done += n


def _read_chunks(fd: int, view: memoryview, size: int, path: Path, threads: int) -> None:
    """Read the file's first `size` bytes as up to `threads` concurrent page-aligned chunks."""
    length = aligned_size(size)
    n = max(1, min(threads, READ_THREADS, length // _MIN_CHUNK))
    step = aligned_size(-(-length // n))
    bounds = [(s, min(s + step, length)) for s in range(0, length, step)]
    pending = [_reader_pool().submit(_read_range, fd, view, s, e, size, path) for s, e in bounds[1:]]
    error: BaseException | None = None
    try:
        _read_range(fd, view, *bounds[0], size, path)
    except BaseException as exc:  # still wait for the other chunks: they write into the caller's buffer
        error = exc
    for future in pending:
        try:
            future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def read_file_into(path: str | Path, buffer: torch.Tensor, threads: int | None = None) -> int:
    """Read the whole file at `path` into `buffer` (from `aligned_buffer`); returns the file's size.

    `threads` concurrent chunk reads (at most, and by default, `READ_THREADS`).

    A file that does not fit (buffer shorter than `aligned_size(file size)`) is an error, never an
    overflow: the sliding-window store sizes its slots once, from the sizes the files had then.
    """
    path = Path(path)
    direct = getattr(os, "O_DIRECT", 0)
    fd = -1
    if direct:
        try:
            fd = os.open(path, os.O_RDONLY | direct)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT
                raise
            direct = 0
    if not direct:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if aligned_size(size) > buffer.numel():
            raise SafetensorsFormatError(
                f"{path} is {size} bytes, more than the {buffer.numel()}-byte buffer it is read into "
                "(the file grew after its reader was sized; reload the job)"
            )
        view = memoryview(buffer.numpy())
        try:
            _read_chunks(fd, view, size, path, threads or READ_THREADS)
        except OSError as exc:  # EINVAL: O_DIRECT was accepted at open but not for this read
            if not direct or exc.errno != errno.EINVAL:
                raise
            os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            direct = 0
            _read_chunks(fd, view, size, path, threads or READ_THREADS)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return size


def _parse_header(raw: bytes, path: Path, data_bytes: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"{path} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the safetensors header is not a JSON object")
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = [int(d) for d in meta["shape"]]
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= end <= data_bytes or end - start != expected:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} claims bytes {start}..{end} for shape {shape} {meta['dtype']} "
                f"({expected} bytes) in a data section of {data_bytes} bytes"
            )
        entries[name] = (dtype, shape, start, end)
    return entries


@dataclass(frozen=True)
class FileRange:
    """Where one tensor's bytes lie in its file (ONNX Runtime reads a weight from there: external data)."""

    offset: int
    nbytes: int
    dtype: torch.dtype


class FileTensors(dict):
    """A file's tensors by name (a plain dict for every reader), plus the file and each tensor's
    byte range in it, for kernels that read their weights from the file themselves."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path, ranges: dict[str, FileRange]) -> None:
        super().__init__(tensors)
        self.path = path
        self.ranges = ranges


def parse_safetensors(buffer: torch.Tensor, size: int, path: str | Path) -> FileTensors:
    """The tensors of a safetensors file held in buffer[:size], as views of `buffer` (validated first)."""
    path = Path(path)
    if size < 8:
        raise SafetensorsFormatError(f"{path} is {size} bytes long, too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", buffer[:8].numpy().tobytes())
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsFormatError(f"{path} declares a {header_len}-byte header in a {size}-byte file")
    data_start = 8 + header_len
    entries = _parse_header(buffer[8:data_start].numpy().tobytes(), path, size - data_start)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        raw = buffer[data_start + start : data_start + end]
        if (data_start + start) % torch.empty((), dtype=dtype).element_size():
            raw = raw.clone()  # a misaligned tensor cannot be a view (safetensors' writer never makes one)
        tensors[name] = raw.view(dtype).view(shape)
    ranges = {name: FileRange(data_start + start, end - start, dtype) for name, (dtype, _, start, end) in entries.items()}
    return FileTensors(tensors, path.resolve(), ranges)


def read_safetensors(path: str | Path, buffer: torch.Tensor | None = None) -> tuple[FileTensors, int]:
    """All tensors of `path` and the number of bytes read.

    The tensors are views of `buffer` (an `aligned_buffer` the caller reuses; they are valid until
    it is overwritten) or, without one, of a freshly mapped buffer that lives as long as they do.
    """
    path = Path(path)
    if buffer is None:
        buffer = aligned_buffer(path.stat().st_size)
    size = read_file_into(path, buffer)
    return parse_safetensors(buffer, size, path), size
