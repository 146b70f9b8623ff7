"""The openai backend against scripted servers that behave like third-party ones (no model, no download).

Each quirk here was met on a real server (tests/test_llamacpp.py runs llama-cpp-python's) or is documented
for one (README "Tested OpenAI-compatible servers"): the backend must score right or refuse clearly.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import pytest

from tunebench.backends import NoLogprobs
from tunebench.backends.openai_api import OpenAIBackend
from tunebench.config import ModelConfig

from tests.scripted import send_json, serving

GENERATED = " X"  # what the scripted servers generate after an echo


def pieces(text: str) -> list[str]:
    """The scripted servers' tokenizer: words with their leading space, runs of other whitespace."""
    return re.findall(r" ?[^\s]+|\s+", text)


def value(k: int) -> float:
    """The log-probability the scripted servers give the k-th token of a text."""
    return -0.1 * (k + 1)


def expected(prompt: str, cont: str) -> tuple[float, int]:
    """Sum and count of the continuation tokens (the scripted tokenizer splits at the prompt's end here)."""
    n_prompt, n_all = len(pieces(prompt)), len(pieces(prompt + cont))
    return sum(value(k) for k in range(n_prompt, n_all)), n_all - n_prompt


def echo_choice(text: str, index: int, generated: int, *, shift: bool = False, gen: str = GENERATED) -> dict:
    """A legacy-format echo choice: the text's tokens (the first without a value), then ``generated`` tokens
    ``gen``. ``shift``: llama-cpp-python's values for a model without BOS (each token gets the next position's
    value, and the generated token has no entry)."""
    toks = pieces(text) + [gen] * generated
    offsets, at = [], 0
    for t in toks:
        offsets.append(at)
        at += len(t)
    values = [None] + [value(k) for k in range(1, len(toks))]
    if shift:
        toks, offsets, values = toks[:len(pieces(text))], offsets[:len(pieces(text))], [None] + [
            value(k + 1) for k in range(1, len(pieces(text)))]
    return {"index": index, "text": text + gen * generated, "finish_reason": "length",
            "logprobs": {"tokens": toks, "text_offset": offsets, "token_logprobs": values,
                         "top_logprobs": [None] + [{t: -0.1} for t in toks[1:]]}}


def completion(choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


@contextmanager
def scripted(respond):
    """A loopback HTTP server answering each POST with ``respond(path, body) -> (status, json)``; yields
    (base_url, requests seen)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            code, out = respond(self.path, body)
            send_json(self, out, code)

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        yield url, seen


def backend(url: str, **kw) -> OpenAIBackend:
    return OpenAIBackend(ModelConfig(backend="openai", base_url=url, model="m", api_key_env=None, api="completions",
                                     max_retries=2, **kw))


def error(code: int, message: str) -> tuple[int, dict]:
    return code, {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def llama_cpp_python(path: str, body: dict, *, shift: bool = False, gen: str = GENERATED) -> tuple[int, dict]:
    """llama-cpp-python's /v1/completions: a list of several prompts fails an assertion (500, empty message);
    max_tokens 0 means "until the context is full"; echo returns the prompt's tokens then the generated ones."""
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) > 1:
            return error(500, "")
        prompt = prompt[0]
    n_gen = body.get("max_tokens") or 40
    if not body.get("echo"):
        return 200, completion([{"index": 0, "text": GENERATED * n_gen, "finish_reason": "length",
                                 "logprobs": None}], len(pieces(prompt)), n_gen)
    return 200, completion([echo_choice(prompt, 0, n_gen, shift=shift, gen=gen)], len(pieces(prompt)) + 1, n_gen)


PROMPTS = ["Word: river\nColour:", "Word: stone\nColour:"]
LABELS = [" red", " blue green"]


def test_a_server_taking_one_prompt_per_request_and_reading_max_tokens_0_as_unlimited_scores_right():
    with scripted(llama_cpp_python) as (url, seen):
        b = backend(url, extra_body={"repeat_penalty": 1.0})
        total, count, billed = b.score_texts(PROMPTS, LABELS)
    for i, p in enumerate(PROMPTS):
        for j, c in enumerate(LABELS):
            assert (total[i, j], count[i, j]) == pytest.approx(expected(p, c))  # the generated token left out
    # the first request (a list) was refused with a 500, not retried; then one prompt per request, max_tokens 1
    assert isinstance(seen[0]["prompt"], list) and len([r for r in seen if isinstance(r["prompt"], list)]) == 1
    assert all(r["max_tokens"] == 1 for r in seen) and len(seen) == 1 + len(PROMPTS) * len(LABELS)
    assert all(r["repeat_penalty"] == 1.0 for r in seen)  # extra_body rides along
    assert str(b.echo_shape) == "one prompt per request, max_tokens=1"
    # billed: each prompt's requests, prompt and generated tokens (one per label)
    assert billed == [(sum(len(pieces(p + c)) + 1 for c in LABELS), len(LABELS)) for p in PROMPTS]


def test_a_server_scoring_only_with_max_tokens_0_is_found_by_the_probe():
    def respond(path, body):
        if body.get("max_tokens") != 0:
            return error(400, "logprobs: prompt log-probabilities need echo=true and max_tokens=0")
        texts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return 200, completion([echo_choice(t, i, 0) for i, t in enumerate(texts)], 10, 0)

    with scripted(respond) as (url, seen):
        b = backend(url)
        total, count, _ = b.score_texts(PROMPTS, LABELS)
    assert (total[1, 1], count[1, 1]) == pytest.approx(expected(PROMPTS[1], LABELS[1]))
    assert [(isinstance(r["prompt"], list), r["max_tokens"]) for r in seen] == [
        (True, 1), (False, 1), (True, 0), (True, 0)]  # two refusals once, then lists with max_tokens 0


@pytest.mark.parametrize("server, said", [
    # llama.cpp's llama-server before echo was accepted: a 500 for any echo request
    (lambda path, body: error(500, "Only no echo is supported"), "Only no echo is supported"),
    # llama-server now: echo accepted and ignored; logprobs of the generated tokens only, in the chat format
    (lambda path, body: (200, completion([{"index": 0, "text": " X", "finish_reason": "length",
                                           "logprobs": {"content": [{"token": " X", "logprob": -1.0}]}}], 5, 1)),
     "returned no prompt log-probabilities"),
    # a server that ignores echo but returns legacy-format logprobs of what it generated
    (lambda path, body: (200, completion([{"index": 0, "text": " X", "finish_reason": "length",
                                           "logprobs": {"tokens": [" X"], "text_offset": [20],
                                                        "token_logprobs": [-1.0], "top_logprobs": [None]}}], 5, 1)),
     "did not echo the prompt"),
    # llama-cpp-python on a model whose tokenizer adds no BOS: every value one token off, no generated entry
    (lambda path, body: llama_cpp_python(path, body, shift=True), "do not line up with the echoed text"),
    # the same when the generated token shows as no text (a byte of an incomplete UTF-8 character)
    (lambda path, body: llama_cpp_python(path, body, shift=True, gen=""), "do not line up with the echoed text"),
    # a server that refuses max_tokens 1 with echo, and reads 0 as "no limit"
    (lambda path, body: error(400, "max_tokens must be 0 with echo") if body["max_tokens"] else
     llama_cpp_python(path, body), "generated 40 tokens with max_tokens=0"),
])
def test_servers_without_usable_prompt_logprobs_are_refused_clearly_and_quickly(server, said):
    with scripted(server) as (url, seen):
        b = backend(url)
        with pytest.raises(NoLogprobs, match=re.escape(said)):
            b.score_texts(PROMPTS, LABELS)
        assert len(seen) <= 4  # each request shape once: a refusal is not retried as an outage
        n = len(seen)
        with pytest.raises(NoLogprobs, match=re.escape(said)):  # remembered: no more requests
            b.score_texts(PROMPTS, LABELS)
        assert len(seen) == n


def test_a_prediction_falls_back_to_generation_when_echo_is_ignored(toy_task):
    """The strategy side: the trial predicts by generation and records why."""
    from tunebench.strategies import registry

    def respond(path, body):
        if body.get("echo"):
            return error(500, "Only no echo is supported")
        return 200, completion([{"index": 0, "text": " positive", "finish_reason": "stop", "logprobs": None}], 7, 1)

    with scripted(respond) as (url, _):
        b = backend(url)
        zero = registry.get("zero_shot")
        strategy = zero(zero.config_from_dict({}), seed=0)
        predictor = strategy.adapt(b, toy_task, train=toy_task.train, dev=toy_task.dev)
        out = predictor.run(toy_task.test.texts[:3])
    assert list(out.predictions) == [toy_task.label_names.index("positive")] * 3
    assert "Only no echo is supported" in predictor.prompt_info()["fallback"]


def test_generation_sends_extra_body_and_reads_usage():
    def respond(path, body):
        assert body["repeat_penalty"] == 1.0 and body["max_tokens"] == 4
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "blue\n\nText: more"}}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}

    with scripted(respond) as (url, seen):
        b = OpenAIBackend(ModelConfig(backend="openai", base_url=url, model="m", api_key_env=None,
                                      extra_body={"repeat_penalty": 1.0}))
        gen = b.generate(["Word: river\nColour:"], max_new_tokens=4, stop=["\n\nText:"])[0]
    assert (gen.text, gen.prompt_tokens, gen.completion_tokens) == ("blue", 9, 4)
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["stop"] == ["\n\nText:"]


def test_extra_body_is_in_trial_keys_only_when_set():
    base = dict(backend="openai", base_url="http://127.0.0.1:1/v1", model="m")
    assert "extra_body" not in ModelConfig(**base).identity()
    assert ModelConfig(**base, extra_body={"repeat_penalty": 1.0}).identity()["extra_body"] == {"repeat_penalty": 1.0}
    assert "extra_body" not in ModelConfig(backend="causal", path="x").identity()
