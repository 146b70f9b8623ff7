"""The OpenAI-compatible HTTP API (FastAPI): models, chat completions, completions, classify, health.

Every route but ``/health`` needs a bearer API key unless auth is off. Bodies, prompt tokens, ``max_tokens``
and batch sizes are bounded; errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Busy, MicroBatcher
from .engine import Decode, Engine, Job, RequestError, Result
from .guards import (
    BODY_CHECKS,
    BearerAuth,
    BodyLimit,
    CloseWhenDraining,
    Drain,
    SafeJSONResponse,
    caller_of,
    check_texts,
    error_body,
)

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
    max_queue_per_caller: int = field(default=256, metadata={
        "help": "Most requests waiting for the model from one caller (API key, or address without auth).", "min": 1})
    max_batch: int = field(default=32, metadata={"help": "Most inputs run together in a micro-batch.", "min": 1})
    max_batch_tokens: int = field(default=8192, metadata={
        "help": "Most input tokens run together in a micro-batch (a larger request runs alone).", "min": 1})
    batch_window_ms: float = field(default=5.0, metadata={
        "help": "How long the first request of a batch waits for others (ms).", "min": 0})
    body_timeout_s: float = field(default=30.0, metadata={
        "help": "Seconds a client has to send a whole request body (then 408).", "min": 0.001})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "Seconds a client has to send a request's headers (then the connection closes).", "min": 0.001})
    max_connections: int = field(default=1024, metadata={
        "help": "Most open connections and requests in progress (beyond: 503).", "min": 1})


MAX_CHARS_PER_TOKEN = 32  # an input longer than this many characters per allowed token is refused uncounted
GREEDY_BELOW = 1e-4  # a temperature this low samples greedily in effect, and dividing logits by it can overflow


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ---- request bodies ----------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (user, metadata ...)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_texts(data)  # every string and key of the body, before any field is read
        return data


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
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)


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
def _field(loc: tuple) -> str:
    """A pydantic location as a field path: ``messages[0].content``."""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


class _Service:
    """What the routes share: the engine, its batcher and counting thread, and the checks on a request's size."""

    def __init__(self, engine: Engine, limits: Limits, batcher: MicroBatcher):
        self.engine, self.limits, self.batcher = engine, limits, batcher
        self.counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunebench-count")

    async def off_loop(self, fn, *args):
        """``fn(*args)`` in the counting thread: tokenizing a long input must not stall the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.counter, fn, *args)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.engine.id:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError(404, f"model '{shown}' is not served here; this server serves '{self.engine.id}'",
                           param="model", code="model_not_found")

    async def measure(self, texts: list[str], param: str) -> list[int]:
        """Each input's tokens (refused over the bounds): characters first, then tokens in the counting thread."""
        lim = self.limits
        if len(texts) > lim.max_batch_inputs:
            raise ApiError(400, f"{param}: {len(texts)} inputs in one request; the limit is {lim.max_batch_inputs}",
                           param=param, code="too_many_inputs")
        cap = lim.max_input_tokens * MAX_CHARS_PER_TOKEN

        def where(i: int) -> str:
            return param if len(texts) == 1 else f"{param}[{i}]"

        for i, t in enumerate(texts):
            if len(t) > cap:  # too long to be within the bound, whatever the tokenizer: refused without counting
                raise ApiError(400, f"{where(i)}: {len(t)} characters; the limit is {lim.max_input_tokens} tokens "
                               f"(at most {cap} characters) per input", param=where(i), code="context_length_exceeded")
        counts = await self.off_loop(lambda: [self.engine.count_tokens(t) for t in texts])
        for i, n in enumerate(counts):
            if n > lim.max_input_tokens:
                raise ApiError(400, f"{where(i)}: {n} tokens; the limit is {lim.max_input_tokens} per input",
                               param=where(i), code="context_length_exceeded")
        return counts

    def decode_for(self, req: _Generation, max_tokens: Optional[int], counts: list[int]) -> Decode:
        engine = self.engine
        mt = (16 if engine.kind == "lm" else 0) if max_tokens is None else max_tokens
        if mt > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens: {mt} is over this server's limit of {self.limits.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        if engine.kind == "lm" and engine.max_positions and max(counts) + mt > engine.max_positions:
            raise ApiError(400, f"prompt ({max(counts)} tokens) + max_tokens ({mt}) exceed the model's "
                           f"{engine.max_positions} positions", param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        temperature = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
        return Decode(max_tokens=mt, temperature=temperature, top_p=req.top_p, stop=tuple(stop), seed=req.seed or 0)

    async def submit(self, job: Job, request: Request) -> list[Result]:
        try:
            return await self.batcher.submit(job, caller_of(request.scope))
        except Busy as exc:
            raise ApiError(503, f"server busy: {exc}", "server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
        except Exception:
            raise ApiError(500, "the model failed on this request (see the server log)", "server_error") from None

    def as_input(self, x: Any, where: str) -> Any:
        if self.engine.kind == "trial":
            try:
                return self.engine.record(x, where)  # type: ignore[attr-defined]
            except RequestError as exc:
                raise ApiError(400, str(exc), param=exc.param) from None
        return x

    def close(self) -> None:
        self.counter.shutdown(wait=False, cancel_futures=True)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        if first.get("type") in BODY_CHECKS:  # from check_texts: the field is in the context
            return _error(400, first["msg"], param=first.get("ctx", {}).get("param"), code=first["type"])
        msgs = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
        return _error(422, msgs, param=_field(first["loc"]), code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged by the server; the client learns nothing
        return _error(500, "the server failed on this request (see the server log)", "server_error")


def create_app(engine: Engine, *, api_keys: set[str] | None, limits: Limits | None = None, max_batch: int = 32,
               window_ms: float = 5.0, threads: int | None = None, drain: Drain | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. ``api_keys=None`` turns auth off (the CLI allows that on loopback only).

    ``drain`` (default: a fresh one, in ``app.state.drain``) is set when the server starts shutting down: from
    then on responses say ``Connection: close`` and ``/health`` answers 503."""
    limits = limits or Limits()
    drain = drain or Drain()
    batcher = MicroBatcher(engine.run_batch, max_batch=max_batch, max_batch_tokens=limits.max_batch_tokens,
                           window_ms=window_ms, max_queue=limits.max_queue,
                           max_queue_per_caller=limits.max_queue_per_caller, threads=threads)
    svc = _Service(engine, limits, batcher)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving %s (max batch %d, window %.1f ms)", engine.id, max_batch, window_ms)
        yield
        await batcher.close()  # after the server stopped taking connections: queued work still finishes
        svc.close()

    app = FastAPI(title="tunebench", lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=SafeJSONResponse)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout=limits.body_timeout_s)
    if api_keys is not None:
        app.add_middleware(BearerAuth, keys=api_keys)  # added after BodyLimit: runs before it
    app.add_middleware(CloseWhenDraining, drain=drain)
    app.state.engine, app.state.batcher, app.state.limits, app.state.drain = engine, batcher, limits, drain
    _install_handlers(app)
    _add_routes(app, svc, drain, started)
    return app


def _add_routes(app: FastAPI, svc: _Service, drain: Drain, started: int) -> None:
    engine = svc.engine

    @app.get("/health")
    async def health():
        body = {"status": "draining" if drain.on else "ok", "model": engine.id, "queue": svc.batcher.waiting}
        return SafeJSONResponse(body, status_code=503 if drain.on else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.id, "object": "model", "created": started,
                                            "owned_by": "tunebench", "tunebench": engine.describe()}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        svc.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = await svc.off_loop(engine.chat_prompt, messages)
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        counts = await svc.measure([text], "messages")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        decode = svc.decode_for(req, mt, counts)
        _check_generates(engine, decode, "max_completion_tokens" if req.max_completion_tokens is not None
                         else "max_tokens")
        job = Job("complete", [svc.as_input(prompt, "messages")], decode, sum(counts))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return await _stream(svc, job, request, rid, created, chat=True,
                                 include_usage=bool(req.stream_options and req.stream_options.include_usage))
        res = (await svc.submit(job, request))[0]
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": res.finish_reason, "logprobs": None, **_extras(res)}],
                "usage": _usage([res])}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        svc.check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a prompt or a non-empty list", param="prompt")
        if req.stream and len(prompts) > 1:
            raise ApiError(400, "stream: one prompt per streamed request", param="stream")
        counts = await svc.measure(prompts, "prompt")
        decode = svc.decode_for(req, req.max_tokens, counts)
        if req.logprobs is not None or req.echo:
            if not (req.echo and req.logprobs is not None and decode.max_tokens == 0):
                raise ApiError(400, "logprobs: this server returns prompt log-probabilities with echo=true and "
                               "max_tokens=0 (scoring), not for generated tokens", param="logprobs")
            job = Job("logprobs", prompts, tokens=sum(counts))
        else:
            _check_not_empty(engine, prompts, counts)
            _check_generates(engine, decode, "max_tokens")
            job = Job("complete", [svc.as_input(p, f"prompt[{i}]") for i, p in enumerate(prompts)], decode,
                      sum(counts))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return await _stream(svc, job, request, rid, created, chat=False,
                                 include_usage=bool(req.stream_options and req.stream_options.include_usage))
        results = await svc.submit(job, request)
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": r.logprobs,
                    **_extras(r)} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.id, "choices": choices,
                "usage": _usage(results)}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest, request: Request):
        svc.check_model(req.model)
        if engine.kind != "trial" or engine.task_type != "classification":
            raise ApiError(400, "/v1/classify needs a classification trial; this server "
                           + ("runs a plain LM" if engine.kind == "lm" else "serves a generation trial"),
                           param="input", code="unsupported")
        single = not isinstance(req.input, list)
        raw = [req.input] if single else req.input
        if not raw:
            raise ApiError(400, "input: give an input or a non-empty list", param="input")
        counts = await svc.measure([x if isinstance(x, str) else json.dumps(x) for x in raw], "input")
        inputs = [svc.as_input(x, "input" if single else f"input[{i}]") for i, x in enumerate(raw)]
        results = await svc.submit(Job("classify", inputs, tokens=sum(counts)), request)
        data = [{"index": i, "label": r.label, "label_id": r.label_id, "scores": r.scores,
                 **({"raw_answer": r.text} if r.label is None else {})} for i, r in enumerate(results)]
        return {"object": "list", "model": engine.id, "data": data, "usage": _usage(results)}


def _check_not_empty(engine: Engine, prompts: list[str], counts: list[int]) -> None:
    """A plain LM whose tokenizer adds no BOS cannot complete a prompt of no tokens."""
    if engine.completes_empty:
        return
    for i, n in enumerate(counts):
        if n == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ApiError(400, f"{where}: an empty prompt; this model needs at least one token to complete",
                           param=where)


def _check_generates(engine: Engine, decode: Decode, param: str) -> None:
    """A plain LM generates at least one token (``max_tokens`` 0 is for scoring: with echo and logprobs)."""
    if engine.kind == "lm" and decode.max_tokens < 1:
        raise ApiError(400, f"{param}: at least 1 to generate text (0 scores the prompt, with echo=true and logprobs)",
                       param=param)


def _usage(results: list[Result]) -> dict:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _extras(r: Result) -> dict:
    """Classification facts alongside an OpenAI choice (clients that do not know them ignore them)."""
    if r.label is None and r.scores is None:
        return {}
    return {"tunebench": {"label": r.label, "label_id": r.label_id, "scores": r.scores}}


_END = object()  # the job finished (after all of its text, in a stream's queue)


class _EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs when the response ends, sent in full or cut short by the client."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            with contextlib.suppress(RuntimeError):  # (a generator still running is being cancelled)
                await self.body_iterator.aclose()


async def _stream(svc: _Service, job: Job, request: Request, rid: str, created: int, *, chat: bool,
                  include_usage: bool) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format: the answer's text while the model generates it, the finish
    reason, the usage (``stream_options.include_usage``), then ``[DONE]``.

    The job runs in a micro-batch like any other; its sink carries the text from the model thread to this event
    loop. The response starts with the first text (or the finished answer), so that a request refused or failed
    before then keeps its HTTP status; a failure after it ends the stream with an OpenAI error event (and
    ``[DONE]``). A client that leaves ends its generation at the next step; the batch's other requests go on.
    A classification trial (or a reasoning prompt) has its answer only at the end: it comes in one chunk."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()  # the client left (or the response ended): the model may stop generating

    def sink(k: int, text: str) -> bool:  # in the model thread
        if gone.is_set():
            return False
        try:
            loop.call_soon_threadsafe(queue.put_nowait, text)
        except RuntimeError:  # the event loop has closed
            return False
        return True

    job.sink = sink
    task = asyncio.ensure_future(svc.submit(job, request))
    # the worker hands text over before its batch's results: the end is queued after the job's last text
    task.add_done_callback(lambda t: queue.put_nowait(_END))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, whoever reads it
    try:
        first = await queue.get()
    except BaseException:
        gone.set()
        raise
    if first is _END:
        task.result()  # refused or failed before any text: an HTTP error (ApiError)
    obj = "chat.completion.chunk" if chat else "text_completion"
    model_id = svc.engine.id

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
        sent, item = "", first
        while item is not _END:
            text = item
            while not queue.empty() and (item := queue.get_nowait()) is not _END:  # text that came meanwhile
                text += item
            sent += text
            yield piece(text)
            if item is not _END:
                item = await queue.get()
        try:
            res = task.result()[0]
        except ApiError as exc:
            yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
            yield "data: [DONE]\n\n"
            return
        if res.text.startswith(sent):
            if len(res.text) > len(sent):  # what the engine did not stream (a label), or held back at the end
                yield piece(res.text[len(sent):])
        else:
            log.warning("request %s: the streamed text differs from the answer", rid)
        yield piece(None, res.finish_reason)
        if include_usage:
            yield event(None, _usage([res]))
        yield "data: [DONE]\n\n"

    return _EventStream(events(), gone.set)
