"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
plus `/health`, `/v1/status`, `/metrics` (Prometheus) and the web page at `/`.

Requests become `GenerationJob`s on the `Scheduler`; tokens come back from the scheduler thread
through an asyncio queue. Streaming uses server-sent events exactly as OpenAI does (chunks, then
`data: [DONE]`). A client that goes away cancels its job between two tokens. Every error has
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for malformed requests
(FastAPI's 422 included) and for fields this server does not implement, 401 without the API key,
404 for an unknown model, 413 for a body over the limit (`http_guard`), 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeweave import __version__
from edgeweave.coordinator.client import NodeError
from edgeweave.coordinator.engine import TextEngine
from edgeweave.coordinator.http_guard import RequestGuard, error_response
from edgeweave.coordinator.openai_logprobs import CompletionLogprobs, chat_entry
from edgeweave.coordinator.scheduler import GenerationJob, QueueFull, Scheduler
from edgeweave.coordinator.serving_metrics import ServingMetrics
from edgeweave.coordinator.text_output import TextAssembler
from edgeweave.coordinator.web_ui import mount_web_ui
from edgeweave.runtime.sampling import SamplingParams, TokenChoice
from edgeweave.splitting.tokenizer import TokenizerError

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|function-.*)$")
MAX_STOP_STRINGS = 4


def generation_error(error: BaseException) -> APIError:
    """A failed generation as an HTTP error: 503 (retry later) when a healthy node refused it for
    lack of room (its session cap), else 500."""
    if isinstance(error, NodeError) and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return APIError(503, f"The cluster is at capacity, retry later: {error}", None, "capacity", "server_error")
    return APIError(500, f"Generation failed: {error}", None, "generation_failed", "server_error")


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


# -- request bodies ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # nothing the client sends is silently dropped

    include_usage: bool = False


#: OpenAI request fields this server does not implement, with the value that asks for nothing
#: (sent that way, e.g. by clients that fill in defaults, they are accepted); any other value is a
#: 400 naming the field, never a silent 200. Fields OpenAI does not define at all are refused too.
NOT_IMPLEMENTED: dict[str, Any] = {
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "parallel_tool_calls": None,
    "response_format": {"type": "text"}, "best_of": 1, "echo": False, "suffix": None, "audio": None,
    "modalities": ["text"], "prediction": None, "store": False, "metadata": None, "service_tier": None,
    "reasoning_effort": None, "web_search_options": None,
}
#: the seed range the sampler's generator accepts (torch.Generator.manual_seed)
MAX_SEED = 2**63 - 1
#: choices per request (`n`): each is a row of the same batch
MAX_CHOICES = 16


class SamplingFields(BaseModel):
    """The parameters both endpoints share. Other fields are checked by `refuse_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # name, tool_calls, ...: a 400 naming the field

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to report (None: no log-probabilities)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for a field this server does not implement (unless it asks for nothing) or does not know."""
    for name, value in (body.model_extra or {}).items():
        if name in NOT_IMPLEMENTED:
            if value is None or value == NOT_IMPLEMENTED[name]:
                continue
            raise APIError(400, f"'{name}' is not supported by this server (sent {json.dumps(value)[:60]}); "
                                "see the README for the supported fields.", name, "unsupported_parameter")
        raise APIError(400, f"Unrecognized request argument supplied: {name}.", name, "unknown_parameter")


# -- one running request -------------------------------------------------------------------------
@dataclass
class _Choice:
    """One of the request's `n` choices: its job, its text so far, its log-probabilities not yet sent."""

    index: int
    job: GenerationJob
    assembler: TextAssembler
    logprobs: list[dict[str, Any]] | CompletionLogprobs | None
    pieces: list[str] = field(default_factory=list)
    finish: str | None = None

    def feed(self, choice: TokenChoice, tokenizer: Any) -> str:
        """The text this token releases; its log-probability is queued for the next chunk."""
        if self.assembler.stopped:
            return ""
        if self.logprobs is not None and choice.token not in self.job.sampling.stop_token_ids:
            if isinstance(self.logprobs, CompletionLogprobs):
                self.logprobs.add(choice)
            else:
                self.logprobs.append(chat_entry(tokenizer, choice))
        delta = self.assembler.feed(choice.token)
        if self.assembler.stopped:
            self.job.cancel("stop")
        return delta

    def take_logprobs(self) -> dict[str, Any] | None:
        """The queued log-probabilities in the endpoint's shape, then forget them (streaming)."""
        if self.logprobs is None:
            return None
        if isinstance(self.logprobs, CompletionLogprobs):
            out = self.logprobs.as_dict()
            self.logprobs.clear()
            return out
        out, self.logprobs = {"content": self.logprobs}, []
        return out


@dataclass
class _Run:
    choices: list[_Choice]
    #: (choice index, "token", TokenChoice) or (choice index, "done", reason, error)
    events: asyncio.Queue

    def cancel(self, reason: str) -> None:
        for choice in self.choices:
            choice.job.cancel(reason)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


#: builds one streamed chunk: (choice index, text or None for the role chunk, finish, logprobs)
ChunkBuilder = Callable[[int, str | None, str | None, dict[str, Any] | None], dict[str, Any] | None]


class Service:
    """Turns validated requests into scheduler jobs and OpenAI-shaped answers."""

    def __init__(self, engine: TextEngine, scheduler: Scheduler, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.default_max_tokens = default_max_tokens
        self.started = time.time()
        self.vocab_size = len(engine.tokenizer.backend.get_vocab())

    def check_model(self, name: str) -> None:
        if name != self.engine.model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.engine.model_id}'.",
                           "model", "model_not_found")

    def sampling(self, body: ChatRequest | CompletionRequest, prompt_len: int,
                 ) -> tuple[int, SamplingParams, list[str]]:
        room = self.engine.max_context - prompt_len
        if room <= 0:
            raise APIError(400, f"The prompt has {prompt_len} tokens, but the model's context is "
                                f"{self.engine.max_context} tokens; shorten it.", "messages", "context_length_exceeded")
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens={requested} plus the prompt's {prompt_len} tokens exceeds the model's "
                                f"context of {self.engine.max_context} tokens.", "max_tokens", "context_length_exceeded")
        max_tokens = requested or min(room, self.default_max_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop")
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_token_ids=frozenset(self.engine.tokenizer.eos_token_ids),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=self.logit_bias(body.logit_bias),
            top_logprobs=body.top_logprobs_wanted(),
        )
        return max_tokens, params, stop

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as pairs, every id and value checked."""
        pairs = []
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {key!r}.",
                               "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for {key}.", "logit_bias")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = []
        for message in body.messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": message.role, "content": content or ""})
        try:
            return self.engine.tokenizer.encode_chat(messages)
        except TokenizerError as exc:
            raise APIError(400, str(exc), "messages") from None

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            if any(not 0 <= p < self.vocab_size for p in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size}).", "prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt must be one string (batches are not supported), got {len(prompt)}.",
                               "prompt")
            prompt = prompt[0]
        ids = self.engine.tokenizer.encode(prompt)
        if not ids:
            raise APIError(400, "prompt is empty; send at least one token of text.", "prompt")
        return ids

    def start(self, request: Request, body: ChatRequest | CompletionRequest, prompt_ids: list[int]) -> _Run:
        """Queue the request's `n` choices as jobs (rows of the same batches); 429 if they do not fit."""
        max_tokens, params, stop = self.sampling(body, len(prompt_ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        chat = isinstance(body, ChatRequest)
        client = body.user or (request.client.host if request.client else "unknown")
        run = _Run([], events)
        for index in range(body.n or 1):
            def put(item: tuple, index: int = index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, *item))

            seed = None if params.seed is None else (params.seed + index) % (MAX_SEED + 1)
            job = GenerationJob(
                prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=replace(params, seed=seed),
                on_token=lambda choice, put=put: put(("token", choice)),
                on_done=lambda reason, error, put=put: put(("done", reason, error)),
                client=client,
            )
            logprobs = None if params.top_logprobs is None else ([] if chat else CompletionLogprobs(self.engine.tokenizer))
            run.choices.append(_Choice(index, job, TextAssembler(self.engine.tokenizer, stop), logprobs))
        submitted = []
        try:
            for choice in run.choices:
                submitted.append(self.scheduler.submit(choice.job))
        except QueueFull as exc:
            for job in submitted:
                job.cancel("refused")
            raise APIError(429, f"The server is busy: {exc}.", None, "queue_full", "rate_limit_error") from None
        return run

    async def collect(self, request: Request, run: _Run) -> list[_Choice]:
        """Wait for every choice's whole answer (cancelling if the client leaves)."""
        pending = len(run.choices)
        while pending:
            try:
                event = await asyncio.wait_for(run.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    run.cancel("disconnected")
                continue
            choice = run.choices[event[0]]
            if event[1] == "token":
                choice.pieces.append(choice.feed(event[2], self.engine.tokenizer))
                continue
            _, _, reason, error = event
            if error is not None:
                run.cancel("failed")
                raise generation_error(error)
            choice.pieces.append(choice.assembler.finish())
            choice.finish = _finish_reason(reason)
            pending -= 1
        return run.choices

    async def stream(self, run: _Run, chunk: ChunkBuilder, usage_wanted: bool) -> AsyncIterator[str]:
        """SSE lines for a streamed answer, the choices' chunks interleaved as their tokens come."""
        try:
            for choice in run.choices:
                first = chunk(choice.index, None, None, None)
                if first is not None:
                    yield _sse(first)
            pending = len(run.choices)
            while pending:
                event = await run.events.get()
                choice = run.choices[event[0]]
                if event[1] == "token":
                    delta = choice.feed(event[2], self.engine.tokenizer)
                    if delta:
                        yield _sse(chunk(choice.index, delta, None, choice.take_logprobs()))
                    continue
                _, _, reason, error = event
                if error is not None:
                    yield _sse({"error": {"message": f"Generation failed: {error}", "type": "server_error",
                                          "param": None, "code": "generation_failed"}})
                    break
                tail = choice.assembler.finish()
                logprobs = choice.take_logprobs()
                if tail or (logprobs and (logprobs.get("content") or logprobs.get("tokens"))):
                    yield _sse(chunk(choice.index, tail, None, logprobs))
                yield _sse(chunk(choice.index, "", _finish_reason(reason), None))
                pending -= 1
            else:
                if usage_wanted:
                    final = chunk(0, "", None, None)
                    final["choices"] = []
                    final["usage"] = self.usage(run).as_dict()
                    yield _sse(final)
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the response task is cancelled): free the cluster
            run.cancel("disconnected")

    @staticmethod
    def usage(run: _Run) -> Usage:
        return Usage(len(run.choices[0].job.prompt_ids), sum(c.job.completion_tokens for c in run.choices))


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request body is invalid.", None
    first = errors[0]
    # drop "body" and pydantic's union-branch tags ("str", "list[TextPart]") from the location
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "the request body"
    return f"Invalid value for {where}: {first.get('msg', 'invalid')}.", param


# -- the app -------------------------------------------------------------------------------------
def create_app(engine: TextEngine, scheduler: Scheduler, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An OpenAI-compatible API over `engine`; the caller owns (and closes) engine and scheduler.
    With `api_key`, /v1/ requests need it as a Bearer token; bodies over `max_body_bytes` get 413."""
    app = FastAPI(title="edgeweave", version=__version__)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, api_key=api_key)
    service = Service(engine, scheduler, default_max_tokens)
    app.state.service = service
    metrics = ServingMetrics(engine, scheduler)
    scheduler.observer = metrics

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None,
                              "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, waiting = scheduler.counts()
        return {"status": "ok", "model": engine.model_id, "active": active, "waiting": waiting}

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": int(service.started), "owned_by": "edgeweave"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return {"model": engine.model_id, "version": __version__, "uptime_s": time.time() - service.started,
                "engine": engine.describe(), "scheduler": scheduler.snapshot()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        service.check_model(body.model)
        refuse_unsupported(body)
        # tokenizing a long prompt takes a while: off the event loop, so other requests keep flowing
        run = service.start(request, body, await run_in_threadpool(service.chat_prompt, body))
        rid, created = f"chatcmpl-{run.choices[0].job.job_id}", int(time.time())
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None, logprobs: dict | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(service.stream(run, chunk, usage), media_type="text/event-stream")
        choices = await service.collect(request, run)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.model_id,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.pieces)},
                             "logprobs": c.take_logprobs(), "finish_reason": c.finish} for c in choices],
                "usage": service.usage(run).as_dict()}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        service.check_model(body.model)
        refuse_unsupported(body)
        run = service.start(request, body, await run_in_threadpool(service.completion_prompt, body))
        rid, created = f"cmpl-{run.choices[0].job.job_id}", int(time.time())
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None, logprobs: dict | None) -> dict[str, Any] | None:
                if text is None:
                    return None  # completions streams have no role chunk
                return {"id": rid, "object": "text_completion", "created": created, "model": engine.model_id,
                        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(service.stream(run, chunk, usage), media_type="text/event-stream")
        choices = await service.collect(request, run)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.model_id,
                "choices": [{"index": c.index, "text": "".join(c.pieces), "logprobs": c.take_logprobs(),
                             "finish_reason": c.finish} for c in choices],
                "usage": service.usage(run).as_dict()}

    mount_web_ui(app)
    return app
