"""`edgeweave serve` protects itself: an API key (401 without it), a body limit answered 413 before
parsing while /health keeps answering, 400s naming the fields it does not implement, and no open
non-loopback server unless asked. A real server process (the one-process reference engine, so no
cluster is needed), the real `openai` client and raw HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from serve_process import serve_process

pytestmark = pytest.mark.llm

KEY = "s3cret-key"
LIMIT = 64 * 1024
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--engine", "reference", "--quantize", "none", "--api-key", KEY, "--max-body-bytes", str(LIMIT)]
    with serve_process(args, tmp_path_factory.mktemp("guard"), {"OMP_NUM_THREADS": "1"}) as url:
        model = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        yield url, model["data"][0]["id"]


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_api_key_is_required_on_v1_and_health_stays_open(server):
    url, model = server
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", headers
    with pytest.raises(openai.AuthenticationError, match="API key"):
        _client(url, "wrong").models.list()
    assert _client(url).models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(url).models.retrieve("no-such-model")
    answer = _client(url).chat.completions.create(model=model, messages=HI, max_tokens=2, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 2


def test_oversized_bodies_get_413_while_health_answers(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (5 * 1024 * 1024) + b'"}]}'
    replies: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: replies.append(
        httpx.post(f"{url}/v1/chat/completions", content=huge, headers=auth, timeout=60)))
    health_s = []
    # one client, connected before the upload: each figure is the server's answer, not a new httpx
    # client (its TLS context and CA bundle: tens of ms of CPU) plus a TCP handshake
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/health").status_code == 200
        sender.start()
        while sender.is_alive() or not health_s:
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            health_s.append(time.perf_counter() - start)
    sender.join()
    assert replies[0].status_code == 413 and replies[0].json()["error"]["code"] == "request_too_large"
    assert max(health_s) < 0.1, health_s

    def chunked():  # no Content-Length: the guard counts what arrives
        for _ in range(LIMIT // 1024 + 8):
            yield b" " * 1024

    reply = httpx.post(f"{url}/v1/completions", content=chunked(), headers=auth, timeout=60)
    assert reply.status_code == 413 and str(LIMIT) in reply.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}),
    ("modalities", ["text", "audio"]),
    ("top_logprobs", 3),  # without logprobs=true
    ("logit_bias", {"not-a-token": 5}),
    ("n", 17),
    ("frobnicate", 1),
])
def test_unimplemented_or_unknown_fields_are_400s_naming_them(server, field, value):
    url, model = server
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": HI, field: value},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field and field in reply.json()["error"]["message"]


def test_unknown_fields_inside_messages_are_400s_naming_them(server):
    url, model = server
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": messages},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.name", reply.text


def test_fields_that_ask_for_nothing_and_out_of_range_numbers(server):
    url, model = server
    client = _client(url)
    answer = client.chat.completions.create(model=model, messages=HI, max_tokens=1, logprobs=False,
                                            presence_penalty=0, response_format={"type": "text"}, seed=7)
    assert answer.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=HI, max_tokens=1, seed=2**70)
    assert info.value.body["param"] == "seed"


def test_serving_beyond_loopback_without_a_key_is_refused_in_one_sentence(tmp_path):
    env = {**os.environ, "EDGEWEAVE_CACHE": str(tmp_path)}
    env.pop("EDGEWEAVE_COORDINATOR_API_KEY", None)
    result = subprocess.run([sys.executable, "-m", "edgeweave", "serve", "--host", "0.0.0.0", "--engine", "reference"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "reachable from other machines" in result.stderr and "Traceback" not in result.stderr
