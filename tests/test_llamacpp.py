"""The openai backend against a real third-party server: llama-cpp-python's (``python -m llama_cpp.server``), on
the tiny Llama converted to an all-f32 GGUF file, compared with the same model run locally by the causal backend.

Needs ``pip install 'llama-cpp-python[server]' gguf`` (pip builds llama.cpp from source: 20 CPU-minutes, 44
minutes of wall time on 2 shared cores here), so the test command does not install it and these tests skip
without it; ``-m integration`` selects them, and bench/llamacpp_server.py runs the same check with figures.

Agreement: both sides compute in f32 (GGUF weights f32, the server's KV cache f32 by ``--type_k 0 --type_v 0``),
so per-token log-probabilities differ only by the order of floating-point sums: 4e-6 at most here, and the
tolerance is 1e-4. With llama.cpp's default f16 KV cache they differ by up to 5e-3 (bench/llamacpp_server.py),
and a quantised file by more: neither could tell a real disagreement from rounding at this tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import write_csv
from tests.llamacpp import MODEL_ID, LlamaCppServer, build_tiny_llama, echo_difference, local_logprobs, write_gguf
from tests.test_causal import colour_rows
from tests.test_remote import TEMPLATE, run, study_file
from tunebench.store import Store

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

ATOL = 1e-4  # per-token log-probability, and label scores (means of them)
SERVER_OPTS = {"repeat_penalty": 1.0}  # llama-cpp-python's own default is 1.1, even at temperature 0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llamacpp") / "tiny-llama")


@pytest.fixture(scope="module")
def gguf_file(llama_dir):
    return write_gguf(llama_dir, llama_dir.parent / "tiny-llama-f32.gguf")


@pytest.fixture(scope="module")
def server(gguf_file):
    with LlamaCppServer(gguf_file, log_path=gguf_file.parent / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llamacpp-data")
    return {k: str(write_csv(root / f"{k}.csv", colour_rows(n, s))) for k, n, s in
            (("train", 32, 1), ("dev", 8, 2), ("test", 12, 3))}


def test_the_gguf_file_tokenizes_like_the_hf_tokenizer(llama_dir, gguf_file):
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    vocab = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    texts = [TEMPLATE.replace("{{ input }}", w) for w, _ in colour_rows(16, 0)] + [
        "Name the colour.\nWord: river\nColour: blue\nWord: stone\nColour:", "  two  spaces\n\n\ttab 123 4567!?",
        tok.apply_chat_template([{"role": "user", "content": "Word: piano"}], tokenize=False,
                                add_generation_prompt=True)]
    for t in texts:
        assert vocab.tokenize(t.encode(), add_bos=True, special=True) == tok(t)["input_ids"], t


def test_prompt_logprobs_over_http_match_the_local_model(llama_dir, server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused")
    texts = [f"Name the colour.\nWord: {w}\nColour: {c}" for w, c in colour_rows(6, 4)]
    worst = 0.0
    for t, (ids, values) in zip(texts, local_logprobs(llama_dir, texts)):
        r = client.completions.create(model=MODEL_ID, prompt=t, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                      extra_body=SERVER_OPTS)
        lp = r.choices[0].logprobs
        assert "".join(lp.tokens[:len(ids)]) == t  # the text's tokens (<s> is not echoed)
        generated = r.choices[0].finish_reason == "length"  # else </s> came, which is neither shown nor counted
        if generated:  # the generated token follows, at the end of the echo
            assert lp.text_offset[len(ids)] == len(t) and r.choices[0].text == t + lp.tokens[len(ids)]
        worst = max(worst, echo_difference(r.choices[0], len(ids), values))
        assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == int(generated)  # <s> counted
    print(f"largest per-token difference: {worst:.2e}")
    assert worst < ATOL


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_greedy_generation_over_http_is_the_local_models(llama_dir, server, api):
    """Same tokens, the chat template rendered by the server from the GGUF file. Two differences that are
    llama-cpp-python's: bytes that are no whole UTF-8 character are dropped (Hugging Face shows U+FFFD), and
    it generates up to 3 tokens past max_tokens to finish a character it has begun."""
    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig

    here = load_backend(ModelConfig(backend="causal", path=str(llama_dir), precision="fp32",
                                    chat_template="on" if api == "chat" else "off"))
    there = load_backend(ModelConfig(backend="openai", base_url=server.url, model=MODEL_ID, api_key_env=None,
                                     api=api, extra_body=SERVER_OPTS))
    texts = [f"Name the colour.\nWord: {w}\nColour:" for w, _ in colour_rows(8, 5)]
    a = here.generate([here.format_prompt(t) for t in texts], max_new_tokens=16, stop=["\n\nText:"])
    b = there.generate(texts, max_new_tokens=16, stop=["\n\nText:"])
    for x, y in zip(a, b):
        assert y.text.startswith(x.text.replace("\ufffd", "")), (x.text, y.text)
        assert x.prompt_tokens == y.prompt_tokens  # <s> on both sides without chat, on neither with it
        assert x.completion_tokens <= y.completion_tokens <= x.completion_tokens + 3


def remote(server, **kw) -> dict:
    return {"name": "llamacpp", "backend": "openai", "base_url": server.url, "model": MODEL_ID, "api_key_env": None,
            "max_concurrency": 4, "extra_body": SERVER_OPTS, **kw}


def test_a_study_over_http_matches_the_local_model(tmp_path, files, llama_dir, server):
    """zero-shot and few-shot label scoring and a prompt search (completions API, log-probabilities), chain of
    thought through the chat API (the server applies the GGUF's chat template): predictions, scores and the
    search's choice as the causal backend finds them on the same model; token counts from the responses."""
    scored = [{"zero_shot": {"template": TEMPLATE}}, {"few_shot": {"shots": 1, "template": TEMPLATE}},
              {"prompt_search": {"trials": 4, "minibatch": 8, "propose": 0, "shots": 1, "demo_sets": 1,
                                 "template": TEMPLATE}}]
    reasoned = [{"chain_of_thought": {"max_new_tokens": 8}}]
    local = {"backend": "causal", "path": str(llama_dir), "precision": "fp32"}
    studies = {"local": study_file(tmp_path, "local", {**local, "chat_template": "off"}, files, scored),
               "http": study_file(tmp_path, "http", remote(server, api="completions"), files, scored),
               "local-chat": study_file(tmp_path, "local-chat", {**local, "chat_template": "on"}, files, reasoned),
               "http-chat": study_file(tmp_path, "http-chat", remote(server, api="chat"), files, reasoned)}
    for path in studies.values():
        r = run(path)
        assert r.exit_code == 0, r.output
    store = Store(tmp_path / "runs")
    by = {name: {t["strategy"]: t for t in store.trials(name)} for name in studies}
    pairs = [("local", "http", s) for s in ("zero_shot", "few_shot", "prompt_search")] + [
        ("local-chat", "http-chat", "chain_of_thought")]
    for here, there, strategy in pairs:
        a, b = by[here][strategy], by[there][strategy]
        items = store.items([a["key"], b["key"]])
        assert items[a["key"]]["predictions"] == items[b["key"]]["predictions"], strategy
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"], strategy
        assert b["cost"]["prompt_tokens_mean"] > 0 and b["cost"]["completion_tokens_mean"] > 0  # from usage
        assert b["record"]["backend"]["backend"] == "openai" and "fallback" not in (b["record"]["prompt"] or {})
    assert by["http"]["prompt_search"]["record"]["prompt_search"]["chosen"] == \
        by["local"]["prompt_search"]["record"]["prompt_search"]["chosen"]
    # chat: the server rendered the same chat template (same prompt tokens, BOS aside: the template adds none)
    assert by["http-chat"]["chain_of_thought"]["cost"]["prompt_tokens_mean"] == \
        by["local-chat"]["chain_of_thought"]["cost"]["prompt_tokens_mean"]
    # scoring sends each label with the prompt (4 labels) and one generated token per request
    assert by["http"]["zero_shot"]["cost"]["prompt_tokens_mean"] > 3 * by["local"]["zero_shot"]["cost"][
        "prompt_tokens_mean"]
    assert by["http"]["zero_shot"]["cost"]["completion_tokens_mean"] == 4

    # the scores themselves: label log-probabilities over HTTP equal the local model's
    from tunebench.analysis.selection import load_trial

    words = [w for w, _ in colour_rows(6, 9)]
    for strategy in ("zero_shot", "few_shot"):
        here = load_trial(tmp_path / "runs", "local", by["local"][strategy]["key"]).predictor.run(words)
        there = load_trial(tmp_path / "runs", "http", by["http"][strategy]["key"]).predictor.run(words)
        print(f"{strategy}: largest label-score difference {np.abs(here.scores - there.scores).max():.2e}")
        assert np.allclose(here.scores, there.scores, atol=ATOL, rtol=0)
    print(json.dumps({s: by["http"][s]["cost"] for s in by["http"]}, indent=1))
