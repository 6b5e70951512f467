"""Read a whole safetensors file into freshly allocated memory, then drop it from the page cache.

`safetensors.safe_open` maps the file, so the kernel keeps its pages resident and counts them
against the process: useless for a scheduler whose point is to hold only a few layers. Here the
file is read with `readinto` straight into one torch buffer (no double copy), the tensors are
views of that buffer (freeing the dict frees the buffer), and `posix_fadvise(DONTNEED)` tells the
kernel the file's cached pages are not needed again soon. The format is simple and parsed here:
8-byte little-endian header length, a JSON header, raw little-endian data. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
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
_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read(); stay well below


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file; the message names the file and the problem."""


def _read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + _READ_CHUNK]], offset + done)
        if n == 0:
            raise SafetensorsFormatError(f"{path} ended after {done} of {len(view)} data bytes; the file is truncated")
        done += n


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


def read_safetensors(path: str | Path, drop_page_cache: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """All tensors of `path` (views of one freshly read buffer) and the number of bytes read."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path} is {size} bytes long, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsFormatError(f"{path} declares a {header_len}-byte header in a {size}-byte file")
        data_start = 8 + header_len
        entries = _parse_header(os.pread(fd, header_len, 8), path, size - data_start)
        buffer = torch.empty(size - data_start, dtype=torch.uint8)
        _read_exact(fd, memoryview(buffer.numpy()), data_start, path)
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        raw = buffer[start:end]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start % itemsize:  # a misaligned tensor cannot be a view; copy it (never happens with safetensors' writer)
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, size
