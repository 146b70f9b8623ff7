"""What stands between a client and the routes: ASGI middlewares (body size and read deadline, bearer keys,
``Connection: close`` while draining), the check that request text is valid Unicode, and a JSON response that
cannot fail on what a client sent.

Every refusal uses OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from typing import Any

from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

CALLER = "tunebench.caller"  # the scope key under which BearerAuth names the caller (a digest of its key)
MAX_DEPTH = 32  # how deeply a request's JSON may nest
MAX_VALUES = 8192  # how many values (list items, object members) a request's JSON may hold in all
BODY_CHECKS = ("invalid_text", "too_deep", "too_many_values")  # the error types of check_texts
_SURROGATE = re.compile("[\ud800-\udfff]")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class SafeJSONResponse(JSONResponse):
    """Starlette's JSON response, except that text it cannot encode as UTF-8 (a lone surrogate echoed from a
    request) is written as a JSON ``\\uXXXX`` escape instead of failing the response."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")  # a surrogate can only be inside a JSON string


# ---- request text -------------------------------------------------------------------------------------------
def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    name = key if len(key) <= 40 else key[:40] + "..."
    return f"{parent}.{name}" if parent else name


def check_texts(data: Any) -> None:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate, which JSON's ``\\udXXX`` escapes can
    produce) anywhere in a request body, keys included; nesting deeper than :data:`MAX_DEPTH`; and more than
    :data:`MAX_VALUES` values in all (validating, and reporting errors on, half a million list items takes the
    event loop seconds).

    Raises a pydantic error of type ``invalid_text`` (``too_deep``, ``too_many_values``) whose context names the
    field, as ``messages[0].content`` or ``input[2].text``. Iterative: deep nesting cannot exhaust the stack."""
    if isinstance(data, str):
        _check_text(data, "body")
    # the containers still to look into, with where they are
    stack: list[tuple[Any, str, int]] = [(data, "", 0)] if isinstance(data, (dict, list)) else []
    values = 0
    while stack:
        value, where, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise PydanticCustomError("too_deep", "{param}: nested more than {depth} levels deep",
                                      {"param": where or "body", "depth": MAX_DEPTH})
        values += len(value)
        if values > MAX_VALUES:
            raise PydanticCustomError("too_many_values", "{param}: more than {n} values (list items and object "
                                      "members) in one request", {"param": where or "body", "n": MAX_VALUES})
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, where or "body", "a key")
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):
                    _check_text(item, _path(where, key))
            elif isinstance(item, (dict, list)):
                stack.append((item, _path(where, key), depth + 1))


def _check_text(text: str, where: str, what: str = "the text") -> None:
    if text.isascii():
        return
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise PydanticCustomError(
            "invalid_text", "{param}: a lone UTF-16 surrogate ({char}) at character {pos} of {what}; text must "
            "be valid Unicode (pair surrogates, or send the character itself)",
            {"param": where, "char": ascii(bad.group())[1:-1], "pos": bad.start(), "what": what})


# ---- middlewares ---------------------------------------------------------------------------------------------
async def send_error(send, status: int, message: str, type_: str, code: str | None,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer from a middleware (before or instead of the app) in OpenAI's error shape."""
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


_CLOSE = [(b"connection", b"close")]


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes (413, by Content-Length or while it streams in), and a
    body not received whole within ``timeout`` seconds of the first read (408: a client dripping a body slowly
    holds a connection and a task). Both answers close the connection."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self.too_large(send)
        body = _MeteredBody(self, receive, send)
        await self.app(scope, body.receive, body.send)

    async def too_large(self, send):
        await send_error(send, 413, f"request body over {self.limit} bytes", "invalid_request_error",
                         "request_too_large", _CLOSE)

    async def too_slow(self, send):
        await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                         "invalid_request_error", "request_timeout", _CLOSE)


class _MeteredBody:
    """One request's body as :class:`BodyLimit` lets the app read it: counted, and against a deadline."""

    def __init__(self, limits: BodyLimit, receive, send):
        self.limits, self._receive, self._send = limits, receive, send
        self.seen, self.complete, self.rejected, self.started = 0, False, False, False
        self.deadline: float | None = None

    async def receive(self) -> dict:
        timeout = self.limits.timeout
        if self.complete or self.rejected or timeout is None:
            return await self._receive()  # after the body: waiting for a disconnect is not bounded here
        loop = asyncio.get_running_loop()
        self.deadline = self.deadline or loop.time() + timeout
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - loop.time()))
        except asyncio.TimeoutError:
            log.info("request body not received within %.0f s (%d bytes came)", timeout, self.seen)
            return await self._reject(self.limits.too_slow)
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.seen > self.limits.limit:
                return await self._reject(self.limits.too_large)
        return message

    async def _reject(self, answer) -> dict:
        """Answer now (unless the app already did); the app sees a disconnect and its reply is dropped."""
        if not self.started:
            self.rejected = True
            await answer(self._send)
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.started = True
        if not self.rejected:
            await self._send(message)


class BearerAuth:
    """ASGI middleware: every path but ``/health`` needs exactly one ``Authorization: Bearer KEY`` header with a
    known key. The caller is then named in the scope (by a digest of its key) for fair scheduling.

    It runs before anything reads the body, so a caller without a key learns nothing (not even field names)."""

    def __init__(self, app, keys: set[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
        if len(given) > 1:  # which one would count is a guess (proxies and frameworks differ): refuse
            return await self._refuse(send, "give exactly one Authorization header")
        header = given[0] if given else b""
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token and any(hmac.compare_digest(token, k) for k in self.keys):
            scope[CALLER] = "key:" + hashlib.sha256(token).hexdigest()[:16]
            return await self.app(scope, receive, send)
        return await self._refuse(send, "missing API key (Authorization: Bearer KEY)" if not header
                                  else "invalid API key")

    @staticmethod
    async def _refuse(send, message: str):
        await send_error(send, 401, message, "authentication_error", "invalid_api_key",
                         [(b"www-authenticate", b"Bearer")])


def caller_of(scope: dict) -> str:
    """Who sent a request: its API key's digest, or (auth off) the client's address."""
    if scope.get(CALLER):
        return scope[CALLER]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "anonymous"


class Drain:
    """Whether the server is shutting down (set from the signal handler: a plain flag, nothing else)."""

    def __init__(self):
        self.on = False

    def begin(self) -> None:
        self.on = True


class CloseWhenDraining:
    """ASGI middleware: while the server drains, every response says ``Connection: close``, so that a client does
    not send its next request on a connection that is about to close."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def closing(message):
            if message["type"] == "http.response.start" and self.drain.on:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": headers + _CLOSE}
            await send(message)

        await self.app(scope, receive, closing)
