"""Speculative decoding over a real 2-node local cluster (the session's `two_nodes`): exactly the
greedy tokens of plain decoding on the shipped SmolLM2 (4-bit) and on a random Llama, with
drafts accepted and with drafts mostly rejected; a stop token inside an accepted draft; the
nodes' KV caches cut back to the accepted length; a node killed mid-run; `edgeweave run --speculate`.

The tests run in file order: the CLI test's driver and the module's `smol` driver load the same
job, so the CLI runs before `smol` exists; the node-loss tests come last (they restart node 1)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from llm_reference import (
    one_torch_thread,  # noqa: F401 - an autouse fixture: this module's torch runs on one thread
    smollm,
)
from test_speculative import UNTIED
from typer.testing import CliRunner

from edgeweave.coordinator import speculative
from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.random_llama import write_random_llama
from edgeweave.splitting.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

#: drafts are mostly right: the answer copies the prompt's names and phrases
REWRITE = ("Rewrite the following paragraph in the past tense, keeping every name: Tom Pearce lives in the old "
           "lighthouse on the hill. Every night he climbs the 112 steps of the white tower and lights the lamp, so "
           "that the boats of Saltmarsh Bay find their way home.")
#: drafts are mostly wrong: new text, little to copy
CREATIVE = "Invent five unusual names for a coffee shop and say in one line why each is good."
N_SMOL = 24


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("speculative-cache")


@pytest.fixture(scope="module")
def chat_ids():
    tokenizer = Tokenizer.from_checkpoint(smollm())
    return {name: tokenizer.encode_chat([{"role": "user", "content": text}])
            for name, text in (("rewrite", REWRITE), ("creative", CREATIVE))}


def _clients(cluster) -> list[NodeClient]:
    return [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]


@pytest.fixture(scope="module")
def smol(two_nodes, cache_dir):
    """The shipped SmolLM2 Q4_1 GGUF, kept 4-bit, over the two nodes, token-invariant."""
    with DistributedLlama(smollm(), _clients(two_nodes), [1.0, 1.0], cache_dir=cache_dir,
                          token_invariant=True) as llm:
        yield llm


class Recorder:
    """A real driver, watched: where each pass starts in the yielded tokens, and after every pass
    and rollback the KV length each node reports for the session (its JobStats)."""

    def __init__(self, llm: DistributedLlama, tokens: list[int]) -> None:
        self.llm, self.tokens = llm, tokens
        self.pass_starts: list[int] = []
        self.rollbacks = 0
        self.on_step = self.on_truncate = None

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def __setattr__(self, name, value):
        if name == "last_stats":
            self.llm.last_stats = value
        else:
            super().__setattr__(name, value)

    def node_lengths(self, session: str) -> list[int]:
        """The session's KV length on every node holding a KV cache."""
        every = self.llm.node_stats()
        return [every[r]["sessions"].get(session) for r in self.llm._kv_ranks()]

    def step(self, sequences, stats=None, last_only=True):
        if self.on_step:
            self.on_step(len(self.pass_starts))
        logits = self.llm.step(sequences, stats, last_only)
        if not last_only:
            self.pass_starts.append(len(self.tokens))
        [seq] = sequences
        assert self.node_lengths(seq.session) == [len(seq.history)] * len(self.llm.nodes)
        return logits

    def truncate(self, session, length):
        if self.on_truncate:
            self.on_truncate(self.rollbacks)
        self.llm.truncate(session, length)
        self.rollbacks += 1
        if self.on_truncate is None:
            assert self.node_lengths(session) == [length] * len(self.llm.nodes)  # the next pass starts there


def _speculate(recorder: Recorder, prompt, n, stop=frozenset(), logits_out=None) -> list[int]:
    for token in speculative.generate(recorder, prompt, n, 8, stop=stop, logits_out=logits_out):
        recorder.tokens.append(token)
    return recorder.tokens


@pytest.mark.llm
def test_cli_run_speculates_and_reports_it(two_nodes, cache_dir, chat_ids, request):
    """`edgeweave run --speculate 8 --json` over the two nodes: the greedy tokens of plain
    decoding (by the module's driver, loaded after the CLI unloaded the job), and its stats."""
    from edgeweave.cli import app

    args = ["run", "-p", REWRITE, "--max-tokens", "12", "--speculate", "8", "--weights", "1,1", "--json",
            "--cache-dir", str(cache_dir), *[a for address in two_nodes.addresses for a in ("--peer", address)]]
    result = CliRunner().invoke(app, args, env={"EDGEWEAVE_CONFIG": str(cache_dir / "none.toml")})
    assert result.exit_code == 0, result.output[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["speculate"] == 8 and out["passes"] > 0 and out["tokens_per_pass"] > 1.5
    assert out["accepted"] <= out["drafted"] and len(out["tokens"]) == 12
    plain = request.getfixturevalue("rewrite")[0]
    assert out["tokens"] == plain[:12]


def _plain_and_speculative(llm: DistributedLlama, prompt: list[int], n: int, stop=frozenset()):
    """(plain greedy tokens, their round trips, speculative tokens, its stats, its Recorder), after
    checking that every token was chosen from bitwise the same logits both ways."""
    plain_logits: list[torch.Tensor] = []
    spec_logits: list[torch.Tensor] = []
    plain = list(llm.generate(prompt, n, stop=stop, logits_out=plain_logits))
    plain_trips = llm.last_stats.round_trips
    recorder = Recorder(llm, [])
    spec = _speculate(recorder, prompt, n, stop, spec_logits)
    assert len(spec_logits) == len(spec) and all(
        torch.equal(a, b) for a, b in zip(plain_logits, spec_logits, strict=False))
    return plain, plain_trips, spec, llm.last_stats, recorder


@pytest.fixture(scope="module")
def rewrite(smol, chat_ids):
    return _plain_and_speculative(smol, chat_ids["rewrite"], N_SMOL, set(smollm().config.eos_token_ids))


@pytest.mark.llm
def test_smollm_drafts_accepted_give_exactly_the_greedy_tokens_in_fewer_passes(smol, rewrite):
    """Bitwise the same numbers per token (the driver is token-invariant), so the same tokens,
    here with most drafts right: the answer copies the prompt."""
    plain, plain_trips, spec, stats, recorder = rewrite
    assert spec == plain
    assert stats.round_trips == 2 * smol.config.num_layers * (1 + stats.passes)  # the prefill, then the passes
    assert stats.tokens_per_pass >= 2.0 and stats.round_trips < plain_trips / 2
    assert all(s["sessions"] == {} for s in smol.node_stats())


@pytest.mark.llm
def test_smollm_drafts_mostly_rejected_give_exactly_the_greedy_tokens(smol, chat_ids):
    plain, _, spec, stats, recorder = _plain_and_speculative(smol, chat_ids["creative"], N_SMOL,
                                                            set(smollm().config.eos_token_ids))
    assert spec == plain
    assert stats.drafted > 0 and stats.accepted < stats.drafted / 2 and recorder.rollbacks > 0


@pytest.mark.llm
def test_a_stop_token_inside_an_accepted_draft_ends_the_text_there(smol, chat_ids, rewrite):
    """A token the answer copies from the prompt, first generated inside an accepted draft, made
    the stop token: the text ends with it, as plain decoding's would (which stops at its first
    occurrence), though the pass that verified it accepted more."""
    plain, _, spec, _, recorder = rewrite
    ends = {start - 1 for start in recorder.pass_starts[1:]} | {len(spec) - 1}  # each pass's last token
    inside = [j for j in range(1, len(spec)) if j not in ends and spec[j] not in spec[:j]]
    assert inside, "no token first appears inside an accepted draft: pick another prompt"
    j = inside[len(inside) // 2]
    assert _speculate(Recorder(smol, []), chat_ids["rewrite"], N_SMOL, stop={spec[j]}) == plain[: j + 1]
    assert all(s["sessions"] == {} for s in smol.node_stats())


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return open_checkpoint(write_random_llama(tmp_path_factory.mktemp("untied"), UNTIED, seed=0))


@pytest.fixture(scope="module")
def tiny(two_nodes, untied, cache_dir):
    with DistributedLlama(untied, _clients(two_nodes), [1.0, 1.0], cache_dir=cache_dir, token_invariant=True) as llm:
        yield llm


PROMPTS = [[random.Random(seed).randrange(512) for _ in range(30)] for seed in range(2)]
#: a prompt whose greedy text has no near-tie (its smallest top-2 logit margin is above 1e-3)
#: and a few rejected drafts
ROBUST_PROMPT = [random.Random(9).randrange(512) for _ in range(30)]
N_TINY = 60


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_random_llama_rolls_back_node_caches_to_the_accepted_length(tiny, prompt):
    plain, _, spec, stats, recorder = _plain_and_speculative(tiny, PROMPTS[prompt], N_TINY)
    assert spec == plain
    assert recorder.rollbacks > 0 and 0 < stats.accepted < stats.drafted  # some drafts right, some wrong
    assert all(s["sessions"] == {} for s in tiny.node_stats())


def _min_margin(logits: list[torch.Tensor]) -> float:
    return min(float(top[0] - top[1]) for top in (row.topk(2).values for row in logits))


@pytest.mark.parametrize("when", ["between passes", "before a rollback"])
def test_a_node_lost_mid_run_still_gives_the_greedy_tokens(two_nodes, untied, cache_dir, when):
    """Node 1 is killed before the 4th pass, or before the first rollback (the truncate fails and
    the session is prefilled again); the step recovers on node 0 alone, prefilling only accepted
    tokens, and the text goes on as the intact cluster's plain decoding. The survivor sums in
    another order, so the reference must not hinge on a near-tie: its smallest top-2 margin is checked."""
    try:
        with DistributedLlama(untied, _clients(two_nodes), [1.0, 1.0], cache_dir=cache_dir,
                              token_invariant=True) as llm:
            logits: list[torch.Tensor] = []
            reference = list(llm.generate(ROBUST_PROMPT, N_TINY, logits_out=logits))
            assert _min_margin(logits) > 1e-3 and not llm.last_stats.recoveries
            recorder = Recorder(llm, [])

            def kill(count: int, at: int) -> None:
                if count == at:
                    two_nodes.kill(1)

            if when == "between passes":
                recorder.on_step = lambda count: kill(count, 3)
            else:
                recorder.on_truncate = lambda count: kill(count, 0)
            assert _speculate(recorder, ROBUST_PROMPT, N_TINY) == reference
            [record] = llm.last_stats.recoveries
            assert record["lost_node"] == two_nodes.addresses[1] and record["nodes_left"] == 1
            assert llm.fused  # the survivor holds the whole model now
    finally:
        two_nodes.restart(1)
