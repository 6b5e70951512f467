"""The request queue in front of one engine: continuous batching, bounded, fair, cancellable.

One thread owns the engine (the cluster's Forward streams are not shared between threads). It
keeps up to `max_active` generations open, each with its own session (= KV cache on the nodes),
and advances ALL of them in one batched engine step per iteration (`runtime.batch`): every
decoding sequence contributes its newest token, and sequences still reading their prompt
contribute a chunk of it (cut at multiples of `prefill_chunk` of its own positions), at most
`prefill_chunk` prompt tokens per step in all, so a long prompt joining does not stall the
streams already running. Decode is bound by streaming the weights, so a
step of 8 rows costs little more than a step of one. Sampling (penalties, logit bias,
log-probabilities) happens here, per sequence, from the logits the engine returns.

Waiting requests are admitted client by client (round robin over clients, FIFO within one), so one
chatty client cannot starve the others. A full queue raises `QueueFull` (the HTTP layer answers
429). Cancelling (client gone, stop string seen) drops the sequence before the next step and
resets its session on the nodes, so its row is free at once. A failing step fails the requests
that were in it; the server stays up.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeweave.coordinator.engine import TextEngine
from edgeweave.runtime.batch import DEFAULT_PREFILL_CHUNK, SequenceStep
from edgeweave.runtime.sampling import Sampler, SamplingParams, TokenChoice

log = logging.getLogger(__name__)

#: called on the scheduler thread for each new token (with its log-probabilities when asked for)
TokenCallback = Callable[[TokenChoice], None]
#: called once on the scheduler thread: finish reason ("stop", "length", "cancelled") or an error
DoneCallback = Callable[[str, BaseException | None], None]
#: seconds of recent steps the aggregate tokens/s figure covers
RATE_WINDOW_S = 10.0


class StepObserver(Protocol):
    """What the scheduler reports as it runs (coordinator.serving_metrics implements it)."""

    def step(self, rows: int, prefill_tokens: int, seconds: float) -> None: ...

    def token(self, job: GenerationJob, gap_s: float | None) -> None: ...

    def finished(self, job: GenerationJob) -> None: ...


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
    last_token_at: float | None = None
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
    """A running generation: its tokens so far (prompt + completion) and how many the engine holds."""

    job: GenerationJob
    session: str
    sampler: Sampler
    tokens: list[int]
    cached: int = 0

    def next_step(self, budget: int, chunk: int) -> SequenceStep | None:
        """This sequence's part of the next step: its newest token, or its next prompt chunk while it
        reads the prompt (None: that chunk does not fit in the `budget` left this step).

        Chunks are cut at multiples of `chunk` in the sequence's own positions, never by what the
        other rows left of the budget, so a prompt is read in the same pieces alone or in a crowd:
        attention over a chunk of T tokens rounds differently for another T, and with batch-invariant
        matmuls this keeps a request's numbers independent of the load."""
        remaining = len(self.tokens) - self.cached
        n = 1 if remaining == 1 else min(remaining, chunk - self.cached % chunk)
        if n > 1 and n > budget:
            return None
        upto = self.cached + n
        return SequenceStep(self.session, self.tokens if upto == len(self.tokens) else self.tokens[:upto], self.cached)


class Scheduler:
    """Drives `engine` from one thread; `submit` from any thread."""

    def __init__(self, engine: TextEngine, max_active: int = 16, max_queue: int = 64, history: int = 64,
                 autostart: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 observer: StepObserver | None = None) -> None:
        if max_active < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_active and prefill_chunk must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.max_active = max_active
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.observer = observer
        self._waiting: collections.OrderedDict[str, collections.deque[GenerationJob]] = collections.OrderedDict()
        self._n_waiting = 0
        self._active: list[_Active] = []
        self._recent: collections.deque[GenerationJob] = collections.deque(maxlen=history)
        #: (end time, rows, tokens chosen) of recent steps, for the batch size and tokens/s figures
        self._steps: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=4096)
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

    def counts(self) -> tuple[int, int]:
        """(active, waiting) requests: the cheap part of `snapshot`, for /health and /metrics."""
        with self._wake:
            return len(self._active), self._n_waiting

    def snapshot(self) -> dict[str, Any]:
        """Queue depth, batch size and recent requests' speed, for `/v1/status`."""
        now = time.monotonic()
        with self._wake:
            recent = list(self._recent)
            active, waiting = len(self._active), self._n_waiting
            steps = [s for s in self._steps if s[0] >= now - RATE_WINDOW_S]
            last_rows = self._steps[-1][1] if self._steps else 0
        rates = [j.decode_tokens_per_s for j in recent if j.decode_tokens_per_s]
        ttfts = [j.ttft_s for j in recent if j.ttft_s is not None]
        return {
            "active": active,
            "waiting": waiting,
            "max_active": self.max_active,
            "max_queue": self.max_queue,
            "prefill_chunk": self.prefill_chunk,
            "batch_size": last_rows if active else 0,
            "mean_batch_size": sum(s[1] for s in steps) / len(steps) if steps else None,
            "tokens_per_s": sum(s[2] for s in steps) / RATE_WINDOW_S if steps else 0.0,
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
            self._step()

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
        try:
            sampler = Sampler(job.sampling)
        except Exception as exc:  # noqa: BLE001 - reported to the request, the server stays up
            self._finish(job, "error", exc)
            return
        with self._wake:
            self._active.append(_Active(job, f"http-{job.job_id}", sampler, list(job.prompt_ids)))

    def _step(self) -> None:
        """One batched engine step over every active sequence (cancelled ones leave first)."""
        cancelled = [(a, a.job.cancel_reason, None) for a in self._active if a.job.cancel_event.is_set()]
        if cancelled:
            self._retire(cancelled)
        batch: list[tuple[_Active, SequenceStep]] = []
        prefill_tokens = 0  # prompt tokens fed this step, all sequences together
        for active in self._active:
            step = active.next_step(self.prefill_chunk - prefill_tokens, self.prefill_chunk)
            if step is not None:
                if active.cached < len(active.job.prompt_ids):
                    prefill_tokens += len(step.history) - step.cached
                batch.append((active, step))
        if not batch:
            return
        start = time.perf_counter()
        try:
            logits = self.engine.step([step for _, step in batch])
        except Exception as exc:  # noqa: BLE001 - a failed step ends the requests in it, not the server
            log.exception("a batched step of %d sequence(s) failed", len(batch))
            self._retire([(active, "error", exc) for active, _ in batch])
            return
        seconds = time.perf_counter() - start
        ended, chosen = [], 0
        for (active, step), row_logits in zip(batch, logits, strict=True):
            active.cached = len(step.history)
            if active.cached < len(active.tokens):
                continue  # still reading its prompt: these logits are not for a new token
            chosen += 1
            outcome = self._deliver(active, row_logits)
            if outcome is not None:
                ended.append((active, *outcome))
        with self._wake:
            self._steps.append((time.monotonic(), len(batch), chosen))
        if self.observer is not None:
            self.observer.step(len(batch), prefill_tokens, seconds)
        if ended:
            self._retire(ended)

    def _deliver(self, active: _Active, logits) -> tuple[str, BaseException | None] | None:
        """Choose and hand over one token; (finish reason, error) if the sequence ends with it."""
        job = active.job
        try:
            choice = active.sampler.pick(logits)
        except Exception as exc:  # noqa: BLE001 - e.g. a logit_bias past the vocabulary
            return "error", exc
        now = time.monotonic()
        gap = None if job.last_token_at is None else now - job.last_token_at
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now
        job.completion_tokens += 1
        active.tokens.append(choice.token)
        if self.observer is not None:
            self.observer.token(job, gap)
        try:
            job.on_token(choice)
        except Exception:  # noqa: BLE001
            log.exception("token callback of %s failed; cancelling it", job.job_id)
            job.cancel()
        if choice.token in job.sampling.stop_token_ids:
            return "stop", None
        if job.completion_tokens >= job.max_tokens:
            return "length", None
        return None

    def _retire(self, ended: list[tuple[_Active, str, BaseException | None]]) -> None:
        """Drop finished sequences and free their sessions on the nodes (one reset message for all)."""
        with self._wake:
            for active, _, _ in ended:
                self._active.remove(active)
        try:
            self.engine.reset(*(active.session for active, _, _ in ended))
        except Exception:  # noqa: BLE001 - a node that fails to reset must not stop the server
            log.exception("could not reset %d session(s)", len(ended))
        for active, reason, error in ended:
            self._finish(active.job, reason, error)

    def _finish(self, job: GenerationJob, reason: str, error: BaseException | None) -> None:
        job.finished_at = time.monotonic()
        job.finish_reason = reason
        with self._wake:
            self._recent.append(job)
        log.info("%s", describe_job(job, error))
        if self.observer is not None:
            self.observer.finished(job)
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
