"""The OpenAI fields `edgeweave serve` implements, through the real `openai` client (stream and not):
logprobs/top_logprobs (checked against the model's own log-softmax, computed here), logit_bias,
presence/frequency penalties, and n > 1 (rows of one batch), plus /metrics. A real server process
with the one-process reference engine (float32), so no cluster is needed."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from serve_process import serve_process

from edgeweave.runtime.llama import LlamaModel
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

pytestmark = [pytest.mark.llm, pytest.mark.slow]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--engine", "reference", "--quantize", "none"]
    with serve_process(args, tmp_path_factory.mktemp("fields"), {"OMP_NUM_THREADS": "1"}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        yield url, client, client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_checkpoint(open_checkpoint())


def test_completion_logprobs_are_the_models_log_softmax(server, tokenizer):
    """Greedy completion of token ids with logprobs=3: every reported value equals log_softmax of
    the reference model's logits at that position (computed here, float32, same file)."""
    _, client, model = server
    ids = tokenizer.encode_chat(QUESTION)
    answer = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, logprobs=3)
    lp = answer.choices[0].logprobs
    ck = open_checkpoint()
    reference = LlamaModel(ck.config, ck.tensor, set(ck.names()))
    generated = tokenizer.encode(answer.choices[0].text)
    logits = reference.forward(ids + generated, reference.new_cache(), 0)[len(ids) - 1:]
    expected = torch.log_softmax(logits, dim=-1)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for i, (token_lp, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        best = expected[i].topk(3)
        assert token_lp == pytest.approx(float(best.values[0]), abs=1e-3)  # greedy: the likeliest
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-3)
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert "".join(lp.tokens) == answer.choices[0].text


def test_chat_logprobs_streamed_and_not(server):
    _, client, model = server
    plain = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = plain.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == plain.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    entries = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(e.token, round(e.logprob, 4)) for e in content]
    no_logprobs = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, temperature=0)
    assert no_logprobs.choices[0].logprobs is None


def test_logit_bias_forbids_and_forces_tokens(server, tokenizer):
    _, client, model = server
    paris = tokenizer.encode(" Paris")
    assert len(paris) == 1
    plain = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    banned = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0,
                                            logit_bias={str(paris[0]): -100})
    assert " Paris" not in banned.choices[0].message.content
    forced = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=3, temperature=0,
                                            logit_bias={str(paris[0]): 100})
    assert forced.choices[0].message.content == " Paris" * 3


def test_frequency_and_presence_penalties_cut_repetition(server):
    """Greedy text that loops on a few tokens ("-of-the-day-...") gets more varied with either penalty."""
    _, client, model = server

    def distinct_share(**penalty) -> float:
        reply = client.completions.create(model=model, prompt="apple apple apple apple apple apple", max_tokens=30,
                                          temperature=0, logprobs=0, **penalty)
        tokens = reply.choices[0].logprobs.tokens
        return len(set(tokens)) / len(tokens)

    plain = distinct_share()
    assert distinct_share(frequency_penalty=1.0) > plain + 0.15
    assert distinct_share(presence_penalty=1.0) > plain + 0.15


def test_n_choices_are_rows_of_one_batch(server):
    """n=3 sampled with a seed: three indexed choices, reproducible; greedy n=2: two equal choices;
    streamed, every chunk names its choice and each choice finishes once."""
    url, client, model = server
    sampled = [client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=1.0,
                                              seed=11, n=3) for _ in range(2)]
    texts = [[c.message.content for c in sorted(reply.choices, key=lambda c: c.index)] for reply in sampled]
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    assert 3 <= sampled[0].usage.completion_tokens <= 30  # the three choices' tokens together
    greedy = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0, n=2,
                                            stream=True)
    pieces: dict[int, str] = {0: "", 1: ""}
    finishes = []
    for chunk in stream:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.index)
    assert sorted(finishes) == [0, 1]
    assert pieces[0] == pieces[1] == greedy.choices[0].message.content
    # the server's own figures: batches of two rows were run for the n=2 requests
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert _sample(metrics, 'edgeweave_batch_size_bucket{le="1.0"}') < _sample(metrics, "edgeweave_batch_size_count")


def _sample(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def test_metrics_count_tokens_requests_and_latencies(server):
    url, client, model = server
    before = httpx.get(f"{url}/metrics", timeout=10).text
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=5, temperature=0)
    after = httpx.get(f"{url}/metrics", timeout=10).text
    generated = _sample(after, "edgeweave_generated_tokens_total") - _sample(before, "edgeweave_generated_tokens_total")
    assert generated == answer.usage.completion_tokens
    assert _sample(after, "edgeweave_time_to_first_token_seconds_count") == \
        _sample(before, "edgeweave_time_to_first_token_seconds_count") + 1
    assert _sample(after, "edgeweave_time_per_output_token_seconds_count") >= \
        _sample(before, "edgeweave_time_per_output_token_seconds_count") + generated - 1
    finished = _sample(after, f'edgeweave_requests_total{{reason="{answer.choices[0].finish_reason}"}}')
    assert finished >= 1 and _sample(after, "edgeweave_queue_depth") == 0
    assert _sample(after, "edgeweave_active_sequences") == 0
    assert math.isclose(_sample(after, "edgeweave_recoveries_total"), 0)
