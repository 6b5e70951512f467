"""Content-addressed shard files: `<data-dir>/shards/<sha256>`.

A shard is written to a temporary file, checked against its announced size and sha256, and
only then renamed into place, so a file under its digest is always complete and correct.
A `<sha256>.ok` marker (holding the size) records that the file was fully verified, which
makes later presence checks a cheap size comparison.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from edgeweave.runtime.shard_files import check_sha256, check_shard_name, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 8 << 30


class ShardRejected(ValueError):
    """The upload breaks a rule (name, size, offsets); the node answers INVALID_ARGUMENT."""


class ShardCorrupt(ValueError):
    """The received bytes do not hash to the announced digest; the node answers DATA_LOSS."""


class ShardStore:
    def __init__(self, data_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.root = Path(data_dir) / "shards"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes

    def path(self, sha256: str) -> Path:
        return self.root / check_sha256(sha256)

    def _marker(self, sha256: str) -> Path:
        return self.root / f"{sha256}.ok"

    def has(self, sha256: str) -> bool:
        """True if a complete, verified copy is stored. Hashes once if the marker is missing."""
        try:
            path = self.path(sha256)
        except ValueError:
            return False
        if not path.is_file():
            return False
        size = path.stat().st_size
        marker = self._marker(sha256)
        try:
            return int(marker.read_text()) == size
        except (OSError, ValueError):
            pass
        if sha256_file(path) != sha256:  # e.g. copied in by hand, or the disk corrupted it
            log.warning("shard %s failed verification; removing it", sha256)
            path.unlink(missing_ok=True)
            return False
        marker.write_text(str(size))
        return True

    def present(self, digests: list[str]) -> list[str]:
        return [d for d in digests if self.has(d)]

    def receive(self, chunks) -> tuple[str, int, bool]:
        """Store a shard from an iterator of chunks (name, sha256, size, offset, data).

        Returns (sha256, size, already_present). Raises ShardRejected or ShardCorrupt; on any
        error nothing is kept.
        """
        iterator = iter(chunks)
        first = next(iterator, None)
        if first is None:
            raise ShardRejected("the upload carried no chunks; the first chunk must give name, sha256 and size")
        try:
            check_shard_name(first.name)
            sha256 = check_sha256(first.sha256)
        except ValueError as exc:
            raise ShardRejected(str(exc)) from None
        size = int(first.size)
        if size > self.max_shard_bytes:
            raise ShardRejected(f"shard {first.name} is {size} bytes; this node accepts at most {self.max_shard_bytes}")
        if self.has(sha256):
            return sha256, size, True
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sha256[:16]}-", suffix=".part", dir=self.root)
        try:
            digest = hashlib.sha256()
            written = 0
            with os.fdopen(fd, "wb") as f:
                chunk = first
                while chunk is not None:
                    if chunk.offset != written:
                        raise ShardRejected(
                            f"shard {first.name}: chunk at offset {chunk.offset} but {written} bytes received so far; "
                            "chunks must be contiguous and in order"
                        )
                    written += len(chunk.data)
                    if written > size:
                        raise ShardRejected(f"shard {first.name}: more data than the announced {size} bytes")
                    digest.update(chunk.data)
                    f.write(chunk.data)
                    chunk = next(iterator, None)
                f.flush()
                os.fsync(f.fileno())
            if written != size:
                raise ShardRejected(f"shard {first.name}: received {written} bytes but {size} were announced")
            actual = digest.hexdigest()
            if actual != sha256:
                raise ShardCorrupt(
                    f"shard {first.name}: received bytes hash to {actual}, not the announced {sha256}; nothing was stored"
                )
            os.replace(tmp_name, self.path(sha256))
            self._marker(sha256).write_text(str(size))
            return sha256, size, False
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
