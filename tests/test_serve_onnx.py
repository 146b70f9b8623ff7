"""`tunebench serve --runtime onnx|auto`: the int8 ONNX graph behind the same API, exported once and reused; trials
it cannot serve fall back (auto) or fail clearly (onnx); another trial's export is never touched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import toy_rows
from tunebench.cli import app as cli
from tunebench.errors import CapabilityError, TunebenchError
from tunebench.export import MANIFEST, OnnxClassifier
from tunebench.serve import create_app, trial_engine

from tests.serving import AUTH, KEY, runner, trial_id

TEXTS = [t for t, _ in toy_rows(24, 9)]


def serve(engine) -> TestClient:
    return TestClient(create_app(engine, api_keys={KEY}))


def test_onnx_runtime_serves_the_int8_export_and_reuses_it(stores, tmp_path, monkeypatch):
    key = trial_id(stores, "enc", "full")
    out = tmp_path / "enc-onnx"
    torch_engine = trial_engine(stores, "enc", key, best=False)
    onnx_engine = trial_engine(stores, "enc", key, best=False, runtime="onnx", onnx_dir=out, threads=1)
    assert json.loads((out / MANIFEST).read_text(encoding="utf-8"))["trial"] == key  # exported on first use
    with serve(torch_engine) as c:
        by_torch = c.post("/v1/classify", headers=AUTH, json={"input": TEXTS}).json()
    with serve(onnx_engine) as c:
        info = c.get("/v1/models", headers=AUTH).json()["data"][0]["tunebench"]
        by_onnx = c.post("/v1/classify", headers=AUTH, json={"input": TEXTS}).json()
        chat = c.post("/v1/chat/completions", headers=AUTH,
                      json={"messages": [{"role": "user", "content": TEXTS[0]}]}).json()
        streamed = c.post("/v1/chat/completions", headers=AUTH,  # the ONNX classifier is no Predictor: no stream
                          json={"messages": [{"role": "user", "content": TEXTS[0]}], "stream": True})
    assert info["runtime"] == "onnx-int8" and info["export"] == str(out) and info["trial"] == key
    assert by_onnx["model"] == by_torch["model"]  # the same model id: clients need not know the runtime
    # what is served is the int8 graph's answer, scores included ...
    logits = OnnxClassifier(out, threads=1).predict_scores(TEXTS)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    served = np.asarray([[d["scores"][lab] for lab in ("neg", "pos")] for d in by_onnx["data"]])
    np.testing.assert_allclose(served, probs, atol=1e-5)
    assert [d["label_id"] for d in by_onnx["data"]] == logits.argmax(1).tolist()
    assert chat["choices"][0]["message"]["content"] == by_onnx["data"][0]["label"]
    assert streamed.status_code == 200 and f'"content": "{chat["choices"][0]["message"]["content"]}"' in streamed.text
    # ... counted in the same tokens as PyTorch's, and agreeing with it wherever int8's rounding cannot flip it
    assert by_onnx["usage"] == by_torch["usage"]
    torch_probs = np.asarray([[d["scores"][lab] for lab in ("neg", "pos")] for d in by_torch["data"]])
    clear = np.abs(torch_probs[:, 1] - torch_probs[:, 0]) > 2 * np.abs(served - torch_probs).max()
    agree = np.asarray([a["label"] == b["label"] for a, b in zip(by_onnx["data"], by_torch["data"])])
    assert agree[clear].all() and agree.mean() >= 0.7, (agree, clear)

    # near ties are scored again in fp32: a margin calibrated at export, counted in /v1/models
    margin = json.loads((out / "classifier.json").read_text(encoding="utf-8"))["recheck_margin"]
    assert 0 < margin < 100 and info["onnx_recheck"]["margin"] == margin
    with serve(onnx_engine) as c:
        counts = c.get("/v1/models", headers=AUTH).json()["data"][0]["tunebench"]["onnx_recheck"]
    gaps = np.abs(np.diff(OnnxClassifier(out, threads=1, recheck_margin=0).predict_scores(TEXTS), axis=1))[:, 0]
    near = gaps < margin  # the classify call's 24 inputs, then one chat and one streamed chat input
    assert counts["scored"] == len(TEXTS) + 2 and 0 <= counts["rechecked"] - int(near.sum()) <= 2
    fp32 = OnnxClassifier(out, quantized=False, threads=1).predict_scores(TEXTS)
    every = OnnxClassifier(out, threads=1, recheck_margin=1e9)  # every input rechecked: exactly fp32's logits
    np.testing.assert_allclose(every.predict_scores(TEXTS), fp32, atol=1e-6)
    assert every.rechecked == every.scored == len(TEXTS)
    plain = OnnxClassifier(out, threads=1, recheck_margin=0)  # off: int8 alone, the fp32 graph never loaded
    int8 = plain.predict_scores(TEXTS)
    assert plain.fp32_session is None and plain.rechecked == 0
    mixed = OnnxClassifier(out, threads=1).predict_scores(TEXTS)
    np.testing.assert_allclose(mixed[near], fp32[near], atol=1e-6)
    np.testing.assert_allclose(mixed[~near], int8[~near], atol=1e-6)
    with pytest.raises(TunebenchError, match="recheck margin"):
        OnnxClassifier(out, recheck_margin=-1)

    import tunebench.export as export  # the second start finds the export: nothing is exported again

    monkeypatch.setattr(export, "export_trial", lambda *a, **kw: pytest.fail("exported again"))
    again = trial_engine(stores, "enc", key, best=False, runtime="auto", onnx_dir=out)
    assert again.describe()["runtime"] == "onnx-int8"


def test_auto_falls_back_to_torch_and_onnx_says_why_not(stores, tmp_path):
    zero = trial_id(stores, "enc", "zero_shot")
    engine = trial_engine(stores, "enc", zero, best=False, runtime="auto", onnx_dir=tmp_path / "x")
    assert engine.describe()["runtime"] == "torch" and not (tmp_path / "x").exists()
    with pytest.raises(CapabilityError, match="--runtime onnx: .*classifier head"):
        trial_engine(stores, "enc", zero, best=False, runtime="onnx", onnx_dir=tmp_path / "x")
    few = trial_id(stores, "llm", "few_shot")
    with pytest.raises(CapabilityError, match="encoder classifiers"):
        trial_engine(stores, "llm", few, best=False, runtime="onnx")
    with pytest.raises(TunebenchError, match="--runtime: 'tensorrt'"):
        trial_engine(stores, "enc", zero, best=False, runtime="tensorrt")


def test_a_directory_holding_something_else_is_never_touched(stores, tmp_path):
    key = trial_id(stores, "enc", "full")
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"format": "onnx", "trial": "f" * 40}), encoding="utf-8")
    with pytest.raises(TunebenchError, match="holds trial ffffffff in format onnx"):
        trial_engine(stores, "enc", key, best=False, runtime="onnx", onnx_dir=other)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(TunebenchError, match="not a tunebench export"):
        trial_engine(stores, "enc", key, best=False, runtime="auto", onnx_dir=mine)
    assert sorted(p.name for p in other.iterdir()) == [MANIFEST]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_serve_cli_checks_the_runtime_before_loading(stores, tmp_path):
    r = runner.invoke(cli, ["serve", "enc", "--store", str(stores), "--best", "--no-auth", "--runtime", "gpu"])
    assert r.exit_code == 2 and "--runtime: 'gpu' is not one of torch, onnx, auto" in r.output
    r = runner.invoke(cli, ["serve", "--model", str(tmp_path), "--no-auth", "--runtime", "onnx"])
    assert r.exit_code == 2 and "--runtime onnx serves an encoder classifier trial" in r.output
