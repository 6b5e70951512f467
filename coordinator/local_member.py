"""The coordinator's own device as a tensor-parallel member, as TPI-LLM's master computes too.

The device that runs the coordinator has cores and memory of its own. `LocalMember` offers the
part of `NodeClient` that `DistributedLlama` and recovery use, backed by in-process runtime
executors over the shard files the coordinator itself wrote: nothing is shipped, and its share
of every allreduce costs no message and no process switch. The hub sends to the remote nodes
first, computes this share while they compute theirs, then gathers.

Errors use `NodeError` with the status a node would send, so callers handle both alike; a local
member is never "lost" (if this process dies, so does the coordinator).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

import edgeweave
from edgeweave.coordinator.client import ForwardCalls, NodeError, Progress
from edgeweave.proto import pb
from edgeweave.runtime import resources
from edgeweave.runtime.batch import Row
from edgeweave.runtime.codec import Quantized
from edgeweave.runtime.executor import Executor, ExecutorInputError, ExecutorStateError, executor_class

LOCAL_ADDRESS = "local"


def _node_error(exc: Exception) -> NodeError:
    """The status a node would answer for this executor error."""
    if isinstance(exc, ExecutorInputError):
        return NodeError(LOCAL_ADDRESS, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ExecutorStateError):
        return NodeError(LOCAL_ADDRESS, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    return NodeError(LOCAL_ADDRESS, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class LocalMember:
    """This process as one member of the plan; `memory_budget` bytes for its weights (0 = unlimited)."""

    address = LOCAL_ADDRESS

    def __init__(self, memory_budget: int = 0, name: str = "coordinator") -> None:
        self.name = name
        self.memory_budget = memory_budget
        self._files: dict[str, Path] = {}  # sha256 -> a file the coordinator wrote
        self._jobs: dict[str, Executor] = {}
        self._started = time.time()

    # -- shards: the coordinator's own files, never copied ----------------------------------
    def offer_files(self, files: dict[str, Path]) -> None:
        """Make these files (sha256 -> path, from a verified manifest) loadable by digest."""
        self._files.update({digest: Path(path) for digest, path in files.items()})

    def has_shards(self, digests: list[str]) -> set[str]:
        return {d for d in digests if d in self._files and self._files[d].is_file()}

    def put_shard(self, path: str | Path, name: str, sha256: str, progress: Progress | None = None) -> None:
        self._files[sha256] = Path(path)

    # -- jobs ------------------------------------------------------------------------------
    def load(self, job_id: str, kind: str, config: dict[str, Any], shards: dict[str, str],
             memory_budget: int = 0, timeout: float | None = None) -> dict[str, Any]:
        missing = [name for name, digest in shards.items() if not self.has_shards([digest])]
        if missing:
            raise NodeError(self.address, grpc.StatusCode.FAILED_PRECONDITION,
                            f"the coordinator has no file for shards {missing[:3]}")
        paths = {name: self._files[digest] for name, digest in shards.items()}
        try:
            executor = executor_class(kind)(config, paths, memory_budget or self.memory_budget)
        except (ExecutorInputError, ExecutorStateError, ValueError) as exc:
            raise _node_error(exc) from None
        self.unload(job_id)
        self._jobs[job_id] = executor
        return executor.details()

    def unload(self, job_id: str) -> dict[str, Any]:
        executor = self._jobs.pop(job_id, None)
        if executor is None:
            return {}
        stats = executor.stats()
        executor.close()
        return stats

    def job_stats(self, job_id: str) -> dict[str, Any]:
        executor = self._job(job_id)
        return {"job_id": job_id, "kind": executor.kind, **executor.stats()}

    def _job(self, job_id: str) -> Executor:
        executor = self._jobs.get(job_id)
        if executor is None:
            raise NodeError(self.address, grpc.StatusCode.NOT_FOUND, f"no job {job_id!r} on the coordinator")
        return executor

    def open_stream(self, reply_timeout: float | None = None, transport: str | None = None,
                    lease: str = "") -> LocalStream:
        """`lease` is kept for the interface: this process's sessions die with it anyway."""
        return LocalStream(self, reply_timeout)

    # -- what a node would report about itself --------------------------------------------
    def info(self) -> pb.InfoReply:
        snapshot = resources.snapshot(None, self.memory_budget)
        return pb.InfoReply(name=self.name, version=edgeweave.__version__, resources=pb.Resources(**vars(snapshot)),
                            uptime_s=time.time() - self._started, jobs=sorted(self._jobs))

    def profile(self, matmul_size: int = 0, budget_s: float = 0.0) -> pb.ProfileReply:
        return pb.ProfileReply(**vars(resources.profile(Path(tempfile.gettempdir()), matmul_size, budget_s)))

    def close(self) -> None:
        for job_id in list(self._jobs):
            self.unload(job_id)

    def __enter__(self) -> LocalMember:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStream(ForwardCalls):
    """The Forward stream interface over a LocalMember: `send` only queues; `recv` computes, in
    the caller's thread, so the remote nodes (sent to before) compute at the same time."""

    def __init__(self, member: LocalMember, reply_timeout: float | None = None) -> None:
        self.address = member.address
        self.reply_timeout = reply_timeout  # kept for the interface: a local step cannot hang on a peer
        self._member = member
        self._seq = itertools.count(1)
        self._pending: deque[tuple[int, str, str, list, int, int, str, list[Row] | None]] = deque()

    def send(self, job_id: str, op: str, tensors: Iterable[torch.Tensor | Quantized], layer: int = 0,
             position: int = 0, session: str = "", rows: Sequence[Row] | None = None) -> int:
        seq = next(self._seq)
        self._pending.append((seq, job_id, op, list(tensors), layer, position, session, list(rows) if rows else None))
        return seq

    def recv(self, timeout: float | None = None, raw: bool = False) -> tuple[list, pb.ForwardReply]:
        if not self._pending:
            raise NodeError(self.address, grpc.StatusCode.FAILED_PRECONDITION, "recv without a pending send")
        seq, job_id, op, tensors, layer, position, session, rows = self._pending.popleft()
        executor = self._member._job(job_id)
        if op == "hold":  # a node's lease op; in-process there is no lease to hold
            return [], pb.ForwardReply(seq=seq)
        start = time.perf_counter()
        try:
            outputs = executor.forward(op, layer, position, session, tensors, rows)
        except Exception as exc:
            raise _node_error(exc) from None
        compute_s = time.perf_counter() - start
        if not raw:
            outputs = [t.dequantize() if isinstance(t, Quantized) else t for t in outputs]
        return outputs, pb.ForwardReply(seq=seq, compute_s=compute_s)

    def close(self) -> None:
        self._pending.clear()
