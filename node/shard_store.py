"""Content-addressed shard files: `<data-dir>/shards/<sha256>`.

A shard is written to a temporary file, checked against its announced size and sha256, and
only then renamed into place, so a file under its digest is always complete and correct.
A `<sha256>.ok` marker (holding the size) records that the file was fully verified, which
makes presence checks (HasShards) a cheap size comparison.

Load does not trust the marker: `verify` re-hashes every shard a job names on every Load
(streamed, about 1 GB/s, so ~0.15 s for a 140 MB node share). A marker keyed by size and mtime
would miss a disk that flips bytes in place; a Load is rare next to the tokens it serves. A
shard that fails is deleted, so HasShards reports it missing and the coordinator re-sends it.

A full disk (ENOSPC) is answered with ShardNoSpace (RESOURCE_EXHAUSTED) naming free vs needed
bytes; the partial temp file is removed and the node keeps serving.

Size bound (`max_bytes`, `[node] shard_cache_max`): storing a shard that would take the store past
it first evicts the least recently used shards that no loaded job references (`pinned`) and that
are not being written; when even that cannot make room the upload is refused (ShardCacheFull,
RESOURCE_EXHAUSTED). Recency is the mtime of a shard's `.ok` marker, refreshed whenever HasShards
or Load touches the shard, so it survives node restarts and costs no extra file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeweave.runtime.shard_files import check_sha256, check_shard_name, sha256_and_crc32, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 8 << 30


class ShardRejected(ValueError):
    """The upload breaks a rule (name, size, offsets); the node answers INVALID_ARGUMENT."""


class ShardCorrupt(ValueError):
    """The received bytes do not hash to the announced digest; the node answers DATA_LOSS."""


class ShardNoSpace(OSError):
    """The data dir's disk cannot take the shard; the node answers RESOURCE_EXHAUSTED."""


class ShardCacheFull(ShardNoSpace):
    """The shard does not fit under the store's size bound even after evicting every unused shard."""


def _no_space(root: Path, name: str, size: int) -> ShardNoSpace:
    free = shutil.disk_usage(root).free
    return ShardNoSpace(
        errno.ENOSPC,
        f"shard {name} needs {size} bytes but the node's data dir {root} has only {free} bytes free; "
        "free disk space on the node or give it a larger data dir",
    )


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class ShardStore:
    def __init__(self, data_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, max_bytes: int = 0,
                 pinned: Callable[[], set[str]] | None = None) -> None:
        self.root = Path(data_dir) / "shards"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        #: bound on the bytes of all stored shards (0 = unlimited); LRU eviction keeps under it
        self.max_bytes = max_bytes
        #: digests that must never be evicted (the shards of loaded jobs); set by the job table
        self.pinned: Callable[[], set[str]] = pinned or set
        self._lock = threading.Lock()
        self._writing: dict[str, int] = {}  # digest -> bytes reserved by an upload in progress
        self._sizes: dict[str, int] = {}  # digest -> bytes of every stored shard
        #: digest -> crc32 of the bytes `verify` last hashed: readers re-check each later read with it
        self._crc32: dict[str, int] = {}
        for entry in self.root.iterdir():
            if _is_digest(entry.name) and entry.is_file():
                self._sizes[entry.name] = entry.stat().st_size

    @property
    def used_bytes(self) -> int:
        """Bytes of all stored shards (what the size bound counts)."""
        with self._lock:
            return sum(self._sizes.values())

    def _touch(self, sha256: str) -> None:
        """Mark the shard used now (its marker's mtime is its recency for LRU eviction)."""
        # no marker yet: `has` writes one; until then recency falls back to the file's mtime
        with contextlib.suppress(OSError):
            os.utime(self._marker(sha256))

    def _last_use(self, sha256: str) -> float:
        for path in (self._marker(sha256), self.root / sha256):
            try:
                return path.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def _delete(self, sha256: str) -> None:
        (self.root / sha256).unlink(missing_ok=True)
        self._marker(sha256).unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(sha256, None)
            self._crc32.pop(sha256, None)

    def discard(self, sha256: str) -> None:
        """Delete a stored shard found changed on disk, so HasShards reports it missing."""
        log.warning("deleting shard %s: its bytes changed on disk since they were verified", sha256)
        self._delete(check_sha256(sha256))

    def crc32(self, sha256: str) -> int | None:
        """The crc32 of the shard's bytes as of its last `verify` (None if never verified here)."""
        with self._lock:
            return self._crc32.get(sha256)

    def _make_room(self, name: str, sha256: str, size: int) -> None:
        """Reserve `size` bytes for an upload under the bound, evicting LRU unpinned shards first.

        Raises ShardCacheFull (nothing evicted) when even evicting every evictable shard is not enough."""
        with self._lock:
            if self.max_bytes <= 0:
                self._writing[sha256] = size
                return
            pinned = self.pinned()
            used = sum(self._sizes.values()) + sum(self._writing.values())
            evictable = sorted((d for d in self._sizes if d not in pinned), key=self._last_use)
            free_after = self.max_bytes - used + sum(self._sizes[d] for d in evictable)
            if size > free_after:
                raise ShardCacheFull(
                    errno.ENOSPC,
                    f"shard {name} needs {size} bytes but the node's shard store is bounded to {self.max_bytes} "
                    f"bytes and only {max(free_after, 0)} can be freed (the rest belongs to loaded jobs or "
                    "uploads in progress); raise the node's --shard-cache-max ([node] shard_cache_max) or unload jobs",
                )
            victims = []
            for digest in evictable:
                if used + size <= self.max_bytes:
                    break
                used -= self._sizes.pop(digest)
                victims.append(digest)
            self._writing[sha256] = size
        for digest in victims:
            age = time.time() - self._last_use(digest)
            self._delete(digest)
            log.info("evicted shard %s (least recently used, %.0f s ago) to make room for %s under the %d-byte "
                     "shard cache bound", digest[:12], age, name, self.max_bytes)

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
            with self._lock:
                self._sizes.pop(sha256, None)
            return False
        size = path.stat().st_size
        marker = self._marker(sha256)
        try:
            if int(marker.read_text()) == size:
                self._touch(sha256)
                return True
        except (OSError, ValueError):
            pass
        if sha256_file(path) != sha256:  # e.g. copied in by hand, or the disk corrupted it
            log.warning("shard %s failed verification; removing it", sha256)
            self._delete(sha256)
            return False
        marker.write_text(str(size))
        with self._lock:
            self._sizes[sha256] = size
        return True

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored file (ignoring the marker); delete it when it no longer matches."""
        try:
            path = self.path(sha256)
        except ValueError:
            return False
        try:
            actual, crc = sha256_and_crc32(path)
        except OSError:
            return False
        if actual == sha256:
            self._touch(sha256)
            with self._lock:
                self._crc32[sha256] = crc
            return True
        log.warning("shard %s is corrupt on disk (hashes to %s); deleting it so it is fetched again", sha256, actual)
        self._delete(sha256)
        return False

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
        if self.has(sha256):  # idempotent, but only for the same bytes: the announced size must match too
            stored = self.path(sha256).stat().st_size
            if stored != size:
                raise ShardRejected(
                    f"shard {first.name} announces {size} bytes, but the stored shard with sha256 {sha256[:12]}... "
                    f"has {stored}; send its real size"
                )
            return sha256, size, True
        self._make_room(first.name, sha256, size)
        try:
            if shutil.disk_usage(self.root).free < size:
                raise _no_space(self.root, first.name, size)
            return self._write(first, iterator, sha256, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, ShardNoSpace):
                raise _no_space(self.root, first.name, size) from None
            raise
        finally:
            with self._lock:
                self._writing.pop(sha256, None)

    def _write(self, first, iterator, sha256: str, size: int) -> tuple[str, int, bool]:
        """Stream the chunks into a temp file, check size and digest, then rename into place."""
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
            with self._lock:
                self._sizes[sha256] = size
            try:
                self._marker(sha256).write_text(str(size))
            except OSError as exc:  # the shard is complete; without a marker `has` hashes it once instead
                log.warning("could not write the marker of shard %s: %s", sha256[:12], exc)
            return sha256, size, False
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
