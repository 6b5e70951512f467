"""`edgeweave serve` end to end: the real `openai` client against the real server process over a
real 2-node SmolLM2 cluster (LocalCluster). Expected answers come from HF transformers.

One cluster and one server for the whole module (they take ~30 s to start on 2 cores).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from llm_reference import CHAT, hf_model, hf_reference, hf_tokenizer
from serve_process import serve_process

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.local_cluster import LocalCluster

pytestmark = [pytest.mark.llm, pytest.mark.slow]

N_TOKENS = 10
QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
    "What do bees make?", "Which planet is the largest?", "What is the opposite of hot?", "Name a fruit.",
]


@dataclass
class Served:
    url: str
    model: str
    cluster: LocalCluster
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/status", timeout=10).json()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with LocalCluster(2, advertise=False) as cluster:
        args = ["--weights", "1,1", "--quantize", "none",  # the answers are compared with transformers' float32 ones
                "--peer", cluster.addresses[0], "--peer", cluster.addresses[1]]
        with serve_process(args, tmp) as url:
            model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            yield Served(url, model, cluster, tmp / "serve.log")


def hf_greedy_text(messages: list[dict], n_tokens: int) -> str:
    """HF transformers' greedy answer, decoded as the server decodes (special tokens skipped)."""
    tok, model = hf_tokenizer(), hf_model()
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_chat_equals_transformers_streamed_and_not(served):
    ref = hf_reference()
    expected = hf_tokenizer().decode(ref.tokens[:N_TOKENS], skip_special_tokens=True)
    client = served.client()
    reply = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=N_TOKENS)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ref.prompt_ids), N_TOKENS)

    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=N_TOKENS,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == N_TOKENS

    # one log sentence per request, with its numbers
    request_id = reply.id.removeprefix("chatcmpl-")
    line = next(line for line in served.log.read_text().splitlines() if f"request {request_id} " in line)
    assert re.search(rf"{len(ref.prompt_ids)} prompt tokens, {N_TOKENS} completion tokens, ttft \d+ ms, "
                     r"[\d.]+ tok/s, finished by length", line), line


def test_stop_strings_cut_the_text_in_both_modes(served):
    full = hf_tokenizer().decode(hf_reference().tokens[:N_TOKENS], skip_special_tokens=True)
    stop = " " + full.split(" ")[3]  # a word in the middle of the answer, spanning no special token
    expected = full[: full.index(stop)]
    client = served.client()
    reply = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=N_TOKENS,
                                           stop=[stop, "never appears"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < N_TOKENS
    chunks = list(client.completions.create(model=served.model, prompt=hf_tokenizer().apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False), temperature=0, max_tokens=N_TOKENS, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_get_their_greedy_answers(served):
    expected = [hf_greedy_text([{"role": "user", "content": q}], 4) for q in QUESTIONS]
    client = served.client()

    def ask(question: str) -> str:
        reply = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=4)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    assert answers == expected
    assert all(answers)


def test_disconnect_cancels_and_frees_the_cluster(served):
    body = {"model": served.model, "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "temperature": 0, "max_tokens": 300, "stream": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{served.url}/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        seen = []
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[6:]))
            if len(seen) >= 4:
                break  # leaving the block closes the connection mid-stream
    cancelled_id = seen[0]["id"].removeprefix("chatcmpl-")

    follow_up = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Name a fruit."}], temperature=0, max_tokens=2)
    assert follow_up.choices[0].message.content

    recent = {r["id"]: r for r in served.status()["scheduler"]["recent"]}
    assert recent[cancelled_id]["finish_reason"] == "disconnected"
    assert recent[cancelled_id]["completion_tokens"] < 300
    # the nodes hold no KV cache for any session: the cancelled one was reset
    for node in served.status()["engine"]["nodes"]:
        with NodeClient(node["address"]) as client:
            assert client.job_stats(node["job_id"])["sessions"] == {}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "M"}, 400, "messages"),
        ({"model": "M", "messages": "hello"}, 400, "messages"),
        ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "gpt-nothing", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ],
)
def test_malformed_requests_get_openai_errors(served, body, status, param):
    body = {**body, "model": served.model if body["model"] == "M" else body["model"]}
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].endswith(".")


def test_openai_client_sees_clear_errors_and_server_stays_up(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        client.chat.completions.create(model=served.model, messages=CHAT, n=17)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    bad_json = httpx.post(f"{served.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=10)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    assert [m.id for m in client.models.list()] == [served.model]
    assert httpx.get(f"{served.url}/health", timeout=10).json()["status"] == "ok"


def test_status_command_shows_nodes_plan_and_speed(served):
    argv = [sys.executable, "-m", "edgeweave", "status", "--interface", "127.0.0.1", "--timeout", "0.2",
            "--peer", served.cluster.addresses[0], "--peer", served.cluster.addresses[1], "--server", served.url,
            "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    nodes = {row["address"]: row for row in report["nodes"]}
    for address in served.cluster.addresses:
        assert nodes[address]["cores"] > 0 and nodes[address]["total_memory"] > 0 and nodes[address]["jobs"]
    server = report["server"]
    assert server["model"] == served.model
    plan = server["engine"]["nodes"]
    assert sum(n["kv_heads"] for n in plan) == 3 and sum(n["columns"] for n in plan) == 1536
    assert server["scheduler"]["recent_requests"] > 0 and server["scheduler"]["median_tokens_per_s"] > 0
