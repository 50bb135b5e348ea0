"""The OpenAI-compatible HTTP API (FastAPI): routes, API key, request checks and error bodies.

FastAPI/uvicorn because every OpenAI client, proxy and load tool expects what they give (HTTP/1.1 keep-alive,
chunked server-sent events), and both are kept up by large communities. Bodies are parsed here rather than by
FastAPI's dependency injection so that each failure gets the OpenAI error shape and the status the API uses:
400 malformed, 401 key, 404 model or route, 413 too large, 422 invalid field, 429 queue full, 503 stopping.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferry.edge.auth import token_matches
from ferry.model.tokenizer import FerryTokenizer
from ferry.serve import openai_protocol as api
from ferry.serve.completions import Job, Runner
from ferry.serve.engine_client import AsyncEngine
from ferry.serve.metrics import ServerMetrics
from ferry.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, RequestError

log = logging.getLogger("ferry.serve")


@dataclass
class ServedModel:
    name: str  # the id /v1/models lists and requests name
    max_context: int
    vocab_size: int
    tokenizer: FerryTokenizer | None  # None for random-weight shapes: prompts must be token ids


@dataclass
class ServeSettings:
    api_key: str | None = None
    request_timeout_s: float = 600.0
    max_body_bytes: int = 8 << 20
    max_waiting: int = 1024  # requests queued in the engine; past it, 429


class ServerState:
    def __init__(self, engine: AsyncEngine, model: ServedModel, settings: ServeSettings) -> None:
        self.engine, self.model, self.settings = engine, model, settings
        self.metrics = ServerMetrics(lambda: engine.gauges, lambda: engine.in_flight)
        self.runner = Runner(engine, self.metrics, settings.request_timeout_s)
        self.draining = False


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Ferry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ferry = state

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        state.metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse(api.error_body(message, "invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)  # the trace goes to the log, never to the client
        state.metrics.requests.labels(_endpoint(request), "500").inc()
        return JSONResponse(api.error_body(f"internal error ({type(exc).__name__}); see the server log",
                                           "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if state.engine.failure:
            return JSONResponse({"status": "failed", "reason": state.engine.failure}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        m = state.model
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "ferry",
                                            "max_model_len": m.max_context, "vocab_size": m.vocab_size}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(state, request, CompletionRequest)
        prompts = [_prompt_ids(state.model, p, "prompt") for p in body.prompts()]
        if not prompts:
            raise RequestError(400, "the prompt is empty", param="prompt")
        job = Job("completions", state.model.name, time.monotonic() + state.settings.request_timeout_s,
                  rid=api.new_id("cmpl"))
        params = body.sampling(_max_tokens(state.model, max(map(len, prompts)), body.max_tokens))
        await state.runner.start(request, job, prompts, params)
        if body.stream:
            templates: dict[int, api.ChunkTemplate] = {}

            def chunk(j: Job, i: int, d) -> str:
                if d.finish_reason is not None:
                    return api.sse_event(api.completion_chunk(j.rid, j.model, j.created, i, d.text, d.finish_reason))
                if i not in templates:
                    templates[i] = api.ChunkTemplate(api.completion_chunk(j.rid, j.model, j.created, i,
                                                                          api.TEXT_MARK, None))
                return templates[i].render(d.text)

            return state.runner.stream(job, chunk, body.include_usage)
        choices = await state.runner.collect(request, job)
        return api.completion_response(job.rid, job.model, choices, job.prompt_tokens, job.output_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(state, request, ChatCompletionRequest)
        tokenizer = state.model.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise RequestError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tokenizer.apply_chat_template(body.template_messages())
        except Exception as exc:  # the template's own raise_exception() names what it refuses
            raise RequestError(400, f"the chat template refused these messages: {exc}", param="messages") from None
        ids = tokenizer.encode(text, add_bos=False)
        _check_length(state.model, len(ids), "messages")
        job = Job("chat", state.model.name, time.monotonic() + state.settings.request_timeout_s,
                  rid=api.new_id("chatcmpl"))
        params = body.sampling(_max_tokens(state.model, len(ids), body.max_completion_tokens or body.max_tokens))
        await state.runner.start(request, job, [ids], params)
        if body.stream:
            template = api.ChunkTemplate(api.chat_chunk(job.rid, job.model, job.created, {"content": api.TEXT_MARK},
                                                        None))
            first = [True]

            def chunk(j: Job, i: int, d) -> str:
                if first[0] or d.finish_reason is not None:  # the first chunk names the role, as OpenAI's do
                    delta = {"role": "assistant", "content": d.text} if first[0] else {"content": d.text}
                    first[0] = False
                    return api.sse_event(api.chat_chunk(j.rid, j.model, j.created, delta, d.finish_reason))
                return template.render(d.text)

            return state.runner.stream(job, chunk, body.include_usage)
        [(text, reason)] = await state.runner.collect(request, job)
        return api.chat_response(job.rid, job.model, text, reason, job.prompt_tokens, job.output_tokens)

    return app


def _endpoint(request: Request) -> str:
    path = request.url.path
    return "chat" if path.endswith("chat/completions") else "completions" if path.endswith("completions") else path


def _authorize(state: ServerState, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    presented = header[7:] if header[:7].lower() == "bearer " else None
    if not token_matches(presented, key):
        raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


async def _parse(state: ServerState, request: Request, model_type):
    _authorize(state, request)
    if state.draining:
        raise RequestError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if state.engine.failure:
        raise RequestError(503, f"the engine stopped: {state.engine.failure}", kind="server_error",
                           code="engine_unavailable")
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
    raw = await request.body()
    if len(raw) > limit:
        raise RequestError(413, f"request body of {len(raw)} bytes exceeds the {limit}-byte limit")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        body = model_type.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(422, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    if body.model is not None and body.model != state.model.name:
        raise RequestError(404, f"the model {body.model!r} does not exist; this server serves {state.model.name!r}",
                           param="model", code="model_not_found")
    if refused := body.unsupported():
        raise RequestError(400, f"not supported by this server: {', '.join(refused)}", param=refused[0].split()[0])
    if state.engine.gauges.get("waiting", 0) >= state.settings.max_waiting:
        raise RequestError(429, f"{state.settings.max_waiting} requests are queued already; retry later",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    return body


def _prompt_ids(model: ServedModel, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise RequestError(400, "this model has no tokenizer (random weights): send the prompt as token ids",
                               param=param)
        ids = model.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    if not ids:
        raise RequestError(400, "the prompt is empty", param=param)
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise RequestError(400, f"token id {bad[0]} is outside the vocabulary 0..{model.vocab_size - 1}", param=param)
    _check_length(model, len(ids), param)
    return ids


def _check_length(model: ServedModel, tokens: int, param: str) -> None:
    if tokens >= model.max_context:
        raise RequestError(413, f"the prompt has {tokens} tokens; this model's context is {model.max_context} "
                           "(and at least one token must be generated)", param=param, code="context_length_exceeded")


def _max_tokens(model: ServedModel, prompt_tokens: int, asked: int | None) -> int:
    room = model.max_context - prompt_tokens
    if asked is None:
        return room
    if asked > room:
        raise RequestError(413, f"max_tokens={asked} with a {prompt_tokens}-token prompt exceeds the context of "
                           f"{model.max_context} tokens (at most {room} fit)", param="max_tokens",
                           code="context_length_exceeded")
    return asked
