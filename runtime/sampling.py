"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded generator;
OpenAI's presence/frequency penalties and logit bias; log-probabilities of what was chosen.

A seeded `torch.Generator` makes a sampled run reproducible, so a distributed run can be compared
with a single-process one token for token even when sampling.

Order, as OpenAI documents it: the logit bias and the penalties (over the tokens this sampler has
chosen so far: mu[j] - c[j] * frequency - (c[j] > 0) * presence) adjust the logits; the reported
log-probabilities are of that adjusted distribution, before temperature and top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias) pairs added to the logits (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: how many alternatives to report per token with `Sampler.pick` (None: no log-probabilities)
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100.0 <= bias <= 100.0 or token < 0 for token, bias in self.logit_bias):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenChoice:
    """A chosen token with its log-probability and the `top` most likely alternatives (token, logprob)."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Stateful chooser: holds the generator so successive tokens continue one random stream."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        #: how often each token was chosen so far (the penalties' c[j])
        self.counts: dict[int, int] = {}
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self._bias = torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> int:
        return self.choose(logits)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token id from a [vocab] logits vector."""
        return self.pick(logits).token

    def pick(self, logits: torch.Tensor) -> TokenChoice:
        """The next token from a [vocab] logits vector, with log-probabilities when asked for."""
        p = self.params
        logits = self.adjust(logits.float().reshape(-1))
        if p.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(filter_logits(logits / p.temperature, p.top_k, p.top_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        if p.top_logprobs is None:
            return TokenChoice(token)
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, p.top_logprobs) if p.top_logprobs else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        return TokenChoice(token, float(logprobs[token]), alternatives)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit bias and penalties applied (a copy; the input is left alone)."""
        p = self.params
        if not p.adjusts_logits:
            return logits
        logits = logits.clone()
        if self._bias is not None:
            ids, values = self._bias
            if int(ids.max()) >= logits.numel():
                raise ValueError(f"logit_bias names token {int(ids.max())}, past the vocabulary of {logits.numel()}")
            logits.index_add_(0, ids, values)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            logits.index_add_(0, ids, -(counts * p.frequency_penalty + p.presence_penalty))
        return logits

    def is_stop(self, token: int) -> bool:
        return token in self.params.stop_token_ids


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits[order[drop]] = float("-inf")
    return logits
