"""The request scheduler on its own: round-robin decode steps, per-client fairness, 429, cancel.

The engine here is a tiny real `TextEngine` (counts up from the prompt, records every step and
reset); no model is needed to check the scheduling order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from edgeweave.coordinator.scheduler import GenerationJob, QueueFull, Scheduler
from edgeweave.runtime.sampling import SamplingParams


class CountingEngine:
    """Token i of a session is prompt[0] + i; `gate` holds every step until the test opens it."""

    model_id = "counting"
    max_context = 1000

    def __init__(self) -> None:
        self.steps: list[str] = []  # session of each step, in order
        self.resets: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        for i in range(max_tokens):
            self.gate.wait(10)
            self.steps.append(session)
            yield prompt_ids[0] + i

    def reset(self, session: str) -> None:
        self.resets.append(session)

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def make_job(first: int, max_tokens: int, client: str, tokens: list[int], done: list[tuple[str, str]]) -> GenerationJob:
    job = GenerationJob(
        prompt_ids=[first], max_tokens=max_tokens, sampling=SamplingParams(), client=client,
        on_token=tokens.append, on_done=lambda reason, error: done.append((job.job_id, reason)),
    )
    return job


def wait_until(predicate, timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


def test_round_robin_steps_and_per_client_fairness():
    engine = CountingEngine()
    scheduler = Scheduler(engine, max_active=2, max_queue=10, autostart=False)  # queue everything first
    try:
        tokens: dict[str, list[int]] = {}
        done: list[tuple[str, str]] = []
        jobs = []
        # client A sends three requests before client B sends one: B must not wait behind all of A's
        for name, client, first in (("a1", "A", 100), ("a2", "A", 200), ("a3", "A", 300), ("b1", "B", 400)):
            tokens[name] = []
            jobs.append(scheduler.submit(make_job(first, 3, client, tokens[name], done)))
        scheduler.start()
        wait_until(lambda: len(done) == 4)
        sessions = {job.job_id: f"http-{job.job_id}" for job in jobs}
        a1, a2, a3, b1 = (sessions[j.job_id] for j in jobs)
        # a1 and b1 are admitted first (one per client) and decoded in alternation; then a2 and a3
        assert engine.steps[:6] == [a1, b1] * 3
        assert engine.steps[6:] == [a2, a3] * 3
        assert tokens == {"a1": [100, 101, 102], "a2": [200, 201, 202], "a3": [300, 301, 302], "b1": [400, 401, 402]}
        assert all(reason == "length" for _, reason in done)
        assert sorted(engine.resets) == sorted(sessions.values())  # every session freed on the nodes
        snapshot = scheduler.snapshot()
        assert snapshot["recent_requests"] == 4 and snapshot["active"] == snapshot["waiting"] == 0
    finally:
        scheduler.close()


def test_full_queue_is_refused_and_cancel_frees_the_slot():
    engine = CountingEngine()
    engine.gate.clear()
    scheduler = Scheduler(engine, max_active=1, max_queue=1)
    try:
        done: list[tuple[str, str]] = []
        long = scheduler.submit(make_job(0, 1000, "A", [], done))
        wait_until(lambda: scheduler.snapshot()["active"] == 1)
        waiting = scheduler.submit(make_job(10, 2, "B", [], done))
        with pytest.raises(QueueFull, match="waiting"):
            scheduler.submit(make_job(20, 2, "C", [], done))
        long.cancel("disconnected")
        engine.gate.set()
        wait_until(lambda: len(done) == 2)
        assert done == [(long.job_id, "disconnected"), (waiting.job_id, "length")]
        assert long.completion_tokens < 1000
        assert engine.resets[0] == f"http-{long.job_id}"
    finally:
        scheduler.close()


def test_engine_errors_end_only_that_request():
    class Failing(CountingEngine):
        def generate(self, prompt_ids, max_tokens, sampling, session):
            if prompt_ids[0] == 13:
                raise RuntimeError("node vanished")
            return super().generate(prompt_ids, max_tokens, sampling, session)

    scheduler = Scheduler(Failing(), max_active=2)
    try:
        done: list[tuple[str, str]] = []
        bad = scheduler.submit(make_job(13, 2, "A", [], done))
        good = scheduler.submit(make_job(1, 2, "B", [], done))
        wait_until(lambda: len(done) == 2)
        assert dict(done) == {bad.job_id: "error", good.job_id: "length"}
    finally:
        scheduler.close()
