"""The OpenAI-compatible HTTP API (FastAPI): models, chat completions, completions, classify, health.

Every route but ``/health`` needs a bearer API key unless auth is off. Bodies, prompt tokens, ``max_tokens``
and batch sizes are bounded; errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Busy, MicroBatcher
from .engine import Decode, Engine, Job, RequestError, Result

log = logging.getLogger(__name__)


@dataclass
class Limits:
    """Bounds on what one request may ask for, and the micro-batcher's settings (the ``serve`` options read their
    defaults and help here; ``max_batch`` and ``batch_window_ms`` go to :func:`create_app` as its ``max_batch``
    and ``window_ms``)."""

    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body.", "min": 1024})
    max_input_tokens: int = field(default=4096, metadata={"help": "Most tokens per input.", "min": 1})
    max_tokens: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for.", "min": 1})
    max_batch_inputs: int = field(default=64, metadata={"help": "Most inputs (prompts) in one request.", "min": 1})
    max_queue: int = field(default=1024, metadata={"help": "Most requests waiting for the model.", "min": 1})
    max_batch: int = field(default=32, metadata={"help": "Most inputs run together in a micro-batch.", "min": 1})
    batch_window_ms: float = field(default=5.0, metadata={
        "help": "How long the first request of a batch waits for others (ms).", "min": 0})


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ---- request bodies ----------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (user, metadata ...)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None


class CompletionRequest(_Generation):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)


class ClassifyRequest(_Body):
    model: Optional[str] = None
    input: Union[str, dict[str, Any], list[Union[str, dict[str, Any]]]]


# ---- the app -------------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes (by Content-Length, or while it streams in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen, rejected = 0, False

        async def counted():
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request" and not rejected:
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; the app sees a disconnect and its reply is dropped
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not rejected:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body over {self.limit} bytes", "invalid_request_error", None,
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer KEY`` with a known key.

    It runs before anything reads the body, so a caller without a key learns nothing (not even field names)."""

    def __init__(self, app, keys: set[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        ok = scheme.lower() == b"bearer" and bool(token) and any(hmac.compare_digest(token, k) for k in self.keys)
        if ok:
            return await self.app(scope, receive, send)
        message = "missing API key (Authorization: Bearer KEY)" if not header else "invalid API key"
        body = json.dumps(error_body(message, "authentication_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def create_app(engine: Engine, *, api_keys: set[str] | None, limits: Limits | None = None, max_batch: int = 32,
               window_ms: float = 5.0, threads: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. ``api_keys=None`` turns auth off (the CLI allows that on loopback only)."""
    limits = limits or Limits()
    batcher = MicroBatcher(engine.run_batch, max_batch=max_batch, window_ms=window_ms, max_queue=limits.max_queue,
                           threads=threads)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving %s (max batch %d, window %.1f ms)", engine.id, max_batch, window_ms)
        yield
        await batcher.close()  # after the server stopped taking connections: queued work still finishes

    app = FastAPI(title="tunebench", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    if api_keys is not None:
        app.add_middleware(BearerAuth, keys=api_keys)  # added last: runs first
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        msgs = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
        return _error(422, msgs, param=_field(first["loc"]), code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != engine.id:
            raise ApiError(404, f"model '{name}' is not served here; this server serves '{engine.id}'",
                           param="model", code="model_not_found")

    def bound_inputs(texts: list[str], param: str) -> None:
        if len(texts) > limits.max_batch_inputs:
            raise ApiError(400, f"{param}: {len(texts)} inputs in one request; the limit is {limits.max_batch_inputs}",
                           param=param, code="too_many_inputs")
        for i, t in enumerate(texts):
            n = engine.count_tokens(t)
            if n > limits.max_input_tokens:
                where = param if len(texts) == 1 else f"{param}[{i}]"
                raise ApiError(400, f"{where}: {n} tokens; the limit is {limits.max_input_tokens} per input",
                               param=where, code="context_length_exceeded")

    def decode_for(req: _Generation, max_tokens: Optional[int], prompts: list[str]) -> Decode:
        default = 16 if engine.kind == "lm" else 0
        mt = default if max_tokens is None else max_tokens
        if mt > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {mt} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        if engine.kind == "lm" and engine.max_positions:
            longest = max(engine.count_tokens(p) for p in prompts)
            if longest + mt > engine.max_positions:
                raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({mt}) exceed the model's "
                               f"{engine.max_positions} positions", param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        return Decode(max_tokens=mt, temperature=req.temperature, top_p=req.top_p, stop=tuple(stop),
                      seed=req.seed or 0)

    async def submit(job: Job) -> list[Result]:
        try:
            return await batcher.submit(job)
        except Busy as exc:
            raise ApiError(503, f"server busy: {exc}", "server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
        except Exception:
            raise ApiError(500, "the model failed on this request (see the server log)", "server_error") from None

    def usage(results: list[Result]) -> dict:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def as_input(x: Any, where: str) -> Any:
        if engine.kind == "trial":
            try:
                return engine.record(x, where)  # type: ignore[attr-defined]
            except RequestError as exc:
                raise ApiError(400, str(exc), param=exc.param) from None
        return x

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.id, "queue": batcher._queue.qsize() if batcher._queue else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.id, "object": "model", "created": started,
                                            "owned_by": "tunebench", "tunebench": engine.describe()}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = engine.chat_prompt(messages)
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        bound_inputs([text], "messages")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = Job("complete", [as_input(prompt, "messages")], decode_for(req, mt, [text]))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        res = (await submit(job))[0]
        if req.stream:
            return _stream(res, rid, created, engine.id, chat=True,
                           include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": res.finish_reason, "logprobs": None, **_extras(res)}],
                "usage": usage([res])}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a prompt or a non-empty list", param="prompt")
        bound_inputs(prompts, "prompt")
        decode = decode_for(req, req.max_tokens, prompts)
        if req.logprobs is not None or req.echo:
            if not (req.echo and req.logprobs is not None and decode.max_tokens == 0):
                raise ApiError(400, "logprobs: this server returns prompt log-probabilities with echo=true and "
                               "max_tokens=0 (scoring), not for generated tokens", param="logprobs")
            job = Job("logprobs", prompts)
        else:
            job = Job("complete", [as_input(p, f"prompt[{i}]") for i, p in enumerate(prompts)], decode)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if len(prompts) > 1:
                raise ApiError(400, "stream: one prompt per streamed request", param="stream")
        results = await submit(job)
        if req.stream:
            return _stream(results[0], rid, created, engine.id, chat=False,
                           include_usage=bool(req.stream_options and req.stream_options.include_usage))
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": r.logprobs,
                    **_extras(r)} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.id, "choices": choices,
                "usage": usage(results)}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        check_model(req.model)
        if engine.kind != "trial" or engine.task_type != "classification":
            raise ApiError(400, "/v1/classify needs a classification trial; this server "
                           + ("runs a plain LM" if engine.kind == "lm" else "serves a generation trial"),
                           param="input", code="unsupported")
        single = not isinstance(req.input, list)
        raw = [req.input] if single else req.input
        if not raw:
            raise ApiError(400, "input: give an input or a non-empty list", param="input")
        bound_inputs([x if isinstance(x, str) else json.dumps(x) for x in raw], "input")
        inputs = [as_input(x, "input" if single else f"input[{i}]") for i, x in enumerate(raw)]
        results = await submit(Job("classify", inputs))
        data = [{"index": i, "label": r.label, "label_id": r.label_id, "scores": r.scores,
                 **({"raw_answer": r.text} if r.label is None else {})} for i, r in enumerate(results)]
        return {"object": "list", "model": engine.id, "data": data, "usage": usage(results)}

    return app


def _extras(r: Result) -> dict:
    """Classification facts alongside an OpenAI choice (clients that do not know them ignore them)."""
    if r.label is None and r.scores is None:
        return {}
    return {"tunebench": {"label": r.label, "label_id": r.label_id, "scores": r.scores}}


_PIECES = re.compile(r"\s*\S+|\s+")


def _stream(res: Result, rid: str, created: int, model_id: str, *, chat: bool, include_usage: bool) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format: the answer in word pieces, the finish reason, then [DONE].

    The answer is computed in a micro-batch before the first event, so errors keep their HTTP status."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict | None, usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model_id,
                "choices": [] if choice is None else [choice]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def piece(text: str | None, finish: str | None = None, role: bool = False) -> str:
        if not chat:
            return event({"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None})
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return event({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})

    async def events():
        if chat:
            yield piece(None, role=True)
        for part in _PIECES.findall(res.text):
            yield piece(part)
        yield piece(None, res.finish_reason)
        if include_usage:
            yield event(None, {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                               "total_tokens": res.prompt_tokens + res.completion_tokens})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
