"""The openai backend: prompting strategies against any OpenAI-compatible endpoint.

OpenAI itself, vLLM, Ollama, llama.cpp's server, llama-cpp-python's, or ``tunebench serve``. Requests go through
the official ``openai`` client (its retries back off exponentially on 429, 5xx, timeouts and dropped
connections), at most ``max_concurrency`` at a time. Token counts come from each response's ``usage``.
Classification scores labels by log-probability when the endpoint returns prompt log-probabilities
(``/completions`` with ``echo``); otherwise the model generates and the answer is parsed. Servers differ in the
echo requests they answer right: the first finds the form this one takes (``_ECHO_SHAPES``), and every answer
is checked against the echoed text (``_continuation_logprob``). README: "Tested OpenAI-compatible servers".
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError, TunebenchError
from .base import Backend, Generation, NoLogprobs

log = logging.getLogger(__name__)

__all__ = ["NoLogprobs", "OpenAIBackend", "RemoteError"]  # NoLogprobs lives in .base (re-exported here)


class RemoteError(TunebenchError):
    """The endpoint failed for good (after retries) or refused the request."""


class OpenAIBackend(Backend):
    """An OpenAI-compatible endpoint; prompts are sent as text (chat: one user message, after the system prompt).

    Example:
        >>> cfg = ModelConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", model="m", api_key_env=None)
        >>> OpenAIBackend(cfg).generate(["Say hi"], max_new_tokens=8)[0].text  # doctest: +SKIP
    """

    name: ClassVar[str] = "openai"
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate", "score"})
    lm: ClassVar[bool] = True
    remote: ClassVar[bool] = True
    max_positions = None

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        from openai import OpenAI  # heavy (about a second to import): only for a remote model

        key = None
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ModelLoadError(f"model.api_key_env: ${config.api_key_env} is not set; export the endpoint's "
                                     "API key in it (or set api_key_env: null for an endpoint without keys)")
        self.client = OpenAI(base_url=config.base_url, api_key=key or "unused", max_retries=config.max_retries,
                             timeout=config.timeout_s)
        self.chat = config.api == "chat"
        self.logprobs_ok: bool | None = None if config.api == "completions" else False
        self.no_logprobs: str | None = None  # why not, once an endpoint has refused prompt log-probabilities
        self.echo_shape = _ECHO_SHAPES[0]  # the echo request this endpoint answers (found by the first one)
        self.usage_missing = 0
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="tunebench-openai")

    @property
    def model_id(self) -> str:
        return f"{self.config.model} @ {self.config.base_url}"

    @property
    def tokenizer(self):
        return None

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.config.model, "base_url": self.config.base_url,
                "api": self.config.api, "tuned": self.config.tuned}

    # ---- prompts ------------------------------------------------------------------------------------------
    def format_prompt(self, text: str) -> str:
        """Prompts are sent as they are; a chat endpoint applies its own chat template."""
        return text

    def answer_text(self, answer: str) -> str:
        return answer if self.chat or answer[:1].isspace() else " " + answer

    # ---- requests -----------------------------------------------------------------------------------------
    def _map(self, fn: Callable[[int, Any], Any], items: list) -> list:
        """``fn`` over items, ``max_concurrency`` in flight, results in order; endpoint failures become RemoteError."""
        import openai  # heavy (about a second to import): only for a remote model

        try:
            return list(self._pool.map(lambda pair: fn(*pair), enumerate(items)))
        except openai.AuthenticationError as exc:
            raise RemoteError(f"{self.config.base_url}: the API key was refused (401); check "
                              f"${self.config.api_key_env}") from exc
        except openai.NotFoundError as exc:
            raise RemoteError(f"{self.config.base_url}: not found (404) - is '{self.config.model}' served there? "
                              f"{_message(exc)}") from exc
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            n = self.config.max_retries
            raise RemoteError(f"{self.config.base_url}: no answer after {n} {'retry' if n == 1 else 'retries'} "
                              f"({type(exc).__name__}: {_message(exc)}). Finished trials are stored: rerun the study "
                              "to resume") from exc
        except openai.APIStatusError as exc:
            raise RemoteError(f"{self.config.base_url}: the request was refused ({exc.status_code}): "
                              f"{_message(exc)}") from exc

    def _usage(self, response) -> tuple[int, int]:
        u = getattr(response, "usage", None)
        if u is None:
            if not self.usage_missing:
                log.warning("%s: a response carried no usage; its tokens count as 0", self.config.base_url)
            self.usage_missing += 1
            return 0, 0
        return int(u.prompt_tokens or 0), int(u.completion_tokens or 0)

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int = 0, model=None, batch_size: int | None = None,
                 max_length: int | None = None) -> list[Generation]:
        """Complete prompts (concurrently); a stop string the endpoint ignored is cut here too."""
        cfg = self.config
        stops = list(stop or [])[:4]  # OpenAI accepts at most 4

        def one(i: int, prompt: str) -> Generation:
            kw: dict[str, Any] = {"model": cfg.model, "max_tokens": max_new_tokens, "temperature": temperature,
                                  "top_p": top_p}
            if stops:
                kw["stop"] = stops
            if temperature > 0:
                kw["seed"] = seed + i
            if cfg.extra_body:
                kw["extra_body"] = dict(cfg.extra_body)
            if self.chat:
                messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
                messages.append({"role": "user", "content": prompt})
                r = self.client.chat.completions.create(messages=messages, **kw)
                text = (r.choices[0].message.content or "") if r.choices else ""
            else:
                r = self.client.completions.create(prompt=prompt, **kw)
                text = r.choices[0].text if r.choices else ""
            for st in stop or ():
                cut = text.find(st)
                if cut >= 0:
                    text = text[:cut]
            p, c = self._usage(r)
            return Generation(text, p, c)

        return self._map(one, prompts)

    def _echo(self, pair: tuple[str, list[str]], shape: _EchoShape, client=None) -> _Echoed:
        """Log-probability sum and token count of each continuation after the prompt, by echo requests of
        ``shape`` (one request for the list of prompts + continuations, or one per continuation)."""
        import openai  # heavy (about a second to import): only for a remote model

        prompt, conts = pair
        kw: dict[str, Any] = {"model": self.config.model, "echo": True, "max_tokens": shape.max_tokens,
                              "logprobs": 1, "temperature": 0}
        if self.config.extra_body:
            kw["extra_body"] = dict(self.config.extra_body)
        client = client or self.client
        out = _Echoed([], [], 0, 0)
        for group in ([conts] if shape.batch else [[c] for c in conts]):  # each response is checked on arrival
            texts = [prompt + c for c in group]
            try:
                r = client.completions.create(prompt=texts if shape.batch else texts[0], **kw)
            except (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError) as exc:
                raise _Refused(f"the endpoint refused an echo/logprobs request ({exc.status_code}: "
                               f"{_message(exc)})") from None
            choices = sorted(r.choices or [], key=lambda ch: ch.index)
            if len(choices) != len(group):
                raise _Refused(f"the endpoint answered {len(choices)} choices for {len(group)} echoed prompts")
            p, c = self._usage(r)
            if shape.max_tokens == 0 and c:
                raise NoLogprobs(f"the endpoint generated {c} tokens with max_tokens=0 (it reads 0 as no limit)")
            for ch, cont in zip(choices, group):
                total, count = _continuation_logprob(ch, prompt, cont, shape.max_tokens)
                out.sums.append(total)
                out.counts.append(count)
            out.prompt_tokens += p
            out.completion_tokens += c
        return out

    def echo_attempts(self) -> int:
        """How many times the next scoring call may send its first prompt: once per request shape while the
        endpoint's shape is unknown (a shape it answers wrongly can still be billed), once after."""
        return len(_ECHO_SHAPES) if self.logprobs_ok is None else 1

    def _probe(self, pair: tuple[str, list[str]]) -> _Echoed:
        """The first echo request: find the request shape this endpoint answers (see ``_ECHO_SHAPES``), or raise
        ``NoLogprobs`` when it refuses them all or answers with log-probabilities that cannot be right (then no
        other shape is tried). Refusals are not retried (a refused shape is not an outage); rate limits, timeouts
        and dropped connections are, through the retrying client."""
        import openai  # heavy (about a second to import): only for a remote model

        quick = self.client.with_options(max_retries=0)
        refused: list[str] = []
        for shape in _ECHO_SHAPES:
            if shape.batch and len(pair[1]) < 2:
                continue  # a list of one prompt is the single-prompt shape
            try:
                try:
                    got = self._echo(pair, shape, quick)
                except (openai.RateLimitError, openai.APIConnectionError):
                    got = self._echo(pair, shape)
            except openai.AuthenticationError:
                raise
            except openai.APIStatusError as exc:
                refused.append(f"{shape} - {exc.status_code}: {_message(exc) or type(exc).__name__}")
                continue
            except _Refused as exc:
                refused.append(f"{shape} - {exc}")
                continue
            except NoLogprobs as exc:  # answered, but wrong: another shape would not make the values right
                raise NoLogprobs(f"{exc} ({shape})") from None
            if refused:
                log.info("%s: prompt log-probabilities by %s (refused: %s)", self.config.base_url, shape,
                         "; ".join(refused))
            self.echo_shape = shape
            return got
        raise NoLogprobs("the endpoint returned no usable prompt log-probabilities with echo (" +
                         "; ".join(refused) + ")")

    def score_texts(self, prompts: list[str], continuations: list[str]
                    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """Summed log-probability and token count of every continuation after every prompt, plus the (prompt,
        completion) tokens each prompt's requests were billed for. Raises ``NoLogprobs`` when the endpoint cannot."""
        return self._scores([(p, list(continuations)) for p in prompts])

    def score_texts_paired(self, prompts: list[str], continuations: list[str]
                           ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """As :meth:`score_texts` with one continuation per prompt; arrays of shape (n,)."""
        total, count, billed = self._scores([(p, [c]) for p, c in zip(prompts, continuations)])
        return total[:, 0], count[:, 0], billed

    def _scores(self, pairs: list[tuple[str, list[str]]]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        if self.logprobs_ok is False:
            raise NoLogprobs(self.no_logprobs or "the endpoint is used through its chat API, which returns no "
                             "prompt log-probabilities")
        rows: list[_Echoed] = []
        if self.logprobs_ok is None and pairs:  # probe once before sending everything
            try:
                rows = self._map(lambda i, pair: self._probe(pair), pairs[:1])
            except NoLogprobs as exc:
                self.logprobs_ok, self.no_logprobs = False, str(exc)
                raise
            self.logprobs_ok = True
        rest = pairs[len(rows):]
        shape = self.echo_shape
        if shape.batch:
            rows += self._map(lambda i, pair: self._echo(pair, shape), rest)
        else:  # one request per continuation, all of them in flight together
            flat = self._map(lambda i, pc: self._echo((pc[0], [pc[1]]), shape),
                             [(p, c) for p, conts in rest for c in conts])
            at = 0
            for _, conts in rest:
                part, at = flat[at:at + len(conts)], at + len(conts)
                rows.append(_Echoed([r.sums[0] for r in part], [r.counts[0] for r in part],
                                    sum(r.prompt_tokens for r in part), sum(r.completion_tokens for r in part)))
        return (np.asarray([r.sums for r in rows], dtype=float), np.asarray([r.counts for r in rows], dtype=float),
                [(r.prompt_tokens, r.completion_tokens) for r in rows])


class _Refused(NoLogprobs):
    """The endpoint refused this echo request's shape (another may do)."""


@dataclass(frozen=True)
class _EchoShape:
    batch: bool  # one request carries the list of texts (else one request per text)
    max_tokens: int  # tokens generated after the echo (0: none, where the endpoint allows it)

    def __str__(self) -> str:
        return f"{'a list of prompts' if self.batch else 'one prompt'} per request, max_tokens={self.max_tokens}"


# Tried in this order by the first echo request. max_tokens=1 first: llama-cpp-python reads 0 as "until the context
# is full" (and generated tokens are left out of the scores anyway); tunebench serve scores only with 0.
# llama-cpp-python also takes one prompt per request (a list of several is a 500).
_ECHO_SHAPES = (_EchoShape(True, 1), _EchoShape(False, 1), _EchoShape(True, 0), _EchoShape(False, 0))


@dataclass
class _Echoed:
    sums: list[float]
    counts: list[int]
    prompt_tokens: int
    completion_tokens: int


def _continuation_logprob(choice, prompt: str, cont: str, max_tokens: int) -> tuple[float, int]:
    """Summed log-probability and token count of ``cont`` in one echoed choice of ``prompt + cont``.

    Tokens are placed by ``text_offset``: those that start before the end of the echoed text and end after the
    prompt are the continuation's (a token reaching from the prompt into it counts); tokens generated after the
    echo are left out. The echo is checked first, so that a server that ignores ``echo`` or returns misplaced
    log-probabilities is refused (``NoLogprobs``) instead of scoring the wrong tokens: the entries start at the
    text's start, and a token generated after the echo (``max_tokens`` reached) has its entry at the echo's end.
    """
    lp = choice.logprobs
    if lp is None or not lp.token_logprobs or lp.text_offset is None:
        raise NoLogprobs("the endpoint returned no prompt log-probabilities")
    text, offsets, values = choice.text or "", list(lp.text_offset), list(lp.token_logprobs)
    start, end = len(prompt), len(prompt) + len(cont)
    if not text.startswith(prompt + cont) or not offsets or offsets[0] != 0 or len(offsets) != len(values):
        raise NoLogprobs("the endpoint did not echo the prompt with its log-probabilities (echo ignored?)")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise NoLogprobs("the endpoint's log-probability offsets (text_offset) go backwards")
    if max_tokens == 0 and len(text) > end:
        raise NoLogprobs("the endpoint generated text with max_tokens=0 (it reads 0 as no limit)")
    if max_tokens > 0 and choice.finish_reason == "length" and end not in offsets:
        # a token was generated after the echo, but no entry starts where it does: the entries do not match the
        # text (llama-cpp-python, for a model whose tokenizer adds no BOS token, leaves the generated token out and
        # gives every prompt token the log-probability of the position after it)
        raise NoLogprobs("the endpoint's log-probabilities do not line up with the echoed text (no token starts "
                         f"at the end of the echo, offset {end})")
    total, count = 0.0, 0
    for i, (value, at) in enumerate(zip(values, offsets)):
        stop = offsets[i + 1] if i + 1 < len(offsets) else len(text)
        if at < end and stop > start:
            if value is None:
                raise NoLogprobs("the endpoint returned no log-probability for a continuation token")
            total += float(value)
            count += 1
    if count == 0:
        raise NoLogprobs("the endpoint returned no log-probability for the continuation")
    return total, count


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
