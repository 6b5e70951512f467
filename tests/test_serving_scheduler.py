"""The request scheduler on its own: batched steps, chunked prefill, per-client fairness, 429, cancel.

The engine here is a tiny real `TextEngine` (each sequence's next token is its last token + 1; it
records every step's rows and every reset); no model is needed to check the scheduling.
"""

from __future__ import annotations

import threading

import pytest
import torch

from edgeweave.coordinator.scheduler import GenerationJob, QueueFull, Scheduler
from edgeweave.runtime.batch import SequenceStep
from edgeweave.runtime.sampling import SamplingParams

VOCAB = 1000


class CountingEngine:
    """Next token = last token + 1; `gate` holds every step until the test opens it."""

    model_id = "counting"
    max_context = 1000

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s  # how long a step takes (a test that needs a stream to outlast another)
        self.steps: list[list[tuple[str, int]]] = []  # per step: (session, tokens fed) of each row
        self.resets: list[tuple[str, ...]] = []
        self.held: dict[str, int] = {}  # tokens each session's "KV cache" holds
        self.gate = threading.Event()
        self.gate.set()

    def step(self, sequences: list[SequenceStep]) -> torch.Tensor:
        self.gate.wait(10)
        if self.step_s:
            threading.Event().wait(self.step_s)
        logits = torch.zeros(len(sequences), VOCAB)
        for i, seq in enumerate(sequences):
            assert self.held.get(seq.session, 0) == seq.cached, "the scheduler's view of the cache is off"
            self.held[seq.session] = len(seq.history)
            logits[i, (seq.history[-1] + 1) % VOCAB] = 1.0
        self.steps.append([(seq.session, len(seq.history) - seq.cached) for seq in sequences])
        return logits

    def reset(self, *sessions: str) -> None:
        self.resets.append(sessions)
        for session in sessions:
            self.held.pop(session, None)

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def make_job(prompt: list[int], max_tokens: int, client: str, tokens: list[int], done: list[tuple[str, str]],
             sampling: SamplingParams | None = None) -> GenerationJob:
    job = GenerationJob(
        prompt_ids=prompt, max_tokens=max_tokens, sampling=sampling or SamplingParams(), client=client,
        on_token=lambda choice: tokens.append(choice.token), on_done=lambda reason, error: done.append((job.job_id, reason)),
    )
    return job


def wait_until(predicate, timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


def session(job: GenerationJob) -> str:
    return f"http-{job.job_id}"


def test_active_sequences_share_every_step_and_clients_are_admitted_fairly():
    engine = CountingEngine()
    scheduler = Scheduler(engine, max_active=2, max_queue=10, autostart=False)  # queue everything first
    try:
        tokens: dict[str, list[int]] = {}
        done: list[tuple[str, str]] = []
        jobs = {}
        # client A sends three requests before client B sends one: B must not wait behind all of A's
        for name, client, first in (("a1", "A", 100), ("a2", "A", 200), ("a3", "A", 300), ("b1", "B", 400)):
            tokens[name] = []
            jobs[name] = scheduler.submit(make_job([first], 3, client, tokens[name], done))
        scheduler.start()
        wait_until(lambda: len(done) == 4)
        a1, a2, a3, b1 = (session(jobs[n]) for n in ("a1", "a2", "a3", "b1"))
        # a1 and b1 are admitted first (one per client) and share each step; then a2 and a3
        assert engine.steps[:3] == [[(a1, 1), (b1, 1)]] * 3
        assert engine.steps[3:] == [[(a2, 1), (a3, 1)]] * 3
        assert tokens == {"a1": [101, 102, 103], "a2": [201, 202, 203], "a3": [301, 302, 303], "b1": [401, 402, 403]}
        assert all(reason == "length" for _, reason in done)
        assert engine.resets == [(a1, b1), (a2, a3)]  # the rows finishing in one step: one reset
        snapshot = scheduler.snapshot()
        assert snapshot["recent_requests"] == 4 and snapshot["active"] == snapshot["waiting"] == 0
        assert snapshot["mean_batch_size"] == 2.0 and snapshot["tokens_per_s"] > 0
    finally:
        scheduler.close()


def test_a_long_prompt_is_read_in_chunks_while_running_streams_keep_decoding():
    engine = CountingEngine(step_s=1e-3)  # the short stream's 900 steps outlast the long prompt's 5 by far
    engine.gate.clear()
    scheduler = Scheduler(engine, max_active=4, prefill_chunk=4)
    try:
        done: list[tuple[str, str]] = []
        short_tokens, long_tokens = [], []
        short = scheduler.submit(make_job([7], 900, "A", short_tokens, done))
        engine.gate.set()
        wait_until(lambda: len(short_tokens) >= 2)
        long = scheduler.submit(make_job(list(range(50, 60)), 2, "B", long_tokens, done))
        wait_until(lambda: len(done) >= 1)
        assert done == [(long.job_id, "length")]
        short.cancel()
        wait_until(lambda: len(done) == 2)
        s, g = session(short), session(long)
        joined = next(i for i, rows in enumerate(engine.steps) if any(name == g for name, _ in rows))
        # the long prompt's 10 tokens come 4 + 4 + 2, each time beside the short stream's decode row
        assert [dict(rows).get(g) for rows in engine.steps[joined:joined + 3]] == [4, 4, 2]
        assert all(dict(rows).get(s) == 1 for rows in engine.steps[joined:joined + 3])
        assert long_tokens == [60, 61] and short_tokens == list(range(8, 8 + len(short_tokens)))
    finally:
        scheduler.close()


def test_full_queue_is_refused_and_cancel_frees_the_slot():
    engine = CountingEngine()
    engine.gate.clear()
    scheduler = Scheduler(engine, max_active=1, max_queue=1)
    try:
        done: list[tuple[str, str]] = []
        long = scheduler.submit(make_job([0], 900, "A", [], done))
        wait_until(lambda: scheduler.snapshot()["active"] == 1)
        waiting = scheduler.submit(make_job([10], 2, "B", [], done))
        with pytest.raises(QueueFull, match="waiting"):
            scheduler.submit(make_job([20], 2, "C", [], done))
        long.cancel("disconnected")
        engine.gate.set()
        wait_until(lambda: len(done) == 2)
        assert done == [(long.job_id, "disconnected"), (waiting.job_id, "length")]
        assert long.completion_tokens < 900
        assert engine.resets[0] == (session(long),)
    finally:
        scheduler.close()


def test_a_failed_step_ends_the_requests_in_it_and_the_next_ones_run():
    class FailingOnce(CountingEngine):
        failed = False

        def step(self, sequences):
            if any(seq.history[0] == 13 for seq in sequences) and not self.failed:
                self.failed = True
                raise RuntimeError("node vanished")
            return super().step(sequences)

    engine = FailingOnce()
    scheduler = Scheduler(engine, max_active=2)
    try:
        done: list[tuple[str, str]] = []
        bad = scheduler.submit(make_job([13], 2, "A", [], done))
        wait_until(lambda: len(done) == 1)
        tokens: list[int] = []
        good = scheduler.submit(make_job([1], 2, "B", tokens, done))
        wait_until(lambda: len(done) == 2)
        assert dict(done) == {bad.job_id: "error", good.job_id: "length"} and tokens == [2, 3]
    finally:
        scheduler.close()


def test_penalties_bias_and_logprobs_are_applied_per_sequence():
    """The sampler sits in the scheduler: a bias that forbids the engine's favourite changes only
    the request that sent it, and the reported log-probabilities are of the adjusted logits."""
    engine = CountingEngine()
    scheduler = Scheduler(engine, max_active=2)
    try:
        done: list[tuple[str, str]] = []
        plain, biased = [], []
        choices = []
        biased_params = SamplingParams(logit_bias=((6, -100.0), (42, 5.0)), top_logprobs=2)
        job = make_job([5], 1, "A", biased, done, biased_params)
        job.on_token = lambda choice: (biased.append(choice.token), choices.append(choice))
        scheduler.submit(job)
        scheduler.submit(make_job([5], 1, "B", plain, done))
        wait_until(lambda: len(done) == 2)
        assert plain == [6] and biased == [42]
        (choice,) = choices
        expected = torch.log_softmax(torch.zeros(VOCAB).index_fill(0, torch.tensor([6]), 1.0)
                                     .index_add(0, torch.tensor([6, 42]), torch.tensor([-100.0, 5.0])), 0)
        assert choice.logprob == pytest.approx(float(expected[42]))
        assert [t for t, _ in choice.top] == [42, 0]
    finally:
        scheduler.close()
