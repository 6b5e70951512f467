"""Shard file helpers shared by the node's store and the coordinator's uploader.

Shards are content-addressed by sha256; their logical names come from the network, so they
are validated here once (no path separators, no `..`) before anything touches a file system.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

#: read size for hashing and uploading; large enough to keep syscalls cheap, small enough for a Pi.
CHUNK_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShardNameError(ValueError):
    """A shard name or digest that could escape the store or is not a sha256; the text says why."""


def sha256_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks so that multi-GB shards need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_and_crc32(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, int]:
    """(hex sha256, crc32) of a file in one read: the full check at Load, and the cheap one (zlib's
    crc32, ~4 GB/s here) a sliding window repeats on every later read of the same bytes."""
    digest, crc = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            crc = zlib.crc32(block, crc)
    return digest.hexdigest(), crc


class ShardChangedOnDisk(RuntimeError):
    """A shard file's bytes changed after Load verified them (a failing disk, a stray writer)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def check_shard_name(name: str) -> str:
    """Return `name` if it is a safe logical shard name, else raise ShardNameError."""
    if not _NAME.match(name or "") or name in {".", ".."} or ".." in name:
        raise ShardNameError(
            f"shard name {name!r} is not allowed; use 1-200 characters from A-Z a-z 0-9 . _ - without '..'"
        )
    return name


def check_sha256(digest: str) -> str:
    """Return `digest` if it is a lowercase hex sha256, else raise ShardNameError."""
    if not _SHA256.match(digest or ""):
        raise ShardNameError(f"{digest!r} is not a sha256 digest (64 lowercase hex characters)")
    return digest
