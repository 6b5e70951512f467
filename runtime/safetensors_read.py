"""Read a whole safetensors file into freshly allocated memory, leaving nothing in the page cache.

`safetensors.safe_open` maps the file, so the kernel keeps its pages resident and counts them
against the process: useless for a scheduler whose point is to hold only a few layers. Here the
whole file is read (O_DIRECT where possible) straight into one fresh buffer of its own anonymous
mapping, the tensors are views of that buffer, and dropping the dict unmaps it at once, so RSS
follows what is held. The format is simple and parsed here: 8-byte little-endian header length,
a JSON header, raw little-endian data. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
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
_READ_CHUNK = 1 << 28  # Linux returns at most ~2 GiB per read(); a multiple of the page size for O_DIRECT
_ALIGN = 4096  # O_DIRECT needs page-aligned buffers and lengths


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file; the message names the file and the problem."""


def _fresh_buffer(nbytes: int) -> torch.Tensor:
    """Zeroed, page-aligned memory of its own mapping: freed (munmap) as soon as the last view dies.

    Transparent huge pages are requested: faulting in 2 MiB pages instead of 4 KiB ones makes a
    fresh buffer about twice as cheap to fill, which matters when a layer is re-read every token.
    """
    size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view


def _read_into(fd: int, view: memoryview, nbytes: int, path: Path) -> None:
    """Fill view[:nbytes] from the start of the file; chunk sizes stay multiples of the page size."""
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done : min(done + _READ_CHUNK, len(view))]], done)
        if n == 0:
            raise SafetensorsFormatError(f"{path} ended after {done} of {nbytes} bytes; it changed while being read")
        done += n


def _read_file(path: Path) -> tuple[torch.Tensor, int]:
    """The whole file in a fresh buffer, read with O_DIRECT where the file system allows it.

    O_DIRECT moves the bytes from the disk straight into the buffer: no copy through the page
    cache (CPU the compute threads need) and no cached pages left behind. Where it is refused
    (tmpfs, some network file systems) a buffered read is followed by posix_fadvise(DONTNEED).
    """
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            fd = os.open(path, os.O_RDONLY | direct)
        except OSError:
            direct = 0
    if not direct:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buffer = _fresh_buffer(size)
        view = memoryview(buffer.numpy())
        try:
            _read_into(fd, view, size, path)
        except OSError:  # EINVAL: this file system does not do O_DIRECT after all
            if not direct:
                raise
            os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            direct = 0
            _read_into(fd, view, size, path)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return buffer[:size], size


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


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """All tensors of `path` (views of one freshly read buffer) and the number of bytes read."""
    path = Path(path)
    buffer, size = _read_file(path)
    if size < 8:
        raise SafetensorsFormatError(f"{path} is {size} bytes long, too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsFormatError(f"{path} declares a {header_len}-byte header in a {size}-byte file")
    data_start = 8 + header_len
    entries = _parse_header(bytes(buffer[8:data_start]), path, size - data_start)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        raw = buffer[data_start + start : data_start + end]
        if (data_start + start) % torch.empty((), dtype=dtype).element_size():
            raw = raw.clone()  # a misaligned tensor cannot be a view (safetensors' writer never makes one)
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, size
