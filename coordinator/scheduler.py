"""The request queue in front of one engine: bounded, fair across clients, cancellable.

One thread owns the engine (the cluster's Forward streams are not shared between threads). It
keeps up to `max_active` generations open, each with its own session (= KV cache on the nodes),
and advances them one decode step each in turn (round robin), so a long answer does not hold
back a short one. Waiting requests are admitted client by client (round robin over clients,
FIFO within one), so one chatty client cannot starve the others. A full queue raises `QueueFull`
(the HTTP layer answers 429). Cancelling (client gone, stop string seen) closes the generation
between two tokens and resets its session on the nodes, so the cluster is free at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from edgeweave.coordinator.engine import TextEngine
from edgeweave.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

#: called on the scheduler thread for each new token id
TokenCallback = Callable[[int], None]
#: called once on the scheduler thread: finish reason ("stop", "length", "cancelled") or an error
DoneCallback = Callable[[str, BaseException | None], None]


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


@dataclass
class GenerationJob:
    """One request as the scheduler sees it, with the timings the logs and `/v1/status` report."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    on_token: TokenCallback
    on_done: DoneCallback
    client: str = "anonymous"
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the scheduler to stop this job before its next token (thread-safe, idempotent)."""
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding (the steady rate a client sees)."""
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        elapsed = self.finished_at - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass
class _Active:
    job: GenerationJob
    session: str
    tokens: Iterator[int]


class Scheduler:
    """Drives `engine` from one thread; `submit` from any thread."""

    def __init__(self, engine: TextEngine, max_active: int = 8, max_queue: int = 64, history: int = 64,
                 autostart: bool = True) -> None:
        if max_active < 1 or max_queue < 0:
            raise ValueError("max_active must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.max_active = max_active
        self.max_queue = max_queue
        self._waiting: collections.OrderedDict[str, collections.deque[GenerationJob]] = collections.OrderedDict()
        self._n_waiting = 0
        self._active: list[_Active] = []
        self._recent: collections.deque[GenerationJob] = collections.deque(maxlen=history)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeweave-scheduler", daemon=True)
        if autostart:
            self.start()

    def start(self) -> None:
        """Start the engine thread (separate from __init__ so jobs can be queued first)."""
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> GenerationJob:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free_slots = max(0, self.max_active - len(self._active))
            if self._n_waiting >= self.max_queue + free_slots:
                raise QueueFull(f"{self._n_waiting} requests are already waiting (limit {self.max_queue}); retry later")
            self._waiting.setdefault(job.client, collections.deque()).append(job)
            self._n_waiting += 1
            self._wake.notify()
        return job

    def snapshot(self) -> dict[str, Any]:
        """Queue depth and recent requests' speed, for `/v1/status`."""
        with self._wake:
            recent = list(self._recent)
            active, waiting = len(self._active), self._n_waiting
        rates = [j.decode_tokens_per_s for j in recent if j.decode_tokens_per_s]
        ttfts = [j.ttft_s for j in recent if j.ttft_s is not None]
        return {
            "active": active,
            "waiting": waiting,
            "max_active": self.max_active,
            "max_queue": self.max_queue,
            "recent_requests": len(recent),
            "median_tokens_per_s": _median(rates),
            "median_ttft_s": _median(ttfts),
            "recent": [
                {"id": j.job_id, "client": j.client, "prompt_tokens": len(j.prompt_ids),
                 "completion_tokens": j.completion_tokens, "ttft_s": j.ttft_s,
                 "tokens_per_s": j.decode_tokens_per_s, "finish_reason": j.finish_reason}
                for j in recent[-10:]
            ],
        }

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        with self._wake:
            self._stopping = True
            for queue in self._waiting.values():
                for job in queue:
                    job.cancel("shutdown")
            for active in self._active:
                active.job.cancel("shutdown")
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._active and not self._n_waiting:
                    self._wake.wait()
                if self._stopping and not self._active and not self._n_waiting:
                    return
                admitted = self._admit_locked()
            for job in admitted:
                self._start(job)
            for active in list(self._active):
                self._step(active)

    def _admit_locked(self) -> list[GenerationJob]:
        """Take waiting jobs while there is room: first from the client with the fewest running
        requests (ties: whoever has waited longest), then that client goes to the back of the line."""
        admitted: list[GenerationJob] = []
        while self._n_waiting and len(self._active) + len(admitted) < self.max_active:
            running = collections.Counter(a.job.client for a in self._active)
            running.update(job.client for job in admitted)
            client = min(self._waiting, key=lambda c: running[c])
            queue = self._waiting.pop(client)
            admitted.append(queue.popleft())
            self._n_waiting -= 1
            if queue:
                self._waiting[client] = queue
        return admitted

    def _start(self, job: GenerationJob) -> None:
        job.started_at = time.monotonic()
        if job.cancel_event.is_set():
            self._finish(job, job.cancel_reason, None)
            return
        session = f"http-{job.job_id}"
        try:
            tokens = self.engine.generate(job.prompt_ids, job.max_tokens, job.sampling, session)
        except Exception as exc:  # noqa: BLE001 - reported to the request, the server stays up
            self._finish(job, "error", exc)
            return
        with self._wake:
            self._active.append(_Active(job, session, tokens))

    def _step(self, active: _Active) -> None:
        job = active.job
        if job.cancel_event.is_set():
            self._retire(active, job.cancel_reason, None)
            return
        try:
            token = next(active.tokens)
        except StopIteration:
            self._retire(active, "length" if job.completion_tokens >= job.max_tokens else "stop", None)
            return
        except Exception as exc:  # noqa: BLE001 - a failed generation ends only this request
            log.exception("generation %s failed", job.job_id)
            self._retire(active, "error", exc)
            return
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        job.completion_tokens += 1
        try:
            job.on_token(token)
        except Exception:  # noqa: BLE001
            log.exception("token callback of %s failed; cancelling it", job.job_id)
            job.cancel()
        if token in job.sampling.stop_token_ids:
            self._retire(active, "stop", None)
        elif job.completion_tokens >= job.max_tokens:
            self._retire(active, "length", None)

    def _retire(self, active: _Active, reason: str, error: BaseException | None) -> None:
        with self._wake:
            self._active.remove(active)
        close = getattr(active.tokens, "close", None)
        try:
            if close:
                close()
            self.engine.reset(active.session)
        except Exception:  # noqa: BLE001 - a node that fails to reset must not stop the server
            log.exception("could not reset session %s", active.session)
        self._finish(active.job, reason, error)

    def _finish(self, job: GenerationJob, reason: str, error: BaseException | None) -> None:
        job.finished_at = time.monotonic()
        job.finish_reason = reason
        with self._wake:
            self._recent.append(job)
        log.info("%s", describe_job(job, error))
        try:
            job.on_done(reason, error)
        except Exception:  # noqa: BLE001
            log.exception("done callback of %s failed", job.job_id)


def describe_job(job: GenerationJob, error: BaseException | None = None) -> str:
    """The one log sentence per request: who, how much, how fast, why it ended."""
    ttft = f"{job.ttft_s * 1e3:.0f} ms" if job.ttft_s is not None else "n/a"
    rate = f"{job.decode_tokens_per_s:.1f} tok/s" if job.decode_tokens_per_s else "n/a tok/s"
    why = f"error: {error}" if error is not None else job.finish_reason
    return (f"request {job.job_id} from {job.client}: {len(job.prompt_ids)} prompt tokens, "
            f"{job.completion_tokens} completion tokens, ttft {ttft}, {rate}, finished by {why}")


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
