"""Rows of a batched step: which sequence each slice of a [tokens, hidden] state belongs to.

Continuous batching puts several sequences into one step: a decode row is one token, a prefill
chunk several. The hidden state is all their tokens stacked ([sum of lengths, hidden]); a `Row`
says whose KV cache a slice attends to and where in that sequence it starts. Matmuls run once over
the whole state; only attention is per row. A step with one row is the unbatched case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: prompt tokens a scheduler lets new requests feed per step, all together (the rest waits a step):
#: bounded so a long prompt joining delays the running streams by one modest step, not a whole prefill
DEFAULT_PREFILL_CHUNK = 128


class RowsError(ValueError):
    """The rows do not describe the tensor they come with (a malformed request)."""


@dataclass(frozen=True, slots=True)
class Row:
    """`length` consecutive tokens of `session`'s sequence, the first at `position`."""

    session: str
    position: int
    length: int


def check_rows(rows: Sequence[Row], n_tokens: int) -> None:
    """Refuse rows that do not tile `n_tokens` exactly, or that name one session twice (two slices
    of one sequence in one step would race on its KV cache)."""
    if not rows:
        raise RowsError("a batched step needs at least one row")
    if any(row.length < 1 or row.position < 0 for row in rows):
        raise RowsError("every row needs length >= 1 and position >= 0")
    total = sum(row.length for row in rows)
    if total != n_tokens:
        raise RowsError(f"the rows cover {total} tokens but the hidden state has {n_tokens}")
    if len({row.session for row in rows}) != len(rows):
        raise RowsError("a session appears in more than one row of the same step")


def last_token_indexes(rows: Sequence[Row]) -> list[int]:
    """Index of each row's last token in the stacked state: where its next-token logits come from."""
    out, end = [], 0
    for row in rows:
        end += row.length
        out.append(end - 1)
    return out


@dataclass(slots=True)
class SequenceStep:
    """One sequence's part of a batched step, as the scheduler hands it to an engine: every token
    its KV cache must hold after the step (`history`), of which the first `cached` are held already.
    An engine that lost the cache (a node failed) can rebuild it from `history`."""

    session: str
    history: list[int]
    cached: int
