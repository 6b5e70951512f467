"""Continuous batching over real node processes: each request of a batch gets exactly the greedy
tokens and log-probabilities (bitwise) it gets when run alone, with mixed prompt lengths,
requests joining and leaving mid-stream, on the tensor-parallel path, the 1-node fused path and
with the coordinator computing a share. The shipped Q4_1 SmolLM2, kept 4-bit."""

from __future__ import annotations

import threading

import pytest
from llm_reference import (
    one_torch_thread,  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
    smollm,
)

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.engine import DistributedEngine
from edgeweave.coordinator.local_member import LocalMember
from edgeweave.coordinator.scheduler import GenerationJob, Scheduler
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.runtime.sampling import SamplingParams
from edgeweave.splitting.tokenizer import Tokenizer

pytestmark = [pytest.mark.llm, pytest.mark.slow]
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Name three colours.",
             "Write one sentence about the sea, the wind and the old lighthouse on the hill.", "Hi"]
N_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(two_nodes):
    return two_nodes  # the session's 2-node cluster (conftest.py), shared with test_speculative_cluster.py


@pytest.fixture(scope="module")
def prompts():
    tokenizer = Tokenizer.from_checkpoint(smollm())
    return [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


class Client:
    """One request's tokens and log-probabilities, collected from the scheduler thread."""

    def __init__(self, scheduler: Scheduler, prompt: list[int], max_tokens: int = N_TOKENS) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done = threading.Event()
        self.reason: str | None = None
        self.job = scheduler.submit(GenerationJob(prompt, max_tokens, SamplingParams(top_logprobs=0),
                                                  on_token=self._token, on_done=self._done))

    def _token(self, choice) -> None:
        self.tokens.append(choice.token)
        self.logprobs.append(choice.logprob)

    def _done(self, reason, error) -> None:
        assert error is None, error
        self.reason = reason
        self.done.set()

    def wait(self) -> Client:
        assert self.done.wait(300), "the request did not finish"
        return self


class RowsSeen:
    """A scheduler observer that keeps the number of rows of every step."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def step(self, rows: int, prefill_tokens: int, seconds: float) -> None:
        self.rows.append(rows)

    def token(self, job, gap_s) -> None:
        pass

    def finished(self, job) -> None:
        pass


def _wait_for(predicate, timeout: float = 120.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        event.wait(0.02)
    raise AssertionError("condition not reached")


def _engine(cluster, layout: str, cache_dir) -> DistributedEngine:
    if layout == "two nodes":
        return DistributedEngine.open(smollm(), cluster.addresses, weights=[1.0, 1.0], cache_dir=cache_dir)
    if layout == "one node (fused)":
        return DistributedEngine.open(smollm(), cluster.addresses[:1], weights=[1.0], cache_dir=cache_dir)
    me, node = LocalMember(), NodeClient(cluster.addresses[0], cluster=cluster.identity)
    llm = DistributedLlama(smollm(), [me, node], [1.0, 1.0], cache_dir=cache_dir, batch_invariant=True)
    return DistributedEngine(llm, [node])


@pytest.mark.parametrize("layout", ["two nodes", "one node (fused)", "coordinator share"])
def test_each_request_of_a_batch_equals_itself_alone(cluster, prompts, tmp_path_factory, layout):
    engine = _engine(cluster, layout, tmp_path_factory.mktemp("batching-cache"))
    rows = RowsSeen()
    scheduler = Scheduler(engine, max_active=8, prefill_chunk=24, observer=rows)  # ~30-50 token prompts: chunks
    try:
        assert engine.llm.fused == (layout == "one node (fused)")
        alone = [Client(scheduler, p).wait() for p in prompts]
        # two start together; two more join mid-stream; a fifth joins and leaves early (cancelled)
        first = [Client(scheduler, p) for p in prompts[:2]]
        _wait_for(lambda: len(first[0].tokens) >= 3)
        later = [Client(scheduler, p) for p in prompts[2:]]
        leaver = Client(scheduler, prompts[2], max_tokens=200)
        _wait_for(lambda: len(leaver.tokens) >= 2)
        leaver.job.cancel("disconnected")
        batched = [c.wait() for c in first + later]
        leaver.wait()
        for one, together in zip(alone, batched, strict=True):
            # bitwise: the engine is batch-invariant (runtime.layer_compute.at_least_two_rows)
            assert (together.tokens, together.logprobs) == (one.tokens, one.logprobs)
        assert leaver.reason == "disconnected" and leaver.tokens == alone[2].tokens[: len(leaver.tokens)]
        assert max(rows.rows) == 5  # the four requests and the leaver, in one step
        _wait_for(lambda: scheduler.snapshot()["active"] == 0)
        # every finished or cancelled row was reset: no KV cache is left on any node
        assert all(stats["sessions"] == {} for stats in engine.llm.node_stats())
    finally:
        scheduler.close()
        engine.close()
