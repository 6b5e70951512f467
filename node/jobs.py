"""The jobs a node runs: executor instances keyed by job_id, with their lifecycle and counters."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeweave.node.shard_store import ShardStore
from edgeweave.runtime.executor import Executor, ExecutorInputError, executor_class

log = logging.getLogger(__name__)


class JobNotFound(KeyError):
    """No job with this id is loaded; the node answers NOT_FOUND."""

    def __str__(self) -> str:
        return str(self.args[0])


class MissingShard(RuntimeError):
    """A job names a shard this node does not hold; the node answers FAILED_PRECONDITION."""


@dataclass
class Job:
    job_id: str
    kind: str
    config: dict[str, Any]
    shards: dict[str, str]  # logical name -> sha256
    executor: Executor
    shard_bytes: int
    loaded_at: float = field(default_factory=time.time)
    #: time.monotonic() of its last unary call or last stream closing (node/leases.py: the idle clock)
    last_used: float = field(default_factory=time.monotonic)
    #: serializes calls into one executor: executors keep per-session state (KV caches)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    compute_s: float = 0.0
    stall_s: float = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "requests": self.requests,
            "compute_s": self.compute_s,
            "stall_s": self.stall_s,
            "shard_bytes": self.shard_bytes,
            "uptime_s": time.time() - self.loaded_at,
            **self.executor.stats(),
        }


class JobTable:
    def __init__(self, store: ShardStore, default_memory_budget: int = 0) -> None:
        self.store = store
        self.default_memory_budget = default_memory_budget
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        #: shards of Loads in progress: pinned like those of loaded jobs, so an upload cannot evict them
        self._loading: list[set[str]] = []
        self._pin_lock = threading.Lock()  # held only to copy; never while calling into the store
        store.pinned = self.referenced

    def referenced(self) -> set[str]:
        """Digests the shard store must not evict: every loaded job's shards and those being loaded."""
        with self._pin_lock:
            pinned = set().union(*self._loading)
            for job in list(self._jobs.values()):
                pinned.update(job.shards.values())
        return pinned

    def ids(self) -> list[str]:
        return sorted(self._jobs)

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} is loaded on this node; call Load first")
        return job

    def load(
        self, job_id: str, kind: str, config_json: str, shards: dict[str, str], memory_budget: int = 0
    ) -> tuple[Job, bool]:
        """Start a job (or return the identical one already running). Returns (job, reused)."""
        if not job_id:
            raise ExecutorInputError("Load needs a non-empty job_id")
        try:
            config = json.loads(config_json) if config_json else {}
        except json.JSONDecodeError as exc:
            raise ExecutorInputError(f"config_json of job {job_id!r} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ExecutorInputError(f"config_json of job {job_id!r} must be a JSON object")
        cls = executor_class(kind)
        loading = set(shards.values())
        with self._pin_lock:
            self._loading.append(loading)
        try:
            return self._load(job_id, kind, config, shards, memory_budget, cls)
        finally:
            with self._pin_lock:
                self._loading.remove(loading)

    def _load(self, job_id: str, kind: str, config: dict[str, Any], shards: dict[str, str], memory_budget: int,
              cls: type[Executor]) -> tuple[Job, bool]:
        with self._lock:
            existing = self._jobs.get(job_id)
            if existing and (existing.kind, existing.config, existing.shards) == (kind, config, shards):
                existing.last_used = time.monotonic()
                return existing, True
            # every Load re-hashes its shards (a corrupt file is deleted here), see node/shard_store.py
            missing = {name: digest for name, digest in shards.items() if not self.store.verify(digest)}
            if missing:
                listed = ", ".join(f"{name} (sha256 {digest})" for name, digest in missing.items())
                raise MissingShard(
                    f"job {job_id!r} needs {len(missing)} shard(s) this node does not hold or that failed their "
                    f"sha256 check: {listed}; upload them with PutShard first"
                )
            paths = {name: self.store.path(digest) for name, digest in shards.items()}
            if existing:
                self._close(existing, "replaced")
            start = time.perf_counter()
            budget = memory_budget or self.default_memory_budget
            try:
                checks = {name: self.store.crc32(digest) for name, digest in shards.items()}
                executor = cls(config=config, shards=paths, memory_budget=budget, file_checks=checks)
            except (ExecutorInputError, MemoryError):
                raise
            except (KeyError, TypeError, ValueError) as exc:  # a config the executor cannot use
                raise ExecutorInputError(
                    f"the {kind} executor cannot use the config of job {job_id!r}: {type(exc).__name__}: {exc}"
                ) from None
            except Exception:
                log.exception("job %s (%s) failed to load", job_id, kind)
                raise
            size = sum(p.stat().st_size for p in paths.values())
            job = Job(job_id, kind, config, dict(shards), executor, size)
            self._jobs[job_id] = job
        log.info("job %s loaded: kind %s, %d shards, %.1f MB, %.3f s", job_id, kind, len(paths), size / 1e6,
                 time.perf_counter() - start)
        return job, False

    def _close(self, job: Job, why: str) -> dict[str, Any]:
        self._jobs.pop(job.job_id, None)
        stats = job.stats()
        with job.lock:
            job.executor.close()
        log.info("job %s %s after %d requests, %.3f s compute", job.job_id, why, job.requests, job.compute_s)
        return stats

    def mark_used(self, job_id: str) -> None:
        """Restart the job's idle clock (a call for it, or its last stream closing)."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.last_used = time.monotonic()

    def idle_jobs(self, idle_s: float, exclude: set[str]) -> list[str]:
        """Jobs not in `exclude` (those open streams hold) unused for `idle_s` seconds or more."""
        now = time.monotonic()
        return [job_id for job_id, job in list(self._jobs.items())
                if job_id not in exclude and now - job.last_used >= idle_s]

    def unload_idle(self, job_id: str, idle_s: float, held: Callable[[str], bool]) -> bool:
        """Unload `job_id` if it is still idle and not `held` (checked under the lock a Load takes,
        so a coordinator reusing the job meanwhile keeps it). True if it was unloaded."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or held(job_id) or time.monotonic() - job.last_used < idle_s:
                return False
            self._close(job, f"unloaded (idle {idle_s:.0f} s, no coordinator holds it)")
            return True

    def session_count(self) -> int:
        """KV sessions held by all jobs' executors (what Health reports)."""
        return sum(job.executor.session_count() for job in list(self._jobs.values()))

    def unload(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._close(self.get(job_id), "unloaded")

    def close_all(self) -> None:
        with self._lock:
            for job in list(self._jobs.values()):
                self._close(job, "closed at shutdown")
