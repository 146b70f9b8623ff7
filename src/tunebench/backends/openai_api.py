"""The openai backend: prompting strategies against any OpenAI-compatible endpoint.

OpenAI itself, vLLM, Ollama, llama.cpp's server, or ``tunebench serve``. Requests go through the official
``openai`` client (its retries back off exponentially on 429, 5xx, timeouts and dropped connections), at most
``max_concurrency`` at a time. Token counts come from each response's ``usage``. Classification scores labels by
log-probability when the endpoint returns prompt log-probabilities (``/completions`` with ``echo``); otherwise the
model generates and the answer is parsed.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
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

    def _echo(self, i: int, pair: tuple[str, list[str]]) -> tuple[list[float], list[int], int]:
        """Log-probability sum and token count of each continuation after the prompt, by one echo request."""
        import openai  # heavy (about a second to import): only for a remote model

        prompt, conts = pair
        try:
            r = self.client.completions.create(model=self.config.model, prompt=[prompt + c for c in conts], echo=True,
                                               max_tokens=0, logprobs=1, temperature=0,
                                               extra_body=dict(self.config.extra_body or {}) or None)
        except (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError) as exc:
            raise NoLogprobs(f"the endpoint refused an echo/logprobs request ({exc.status_code}: {_message(exc)})") \
                from None
        sums, counts = [0.0] * len(conts), [0] * len(conts)
        choices = sorted(r.choices or [], key=lambda ch: ch.index)
        if len(choices) != len(conts):
            raise NoLogprobs(f"the endpoint answered {len(choices)} choices for {len(conts)} echoed prompts")
        for j, ch in enumerate(choices):
            lp = ch.logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise NoLogprobs("the endpoint returned no prompt log-probabilities")
            text_len = len(prompt) + len(conts[j])
            ends = list(lp.text_offset[1:]) + [text_len]
            for value, end in zip(lp.token_logprobs, ends):
                if end > len(prompt) and value is not None:  # tokens of (or reaching into) the continuation
                    sums[j] += float(value)
                    counts[j] += 1
        p, _ = self._usage(r)
        return sums, counts, p

    def score_texts(self, prompts: list[str], continuations: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Summed log-probability and token count of every continuation after every prompt, plus the prompt tokens
        each request was billed for. Raises ``NoLogprobs`` when the endpoint cannot do it."""
        return self._scores([(p, list(continuations)) for p in prompts])

    def score_texts_paired(self, prompts: list[str], continuations: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """As :meth:`score_texts` with one continuation per prompt; arrays of shape (n,)."""
        total, count, billed = self._scores([(p, [c]) for p, c in zip(prompts, continuations)])
        return total[:, 0], count[:, 0], billed

    def _scores(self, pairs: list[tuple[str, list[str]]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        if self.logprobs_ok is False:
            raise NoLogprobs("the endpoint is used through its chat API, which returns no prompt log-probabilities"
                             if self.chat else "the endpoint returned no prompt log-probabilities")
        if self.logprobs_ok is None and pairs:  # probe once before sending everything
            try:
                self._map(self._echo, pairs[:1])
            except NoLogprobs:
                self.logprobs_ok = False
                raise
            self.logprobs_ok = True
        rows = self._map(self._echo, pairs)
        return (np.asarray([r[0] for r in rows], dtype=float), np.asarray([r[1] for r in rows], dtype=float),
                [r[2] for r in rows])

def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
