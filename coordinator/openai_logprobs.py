"""Log-probabilities in OpenAI's two shapes, from the scheduler's `TokenChoice`s.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`.
Legacy completions: `{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}`.
A token's text is that token decoded alone (a piece of a multi-byte character shows as U+FFFD,
as OpenAI's does; `bytes` are its UTF-8 bytes).
"""

from __future__ import annotations

from typing import Any

from edgeweave.runtime.sampling import TokenChoice
from edgeweave.splitting.tokenizer import Tokenizer


def _piece(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_entry(tokenizer: Tokenizer, choice: TokenChoice) -> dict[str, Any]:
    """One element of a chat choice's `logprobs.content`."""
    text = _piece(tokenizer, choice.token)
    return {
        "token": text, "logprob": choice.logprob, "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": (alt := _piece(tokenizer, token)), "logprob": logprob, "bytes": list(alt.encode())}
            for token, logprob in choice.top
        ],
    }


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token (text offsets included)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0
        self.clear()

    def clear(self) -> None:
        """Start a new object (each streamed chunk carries the tokens since the last one)."""
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, choice: TokenChoice) -> None:
        text = _piece(self.tokenizer, choice.token)
        self.tokens.append(text)
        self.token_logprobs.append(choice.logprob)
        self.top_logprobs.append({_piece(self.tokenizer, t): lp for t, lp in choice.top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}
