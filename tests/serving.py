"""What the serving tests share: the key, the studies they serve, a client for a stored trial, the error shape."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.conftest import toy_rows, write_csv
from tests.test_causal import colour_rows
from tunebench.cli import app as cli
from tunebench.serve import Limits, create_app, trial_engine
from tunebench.serve.server import server_config

runner = CliRunner()
KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def run_study(root, study: dict) -> None:
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    result = runner.invoke(cli, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output


def build_stores(root: Path, tiny_model_dir: Path, tiny_llama_dir: Path) -> Path:
    """Three studies: a trained encoder classifier, a causal prompt classifier, a causal generation prompt (the
    session fixture ``stores`` in conftest builds them once for every serving test module)."""
    files = {k: str(write_csv(root / f"{k}.csv", toy_rows(n, s))) for k, n, s in
             (("train", 96, 1), ("dev", 24, 2), ("test", 24, 3))}
    run_study(root, {"name": "enc", "task": {"data": files, "text": "text", "label": "label"},
                     "model": {"path": str(tiny_model_dir), "precision": "fp32"},
                     "strategies": [{"full": {"epochs": 2, "batch_size": 16, "max_length": 32}}, "zero_shot"],
                     "store": "runs"})
    colours = {k: str(write_csv(root / f"c{k}.csv", colour_rows(n, s))) for k, n, s in
               (("train", 32, 1), ("dev", 8, 2), ("test", 8, 3))}
    run_study(root, {"name": "llm", "task": {"data": colours, "text": "text", "label": "label"},
                     "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
                     "strategies": [{"few_shot": {"shots": 1}}, {"full": {"epochs": 1, "batch_size": 16,
                                                                          "max_length": 64}}],
                     "store": "runs"})
    gen = str(write_csv(root / "gen.csv", [(w, f"the {c}") for w, c in colour_rows(40, 4)], header=("word", "phrase")))
    run_study(root, {"name": "gen", "task": {"type": "generation", "data": gen, "text": "word", "target": "phrase"},
                     "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
                     "strategies": [{"zero_shot": {"max_new_tokens": 4}}], "store": "runs"})
    return root / "runs"


def trial_id(store, study: str, strategy: str) -> str:
    from tunebench.store import Store

    return next(t["key"] for t in Store(store).trials(study) if t["strategy"] == strategy)


def client_for(store, study, *, keys=frozenset({KEY}), limits=None, trial=None, raw=False, **kw) -> TestClient:
    engine = trial_engine(store, study, trial, best=trial is None, raw=raw)
    return TestClient(create_app(engine, api_keys=set(keys) if keys is not None else None, limits=limits, **kw))


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@contextmanager
def served(app_, limits: Limits | None = None):
    """``app_`` under uvicorn (with the CLI's settings) in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(server_config(app_, host="127.0.0.1", port=0, limits=limits or Limits()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(600):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    threading.Event().wait(0.1)
            else:
                raise AssertionError("the server did not come up")
        yield url
    finally:
        server.should_exit = True
        thread.join(60)
