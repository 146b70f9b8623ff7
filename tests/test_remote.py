"""The openai backend against a real `tunebench serve` over loopback HTTP (no mocks): prompting studies, label
log-probabilities, token usage and prices, keys, retries, a dead endpoint and resuming, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.test_causal import colour_rows
from tunebench.cli import app
from tunebench.store import Store

runner = CliRunner()
KEY = "remote-test-key-0123456789"
TEMPLATE = "{{ instruction }}\n{% for d in demonstrations %}Word: {{ d.input }}\nColour: {{ d.output }}\n{% endfor %}" \
           "Word: {{ input }}\nColour:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tunebench serve` in a subprocess on a free loopback port."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tunebench", "serve", *args, "--port", str(self.port)],
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("remote-data")
    return {k: str(write_csv(root / f"{k}.csv", colour_rows(n, s))) for k, n, s in
            (("train", 32, 1), ("dev", 8, 2), ("test", 12, 3))}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    # fp32 like the local model it is compared with (auto would pick bf16 on a CPU with native bf16)
    srv = Server(["--model", str(tiny_gpt2_dir), "--name", "gpt2-tiny", "--precision", "fp32"],
                 env={"TUNEBENCH_API_KEY": KEY})
    yield srv
    srv.stop()


def study_file(tmp_path: Path, name: str, model: dict, files: dict, strategies: list, **extra) -> Path:
    doc = {"name": name, "task": {"data": files, "text": "text", "label": "label", "instruction": "Name the colour."},
           "model": model, "strategies": strategies, "store": "runs", **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def remote(server, **kw) -> dict:
    return {"name": "gpt2-remote", "backend": "openai", "base_url": f"{server.url}/v1", "model": "gpt2-tiny",
            "api_key_env": "TB_TEST_KEY", "max_concurrency": 4, **kw}


def run(path: Path, *args: str):
    return runner.invoke(app, ["run", str(path), "--json", *args])


def test_prompting_study_through_the_openai_backend_matches_the_local_model(tmp_path, files, server, tiny_gpt2_dir,
                                                                            monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    strategies = [{"zero_shot": {"template": TEMPLATE}}, {"few_shot": {"shots": 1, "template": TEMPLATE}},
                  {"chain_of_thought": {"max_new_tokens": 6}},
                  {"prompt_search": {"trials": 4, "minibatch": 8, "propose": 0, "shots": 1, "demo_sets": 1,
                                     "template": TEMPLATE}}]
    local = study_file(tmp_path, "local", {"backend": "causal", "path": str(tiny_gpt2_dir), "precision": "fp32"},
                       files, strategies)
    over_http = study_file(tmp_path, "over-http", remote(server, api="completions"), files, strategies,
                           costs={"api": {"gpt2-remote": {"input_per_1m": 0.5, "output_per_1m": 1.5}}})
    for path in (local, over_http):
        r = run(path)
        assert r.exit_code == 0, r.output
    store = Store(tmp_path / "runs")
    by = {name: {t["strategy"]: t for t in store.trials(name)} for name in ("local", "over-http")}
    for strategy in ("zero_shot", "few_shot", "chain_of_thought", "prompt_search"):
        a, b = by["local"][strategy], by["over-http"][strategy]
        items = store.items([a["key"], b["key"]])
        assert items[a["key"]]["predictions"] == items[b["key"]]["predictions"], strategy
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert b["cost"]["prompt_tokens_mean"] > 0  # read from the responses' usage
        assert b["record"]["backend"]["backend"] == "openai" and "fallback" not in (b["record"]["prompt"] or {})
    # the search over HTTP saw the same scores as the search on the local model
    assert by["over-http"]["prompt_search"]["record"]["prompt_search"]["chosen"] == \
        by["local"]["prompt_search"]["record"]["prompt_search"]["chosen"]
    # label scoring by log-probabilities sent the prompt once per label: 4 labels, 4x the local prompt tokens
    assert by["over-http"]["zero_shot"]["cost"]["prompt_tokens_mean"] > 3 * by["local"]["zero_shot"]["cost"][
        "prompt_tokens_mean"]
    assert by["over-http"]["chain_of_thought"]["cost"]["completion_tokens_mean"] == \
        by["local"]["chain_of_thought"]["cost"]["completion_tokens_mean"]

    # the scores themselves, not only their argmax: remote log-probabilities equal the local model's
    from tunebench.analysis.selection import load_trial

    words = [w for w, _ in colour_rows(6, 9)]
    here = load_trial(tmp_path / "runs", "local", by["local"]["zero_shot"]["key"]).predictor.run(words)
    there = load_trial(tmp_path / "runs", "over-http", by["over-http"]["zero_shot"]["key"]).predictor.run(words)
    assert np.allclose(here.scores, there.scores, atol=1e-4)

    # token usage is priced with the study's price table
    rec = runner.invoke(app, ["recommend", str(over_http), "--json"])
    assert rec.exit_code == 0, rec.output
    ranking = {r["label"].split("(")[0]: r for r in json.loads(rec.stdout)["ranking"]}
    assert any("by api tokens" in line for line in ranking["zero_shot"]["reasons"])


def test_chat_api_without_logprobs_falls_back_to_generation(tmp_path, files, server, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    # the endpoint stands for a model tuned elsewhere: prompting it is a hybrid in the analysis
    path = study_file(tmp_path, "chat", remote(server, api="chat", tuned="trial 1234abcd"), files,
                      [{"zero_shot": {"template": TEMPLATE, "max_new_tokens": 3}}])
    r = run(path)
    assert r.exit_code == 0, r.output
    trial = json.loads(r.stdout)["trials"][0]
    assert "predicted by generation" in trial["prompt"]["fallback"]
    assert trial["prompt"]["mode"] == "generate" and 0 < trial["cost"]["completion_tokens_mean"] <= 3
    assert "format_failure_rate" in trial["metrics"] and trial["family"] == "hybrid"


def test_a_wrong_key_or_a_missing_key_variable_fails_clearly(tmp_path, files, server, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "not-the-key-0123456789")
    path = study_file(tmp_path, "badkey", remote(server, api="completions"), files, ["zero_shot"])
    r = run(path)
    assert r.exit_code == 2 and "API key was refused (401)" in r.output and "Traceback" not in r.output
    monkeypatch.delenv("TB_TEST_KEY")
    r = run(path)
    assert r.exit_code == 2 and "$TB_TEST_KEY is not set" in r.output


def test_dead_endpoint_stops_cleanly_and_the_study_resumes_with_graceful_shutdown(tmp_path, files, tiny_gpt2_dir,
                                                                                  monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    files = {**files, "test": str(write_csv(tmp_path / "test4.csv", colour_rows(4, 5)))}  # few requests: each waits
    srv = Server(["--model", str(tiny_gpt2_dir), "--name", "gpt2-tiny", "--batch-window-ms", "600"],
                 env={"TUNEBENCH_API_KEY": KEY})
    model = remote(srv, api="completions", max_retries=1, timeout_s=5)
    first = study_file(tmp_path, "resume", model, files, [{"zero_shot": {"template": TEMPLATE}}])
    assert run(first).exit_code == 0

    # graceful shutdown: a request waiting in the batch window is answered after SIGTERM, then the server exits
    box: dict = {}

    def slow_request():
        box["r"] = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "gpt2-tiny", "prompt": "Word: river\nColour:", "max_tokens": 3},
                              timeout=30)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert box["r"].status_code == 200 and box["r"].json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert srv.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it handled

    # the endpoint is gone: the next trial fails cleanly, the finished one stays stored
    both = study_file(tmp_path, "resume", model, files, [{"zero_shot": {"template": TEMPLATE}},
                                                         {"few_shot": {"shots": 1, "template": TEMPLATE}}])
    r = run(both)
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "no answer after 1 retry" in said and "rerun the study to resume" in said
    assert "Traceback" not in r.output
    assert {t["strategy"] for t in Store(tmp_path / "runs").trials("resume")} == {"zero_shot"}

    # back up on the same port: the rerun does only what is missing
    monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: srv.port)
    again = Server(["--model", str(tiny_gpt2_dir), "--name", "gpt2-tiny"], env={"TUNEBENCH_API_KEY": KEY})
    try:
        r = run(both)
        assert r.exit_code == 0, r.output
        assert "1 already finished" in r.output or len(json.loads(r.stdout)["trials"]) == 2
        rows = Store(tmp_path / "runs").trials("resume")
        assert sorted(t["strategy"] for t in rows) == ["few_shot", "zero_shot"]
    finally:
        again.stop()


def test_retries_back_off_on_429_and_5xx_then_succeed():
    from tunebench.backends.openai_api import OpenAIBackend
    from tunebench.config import ModelConfig

    calls: list[int] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(1)
            if len(calls) <= 2:
                code, body = (429, {"error": {"message": "slow down"}}) if len(calls) == 1 else \
                    (503, {"error": {"message": "overloaded"}})
            else:
                code, body = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "blue"}}],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("retry-after-ms", "20")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m",
                          api_key_env=None, max_retries=3)
        gen = OpenAIBackend(cfg).generate(["Word: river\nColour:"], max_new_tokens=2)[0]
        assert (gen.text, gen.prompt_tokens, gen.completion_tokens) == ("blue", 7, 1)
        assert len(calls) == 3  # 429, 503, then the answer
    finally:
        httpd.shutdown()


def test_openai_model_config_is_checked(tmp_path, files):
    path = study_file(tmp_path, "cfg", {"backend": "openai", "model": "m"}, files, ["zero_shot"])
    r = runner.invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and "base_url" in r.output
    path = study_file(tmp_path, "cfg2", {"backend": "encoder", "base_url": "http://x/v1"}, files, ["zero_shot"])
    r = runner.invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and "base_url: only for backend: openai" in " ".join(r.output.split())


def test_a_tiny_model_behind_tunebench_serve_as_judge_gives_missing_not_zero(tmp_path, files, server, monkeypatch):
    """The judge's plumbing over real HTTP (issue 17): a random tiny model writes no valid JSON, so every judge call
    is retried once and then recorded as missing; the trial is stored with no judge score, not a score of 0."""
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    doc = {"name": "judged", "task": {"type": "generation", "data": files, "text": "text", "target": "label"},
           "model": remote(server, name="tiny", api="chat"),
           "strategies": [{"zero_shot": {"template": TEMPLATE, "max_new_tokens": 3, "models": ["tiny"]}},
                          {"zero_shot": {"template": "Say the colour of {{ text }}:", "max_new_tokens": 3,
                                         "models": ["tiny"]}}],
           "metrics": [{"judge": {"model": "tiny", "criteria": ["correct"], "repeats": 1, "max_new_tokens": 8,
                                  "max_items": 3, "pairwise": True}}],
           "consistency": {"perturbations": [], "max_items": 2}, "store": "runs"}
    path = tmp_path / "judged.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    r = run(path)
    assert r.exit_code == 0, r.output
    trials = json.loads(r.stdout)["trials"]
    j = trials[0]["metrics"]["judge"]
    assert (j["calls"], j["retried"], j["missing"], j["missing_rate"]) == (3, 3, 3, 1.0)
    assert j["overall"] is None and j["items_scored"] == 0 and j["scores"] == {"correct": None}
    assert j["cost"]["requests"] == 6 and j["cost"]["prompt_tokens"] > 0  # usage came back over HTTP
    # pairwise over the same server: both orders asked, retried, missing; no all-missing result is stored
    r = runner.invoke(app, ["judge", str(path), "--pair", trials[0]["key"], trials[1]["key"], "--json"])
    assert r.exit_code != 0 and "no item could be compared" in " ".join(r.output.split()).lower(), r.output
    r = runner.invoke(app, ["judge", str(path), "--pair", trials[0]["key"], trials[1]["key"], "--json"])
    assert r.exit_code != 0  # asked again, not read back: nothing was stored
