"""Speculative decoding with prompt-lookup drafts: several tokens per pass over the nodes.

A tensor-parallel token costs 2 x layers round trips whatever the number of tokens in the pass,
so checking k guessed tokens at once costs little more than decoding one. Per pass the last
chosen token and a draft of up to k tokens (`runtime.prompt_lookup`: what followed the text's
newest n-gram the last time it occurred) go through the model as ONE row at the session's
position; the logits of every position say what greedy decoding would have chosen there. The
longest prefix of the draft that agrees is accepted, plus the model's own token after it, so a
pass yields 1 .. k+1 tokens, and the nodes' KV caches are cut back (`truncate`) past the last
accepted token when part of the draft was rejected.

The tokens are exactly greedy decoding's, provided a position's logits do not depend on how
many tokens share its pass: the driver runs batch-invariant (`batch_invariant=True`: the
matmuls never take their one-row path, whose sums round differently; see
`runtime.layer_compute.at_least_two_rows`), and compared against a plain run of the same driver.
Only greedy choice is verified this way: a request that samples (temperature > 0) is refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from edgeweave.coordinator.tp_driver import GenerationStats
from edgeweave.runtime.batch import SequenceStep
from edgeweave.runtime.prompt_lookup import DraftLength, PromptLookup
from edgeweave.runtime.sampling import Sampler, SamplingParams

#: the most draft tokens per pass (`edgeweave run --speculate`); the length adapts below it
#: (`prompt_lookup.DraftLength`). Where drafts are right, longer is better (a pass costs round
#: trips, 2 x layers of them, plus ~8% per extra row on a 2-node local cluster); 8 keeps what one
#: wrong pass can waste small
DEFAULT_DRAFT = 8
#: drafts at most this long: a pass's extra rows stop being cheap long before
MAX_DRAFT = 32
#: the longest n-gram looked up (3 then 2 then 1 tokens)
MAX_NGRAM = 3


class SpeculationError(ValueError):
    """A request speculative decoding cannot serve; the text says why and what to do."""


class Verifier(Protocol):
    """What the loop needs of a driver (`tp_driver.DistributedLlama`)."""

    last_stats: GenerationStats
    config: Any  # max_position_embeddings: drafts never run past the model's positions

    def step(self, sequences: Sequence[SequenceStep], stats: GenerationStats | None = None,
             last_only: bool = True) -> torch.Tensor: ...

    def truncate(self, session: str, length: int) -> None: ...

    def reset(self, *sessions: str) -> None: ...


def check_draft(draft: int) -> None:
    if not 0 <= draft <= MAX_DRAFT:
        raise SpeculationError(f"speculation drafts 0 to {MAX_DRAFT} tokens per pass, not {draft}")


def check_request(draft: int, sampling: SamplingParams) -> None:
    """Refuse what speculation cannot do exactly (one sentence each)."""
    check_draft(draft)
    if draft and sampling.temperature > 0:
        raise SpeculationError("speculative decoding verifies greedy choices only: use temperature 0, "
                               "or turn speculation off to sample")


def check_driver(llm: Verifier) -> None:
    """Refuse a driver whose nodes may compute a verified token differently from a decoded one."""
    if not getattr(llm, "token_invariant", False):
        raise SpeculationError("speculative decoding needs a driver made with token_invariant=True, or its "
                               "tokens could differ from greedy decoding's")
    for node, details in zip(getattr(llm, "nodes", ()), getattr(llm, "load_details", ()), strict=False):
        if not details.get("token_invariant"):
            raise SpeculationError(f"node {node.address} does not attend token by token (an older edgeweave?); "
                                   "upgrade it or turn speculation off")


def generate(
    llm: Verifier,
    prompt_ids: list[int],
    max_tokens: int,
    draft: int = DEFAULT_DRAFT,
    sampling: SamplingParams | None = None,
    stop: set[int] | frozenset[int] = frozenset(),
    session: str | None = None,
    logits_out: list[torch.Tensor] | None = None,
    max_ngram: int = MAX_NGRAM,
) -> Iterator[int]:
    """Yield up to `max_tokens` greedy tokens (a stop token is yielded, then the stream ends), as
    `DistributedLlama.generate` does, verifying up to `draft` looked-up tokens per pass (fewer
    while drafts keep being rejected: `DraftLength`).

    Stats land in `llm.last_stats` (passes, drafted, accepted; `token_s` holds each token's share
    of its pass's time)."""
    sampling = sampling or SamplingParams()
    check_request(draft, sampling)
    if draft:
        check_driver(llm)
    sampler = Sampler(sampling)  # greedy; still applies logit bias and penalties token by token
    stop_ids = set(stop) | set(sampling.stop_token_ids)
    sequence = SequenceStep(session or uuid.uuid4().hex[:12], list(prompt_ids), 0)
    lookup = PromptLookup(prompt_ids, max_ngram=max_ngram)
    length = DraftLength(draft)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    llm.last_stats = stats
    emitted = 0
    start = time.perf_counter()
    try:
        logits = llm.step([sequence], stats)  # the prefill: the first token's logits
        token = sampler.choose(logits[0])
        stats.ttft_s = time.perf_counter() - start
        if logits_out is not None:
            logits_out.append(logits[0])
        emitted += 1
        yield token
        while token not in stop_ids and emitted < max_tokens:
            start = time.perf_counter()
            # KV caches hold `history`; this pass adds the chosen token and a guess of what follows
            lookup.append(token)
            # a pass yields up to len(guess) + 1 tokens, and must fit the model's positions
            room = min(max_tokens - emitted - 1, llm.config.max_position_embeddings - len(sequence.history) - 1)
            guess = lookup.draft(min(length.current, room))
            sequence.cached = len(sequence.history)
            sequence.history += [token, *guess]
            logits = llm.step([sequence], stats, last_only=False)  # [1 + len(guess), vocab]
            stats.passes += 1
            stats.drafted += len(guess)
            chosen: list[int] = []
            for i in range(len(guess) + 1):
                token = sampler.choose(logits[i])
                chosen.append(token)
                if logits_out is not None:
                    logits_out.append(logits[i])
                if token in stop_ids or emitted + len(chosen) == max_tokens or i == len(guess) or token != guess[i]:
                    break
            accepted = len(chosen) - 1  # every chosen token but the last equalled its guess
            agreed = accepted + (accepted < len(guess) and chosen[-1] == guess[accepted])  # a stop token drafted
            stats.accepted += agreed
            length.update(len(guess), agreed)
            stats.pass_tokens += len(chosen)
            # the caches now hold history + token + guess: keep history + token + the accepted guesses
            keep = sequence.cached + 1 + accepted
            del sequence.history[keep:]
            lookup.extend(chosen[:-1])
            token = chosen[-1]
            finished = token in stop_ids or emitted + len(chosen) == max_tokens
            if accepted < len(guess) and not finished:
                llm.truncate(sequence.session, keep)
            share = (time.perf_counter() - start) / len(chosen)
            for t in chosen:
                stats.token_s.append(share)
                emitted += 1
                yield t
    finally:
        llm.reset(sequence.session)
