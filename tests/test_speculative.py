"""Speculative decoding's parts without processes: prompt-lookup drafts against a brute-force
scan, the draft-length schedule, attention of a row at an offset (exact token by token), the
loop's refusals and limits over in-process members, and `edgeweave run --speculate` input checks.
The real 2-node cluster runs are in test_speculative_cluster.py."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from llm_reference import one_torch_thread  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
from typer.testing import CliRunner

from edgeweave.config import CoordinatorSettings
from edgeweave.coordinator import speculative
from edgeweave.coordinator.local_member import LocalMember
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.runtime.layer_compute import BatchInvariantMatmuls, FloatMatmuls, torch_threads
from edgeweave.runtime.llama import LayerKV, Rotary, batched_attention
from edgeweave.runtime.prompt_lookup import DraftLength, PromptLookup
from edgeweave.runtime.sampling import SamplingParams
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.random_llama import PRESETS, write_random_llama

#: untied embeddings and 3 KV heads: a random model whose greedy text falls into varied loops, so
#: drafts are sometimes right and sometimes wrong (the tied preset only repeats its last token)
UNTIED = dataclasses.replace(PRESETS["tiny"], tie_word_embeddings=False, num_heads=6, num_kv_heads=3)


def scanned_draft(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """What `PromptLookup.draft` must return, by scanning the whole history (the slow definition)."""
    end = len(tokens)
    for n in range(min(max_ngram, end), min_ngram - 1, -1):
        suffix = tokens[end - n:]
        # the newest earlier occurrence that has a continuation: it starts at most at end - n - 1
        for j in range(end - n - 1, -1, -1):
            if tokens[j:j + n] == suffix:
                out: list[int] = []
                for i in range(j + n, j + n + k):
                    out.append(tokens[i] if i < end else out[i - end])
                return out
    return []


def test_drafts_equal_a_scan_of_the_whole_history():
    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([2, 3, 5, 20])
        lookup, tokens = PromptLookup(max_ngram=3), []
        for _ in range(60):
            token = rng.randrange(vocab)
            lookup.append(token)
            tokens.append(token)
            for k in (1, 4):
                assert lookup.draft(k) == scanned_draft(tokens, k), (trial, tokens, k)


def test_the_longest_ngram_wins_then_the_newest_occurrence():
    # "1 2 3" occurred once (followed by 4); "3" alone occurred later (followed by 9)
    assert PromptLookup([1, 2, 3, 4, 5, 3, 9, 1, 2, 3]).draft(2) == [4, 5]
    assert PromptLookup([7, 3, 9, 5, 3, 8, 3]).draft(1) == [8]  # the newest earlier "3"
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing occurred before
    assert PromptLookup([1, 2, 3, 4, 3], min_ngram=2).draft(4) == []  # a 1-gram match is not enough here
    assert PromptLookup([5, 6, 5, 6]).draft(5) == [5, 6, 5, 6, 5]  # copying on with the same period
    assert PromptLookup([1, 2, 3]).draft(0) == []


def test_truncate_forgets_what_was_cut():
    lookup = PromptLookup([1, 2, 3, 4, 1, 2])
    assert lookup.draft(2) == [3, 4]
    lookup.truncate(3)
    assert lookup.tokens == [1, 2, 3] and lookup.draft(2) == []
    lookup.extend([1, 2])
    assert lookup.draft(1) == [3]


def test_bad_ngram_sizes_are_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(min_ngram=0)


def test_draft_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    length = DraftLength(8)
    assert length.current == 2
    length.update(2, 2)
    length.update(4, 4)
    length.update(6, 6)
    assert length.current == 8  # capped
    length.update(8, 3)
    length.update(7, 0)
    assert length.current == 6
    for _ in range(10):
        length.update(length.current, 0)
    assert length.current == 1  # never below one guess
    length.update(0, 0)  # a pass without a draft says nothing
    assert length.current == 1
    assert DraftLength(0).current == 0
    assert CoordinatorSettings.speculate == speculative.DEFAULT_DRAFT


def _attention_case(sliding_window: int | None):
    torch.manual_seed(0)
    hidden, head_dim, n_q, n_kv = 32, 8, 4, 2
    weights = {"wq": torch.randn(n_q * head_dim, hidden) * 0.3, "wk": torch.randn(n_kv * head_dim, hidden) * 0.3,
               "wv": torch.randn(n_kv * head_dim, hidden), "wo": torch.randn(hidden, n_q * head_dim),
               "w_gate": torch.randn(16, hidden), "w_up": torch.randn(16, hidden), "w_down": torch.randn(hidden, 16)}
    plain = FloatMatmuls(weights)
    rotary = Rotary(head_dim, 10000.0, None)

    def run(x, caches, positions, lengths, token_invariant):
        # what a token-invariant node runs: row-invariant matmuls too (DistributedLlama implies them)
        matmuls = BatchInvariantMatmuls(plain) if token_invariant else plain
        return batched_attention(x, matmuls, caches, positions, lengths, rotary, head_dim,
                                 sliding_window=sliding_window, token_invariant=token_invariant)

    return hidden, n_kv, head_dim, run


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("token_invariant", [False, True])
def test_a_row_at_an_offset_attends_causally_and_token_by_token_exactly(sliding_window, token_invariant):
    """A chunk of 5 tokens after 7 cached ones (the verify pass of a draft), next to another
    session's row: what decoding the 5 one by one gives, and what one prefill from 0 gives (the
    causal mask's reference); token by token bitwise what decoding gives."""
    hidden, n_kv, head_dim, run = _attention_case(sliding_window)
    x, other, side_prefix = torch.randn(12, hidden), torch.randn(3, hidden), torch.randn(4, hidden)

    def cache(tokens: torch.Tensor) -> LayerKV:
        kv = LayerKV(n_kv, head_dim, torch.float32, chunk=8)  # 8: the chunk's append grows the cache
        run(tokens, [kv], [0], [tokens.shape[0]], token_invariant)
        return kv

    decode_kv = cache(x[:7])
    decoded = torch.cat([run(x[i:i + 1], [decode_kv], [i], [1], token_invariant) for i in range(7, 12)])
    whole = run(x, [LayerKV(n_kv, head_dim, torch.float32)], [0], [12], token_invariant)[7:]
    kv, side = cache(x[:7]), cache(side_prefix)
    out = run(torch.cat([x[7:], other]), [kv, side], [7, 4], [5, 3], token_invariant)[:5]
    torch.testing.assert_close(out, decoded, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, decoded) or not token_invariant
    assert kv.length == 12 and side.length == 7


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return open_checkpoint(write_random_llama(tmp_path_factory.mktemp("untied"), UNTIED, seed=0))


@pytest.fixture(scope="module")
def in_process(untied, tmp_path_factory):
    """The random model over two in-process members (the coordinator's own executors): the loop's
    logic without processes."""
    members = [LocalMember(), LocalMember()]
    with DistributedLlama(untied, members, [1.0, 1.0], cache_dir=tmp_path_factory.mktemp("cache"),
                          token_invariant=True) as llm:
        yield llm


PROMPT = [random.Random(3).randrange(512) for _ in range(30)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden", [96, 576])
def test_float_rows_of_a_batch_invariant_matmul_do_not_depend_on_the_batch(threads, hidden):
    """The property `in_row_blocks` gives on the BLAS this runs with: a row gets the same bits alone
    (as a decode) and at any place of a batch of any size (a verify pass, a prefill of several
    blocks). Two shapes: MKL on AVX-512 switches kernels at 5 rows for the small one, at 16 for the
    SmolLM2-sized one."""
    torch.manual_seed(1)
    inner, mlp = hidden * 2 // 3, hidden * 5 // 3
    matmuls = BatchInvariantMatmuls(FloatMatmuls({
        "wq": torch.randn(inner, hidden), "wk": torch.randn(inner // 2, hidden), "wv": torch.randn(inner // 2, hidden),
        "wo": torch.randn(hidden, inner), "w_gate": torch.randn(mlp, hidden), "w_up": torch.randn(mlp, hidden),
        "w_down": torch.randn(hidden, mlp)}))
    x = torch.randn(1, hidden)
    with torch_threads(threads):
        alone = [f(x) for f in (matmuls.qkv, matmuls.mlp)]
        for rows in [*range(1, 18), 31, 40]:
            for place in {0, rows // 2, rows - 1}:
                batch = torch.randn(rows, hidden)
                batch[place] = x[0]
                for f, expected in zip((matmuls.qkv, matmuls.mlp), alone, strict=True):
                    assert torch.equal(f(batch)[place : place + 1], expected), (rows, place)


def test_max_tokens_inside_an_accepted_run_is_exact(in_process):
    """Float shards: every verified token's logits are bitwise those of decoding it."""
    plain_logits: list[torch.Tensor] = []
    spec_logits: list[torch.Tensor] = []
    plain = list(in_process.generate(PROMPT, 40, logits_out=plain_logits))
    full = list(speculative.generate(in_process, PROMPT, 40, 8, logits_out=spec_logits))
    assert full == plain and in_process.last_stats.tokens_per_pass > 2
    assert all(torch.equal(a, b) for a, b in zip(plain_logits, spec_logits, strict=True))
    for n in (1, 2, 7, 13):
        logits: list[torch.Tensor] = []
        assert list(speculative.generate(in_process, PROMPT, n, 8, logits_out=logits)) == plain[:n]
        assert len(logits) == n
    assert all(s["sessions"] == {} for s in in_process.node_stats())


def test_sampling_and_drivers_that_are_not_token_invariant_are_refused(in_process, untied, tmp_path):
    with pytest.raises(speculative.SpeculationError, match="greedy choices only"):
        list(speculative.generate(in_process, PROMPT, 4, 4, SamplingParams(temperature=0.7)))
    with pytest.raises(speculative.SpeculationError, match="drafts 0 to 32"):
        list(speculative.generate(in_process, PROMPT, 4, 33))
    with DistributedLlama(untied, [LocalMember()], [1.0], cache_dir=tmp_path) as plain_driver:
        with pytest.raises(speculative.SpeculationError, match="token_invariant=True"):
            list(speculative.generate(plain_driver, PROMPT, 4, 4))
        # off is plain decoding, on any driver, sampling too
        assert len(list(speculative.generate(plain_driver, PROMPT, 3, 0, SamplingParams(temperature=0.7, seed=1)))) == 3


def _run_cli(tmp_path, *args: str):
    from edgeweave.cli import app

    env = {"EDGEWEAVE_CONFIG": str(tmp_path / "none.toml"), "EDGEWEAVE_CACHE": str(tmp_path / "cache")}
    return CliRunner().invoke(app, ["run", "-p", "hi", "--discovery-timeout", "0", *args], env=env)


@pytest.mark.parametrize(("args", "words"), [
    (["--speculate", "-1"], "drafts 0 to 32 tokens per pass, not -1"),
    (["--speculate", "40"], "not 40"),
    (["--speculate", "4", "--temperature", "0.7"], "verifies greedy choices only"),
])
def test_cli_refuses_bad_speculation_in_one_sentence(tmp_path, args, words):
    result = _run_cli(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert words in result.output and "--speculate" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
