"""From token ids to the text a client sees: incremental detokenization plus OpenAI stop strings.

Stop strings are matched on text, not tokens (a stop may span tokens, or end inside one). While
streaming, the tail that could still be the start of a stop string is held back, so a client
never receives text that a later token turns into a stop; the streamed pieces always join to
exactly the non-streamed answer.
"""

from __future__ import annotations

from edgeweave.splitting.tokenizer import Tokenizer


class TextAssembler:
    """Feed token ids, get safe-to-send text deltas; `stopped` turns True when a stop string appears."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far (up to the stop string, once found)
        self._sent = 0  # how much of `text` has been released
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """The text that can be sent now after this token ('' if nothing new is safe yet)."""
        if self.stopped:
            return ""
        return self._add(self.decoder.feed(token_id), final=False)

    def finish(self) -> str:
        """The remaining text at the end of the generation (held-back tail, incomplete characters)."""
        if self.stopped:
            return self._release(len(self.text))
        return self._add(self.decoder.flush(), final=True)

    def _add(self, piece: str, final: bool) -> str:
        search_from = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        safe = len(self.text) if final else len(self.text) - self._partial_stop_suffix()
        return self._release(safe)

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta = self.text[self._sent : upto]
        self._sent = upto
        return delta
