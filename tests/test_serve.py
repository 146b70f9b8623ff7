"""`tunebench serve`: OpenAI-shaped routes for stored trials, auth, input bounds, malformed requests, streaming,
and served answers equal to the predictor's own."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tests.conftest import toy_rows
from tests.test_causal import colour_rows
from tunebench.analysis.selection import load_trial
from tunebench.cli import app as cli
from tunebench.serve import Limits, api_keys
from tunebench.serve.batcher import MicroBatcher
from tunebench.serve.engine import Job, Result

from tests.serving import AUTH, KEY, client_for, error_of, runner, trial_id


def test_every_route_but_health_needs_the_right_key(stores):
    with client_for(stores, "enc") as c:
        assert c.get("/health").json()["status"] == "ok"
        routes = [("get", "/v1/models", None), ("post", "/v1/classify", {"input": "good"}),
                  ("post", "/v1/completions", {"prompt": "good"}),
                  ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "good"}]})]
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": KEY}):
                r = getattr(c, method)(path, headers=headers, **({"json": body} if body else {}))
                assert r.status_code == 401, (path, headers)
                assert error_of(r)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
                assert "label" not in r.text and "choices" not in r.text  # nothing served
            ok = getattr(c, method)(path, headers=AUTH, **({"json": body} if body else {}))
            assert ok.status_code == 200, ok.text
        # the key is checked before the body is read: no field names leak to a caller without one
        r = c.post("/v1/chat/completions", json={"nonsense": True})
        assert r.status_code == 401 and "messages" not in r.text


def test_served_classification_equals_the_predictor(stores):
    texts = [t for t, _ in toy_rows(12, 9)]
    loaded = load_trial(stores, "enc", best=True)  # the top of the leaderboard (which of the two: the toy decides)
    with client_for(stores, "enc") as c:
        models = c.get("/v1/models", headers=AUTH).json()["data"]
        model_id = models[0]["id"]
        info = models[0]["tunebench"]
        assert info["strategy"] == loaded.row["strategy"] and info["labels"] == ["neg", "pos"]
        r = c.post("/v1/classify", headers=AUTH, json={"model": model_id, "input": texts})
        assert r.status_code == 200
        data = r.json()["data"]
        chat = [c.post("/v1/chat/completions", headers=AUTH, json={
            "model": model_id, "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": t}]})
            .json() for t in texts[:3]]
    assert model_id == loaded.name
    scores = loaded.predictor.predict_scores(texts)
    assert [d["label_id"] for d in data] == scores.argmax(1).tolist()
    assert [d["label"] for d in data] == [loaded.labels[i] for i in scores.argmax(1)]
    probs = np.asarray([[d["scores"][lab] for lab in loaded.labels] for d in data])
    expected = np.exp(scores - scores.max(1, keepdims=True))
    assert np.allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert [m["choices"][0]["message"]["content"] for m in chat] == [d["label"] for d in data[:3]]
    assert all(m["usage"]["prompt_tokens"] > 0 for m in chat)


def test_served_causal_trials_answer_like_their_predictors(stores):
    words = [w for w, _ in colour_rows(6, 7)]
    few = trial_id(stores, "llm", "few_shot")
    with client_for(stores, "llm", trial=few) as c:
        r = c.post("/v1/classify", headers=AUTH, json={"input": words})
        comp = c.post("/v1/completions", headers=AUTH, json={"prompt": words}).json()
    loaded = load_trial(stores, "llm", few)
    out = loaded.predictor.run(words)
    assert [d["label_id"] for d in r.json()["data"]] == out.predictions.tolist()
    assert [ch["text"] for ch in comp["choices"]] == [loaded.labels[i] for i in out.predictions]
    assert comp["usage"]["prompt_tokens"] == sum(out.prompt_tokens)  # the few-shot prompt, as evaluated

    with client_for(stores, "gen") as c:
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": words[0]}]})
        bad = c.post("/v1/classify", headers=AUTH, json={"input": words[0]})
    gen = load_trial(stores, "gen", best=True).predictor.run([words[0]])
    assert r.json()["choices"][0]["message"]["content"] == gen.predictions[0]
    assert r.json()["usage"]["completion_tokens"] == gen.completion_tokens[0]
    assert bad.status_code == 400 and "classification" in error_of(bad)["message"]


def test_streaming_sends_openai_chunks_that_add_up_to_the_answer(stores):
    with client_for(stores, "gen") as c:
        body = {"messages": [{"role": "user", "content": "river"}]}
        whole = c.post("/v1/chat/completions", headers=AUTH, json=body).json()
        r = c.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True,
                                                                "stream_options": {"include_usage": True}})
        comp = c.post("/v1/completions", headers=AUTH, json={"prompt": "river", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [ln[len("data: "):] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "stop"
    assert chunks[-1]["usage"] == whole["usage"]
    comp_events = [json.loads(ln[6:]) for ln in comp.text.splitlines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in comp_events) == text


def test_inputs_over_the_bounds_get_a_clear_4xx(stores):
    limits = Limits(max_body_bytes=4096, max_input_tokens=20, max_tokens=8, max_batch_inputs=3)
    with client_for(stores, "enc", limits=limits) as c:
        big = c.post("/v1/classify", headers=AUTH, json={"input": "word " * 2000})
        assert big.status_code == 413 and error_of(big)["code"] == "request_too_large"
        chunked = c.post("/v1/classify", headers={**AUTH, "content-type": "application/json"},
                         content=iter([b'{"input": "', b"x" * 5000, b'"}']))  # no Content-Length: counted as it streams
        assert chunked.status_code == 413
        long = c.post("/v1/classify", headers=AUTH, json={"input": ["fine", "good " * 50]})
        assert long.status_code == 400
        err = error_of(long)
        assert err["code"] == "context_length_exceeded" and err["param"] == "input[1]" and "limit is 20" in err["message"]
        many = c.post("/v1/classify", headers=AUTH, json={"input": ["a", "b", "c", "d"]})
        assert many.status_code == 400 and error_of(many)["code"] == "too_many_inputs"
        mt = c.post("/v1/completions", headers=AUTH, json={"prompt": "good", "max_tokens": 9})
        assert mt.status_code == 400 and error_of(mt)["param"] == "max_tokens"


def test_malformed_requests_name_the_field(stores):
    with client_for(stores, "enc") as c:
        r = c.post("/v1/chat/completions", headers={**AUTH, "content-type": "application/json"}, content=b'{"messages": [')
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user"}], "temperature": 5})
        assert r.status_code == 422
        err = error_of(r)
        assert "temperature" in err["message"] and err["param"] in ("temperature", "messages[0].content")
        r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found" and "enc:" in error_of(r)["message"]
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": []})
        assert r.status_code == 422 and error_of(r)["param"] == "messages"
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 400 and "user message" in error_of(r)["message"]
        r = c.post("/v1/classify", headers=AUTH, json={"input": 42})
        assert r.status_code == 422 and error_of(r)["param"].startswith("input")
        r = c.post("/v1/completions", headers=AUTH, json={"prompt": "x", "logprobs": 1, "echo": True, "max_tokens": 0})
        assert r.status_code == 400 and error_of(r)["param"] == "logprobs"  # a trial answers its task, not logprobs


def test_api_keys_and_no_auth_rules(tmp_path, monkeypatch):
    from tunebench.errors import ConfigError

    monkeypatch.delenv("TUNEBENCH_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):
        api_keys(None, no_auth=False, host="127.0.0.1")
    with pytest.raises(ConfigError, match="loopback"):
        api_keys(None, no_auth=True, host="0.0.0.0")
    assert api_keys(None, no_auth=True, host="::1") is None
    f = tmp_path / "keys"
    f.write_text("# team keys\nkey-one-0123456789\n\nkey-two-0123456789\n", encoding="utf-8")
    monkeypatch.setenv("TUNEBENCH_API_KEY", "env-key-0123456789")
    assert api_keys(f, no_auth=False, host="0.0.0.0") == {"key-one-0123456789", "key-two-0123456789",
                                                          "env-key-0123456789"}
    (tmp_path / "empty").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no key"):
        api_keys(tmp_path / "empty", no_auth=False, host="127.0.0.1")


def test_serve_cli_refuses_bad_requests_before_loading(stores, monkeypatch):
    monkeypatch.delenv("TUNEBENCH_API_KEY", raising=False)
    r = runner.invoke(cli, ["serve", "enc", "--store", str(stores), "--best", "--no-auth", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "loopback" in r.output
    r = runner.invoke(cli, ["serve", "enc", "--store", str(stores), "--best"])
    assert r.exit_code == 2 and "API key" in r.output
    r = runner.invoke(cli, ["serve", "enc", "--store", str(stores), "--no-auth"])
    assert r.exit_code == 2 and "--trial" in r.output
    r = runner.invoke(cli, ["serve", "enc", "--store", str(stores), "--trial", "zzzzzzzz", "--no-auth"])
    assert r.exit_code == 2 and "no trial 'zzzzzzzz'" in r.output
    ids = runner.invoke(cli, ["show", "enc", "--store", str(stores), "--ids"])
    assert ids.exit_code == 0 and "full" in ids.stdout and "zero_shot" in ids.stdout


def test_micro_batcher_groups_concurrent_requests_and_finishes_queued_work_on_close():
    seen: list[int] = []

    def run(jobs):
        seen.append(sum(j.size for j in jobs))
        return [[Result(str(x), 1, 0) for x in j.inputs] for j in jobs]

    async def main():
        batcher = MicroBatcher(run, max_batch=8, window_ms=50)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(Job("classify", [i]))) for i in range(20)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())  # shutdown while requests are queued
        results = await asyncio.gather(*pending)
        await closing
        return results

    results = asyncio.run(main())
    assert [r[0].text for r in results] == [str(i) for i in range(20)]  # every queued request answered, in order
    assert sum(seen) == 20 and max(seen) == 8 and len(seen) <= 4  # batched, never over the maximum


def test_raw_serving_of_a_tuned_causal_trial_scores_like_the_trial(stores):
    """--raw: the tuned LM as a plain model; its prompt log-probabilities reproduce the trial's label scores."""
    full = trial_id(stores, "llm", "full")
    loaded = load_trial(stores, "llm", full)
    pred = loaded.predictor
    word = colour_rows(1, 11)[0][0]
    prompt = pred.prompts([word])[0]
    texts = [prompt + pred.backend.answer_text(lab) for lab in loaded.labels]
    with client_for(stores, "llm", trial=full, raw=True) as c:
        model = c.get("/v1/models", headers=AUTH).json()["data"][0]
        assert model["id"].endswith(":raw") and model["tunebench"]["strategy"] == "full"
        r = c.post("/v1/completions", headers=AUTH, json={"prompt": texts, "echo": True, "logprobs": 1,
                                                          "max_tokens": 0})
        bad = c.post("/v1/classify", headers=AUTH, json={"input": word})
    assert r.status_code == 200, r.text
    means = []
    for ch in r.json()["choices"]:
        lp = ch["logprobs"]
        vals = [v for v, off in zip(lp["token_logprobs"], lp["text_offset"]) if off >= len(prompt)]
        means.append(sum(vals) / len(vals))
    assert np.allclose(means, pred.run([word]).scores[0], atol=1e-4)
    assert bad.status_code == 400


# ---- reliability: hostile text, poisoned batches, fairness, auth headers, counting off the loop, slow clients,
# ---- draining on SIGTERM -------------------------------------------------------------------------------------
