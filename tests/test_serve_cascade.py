"""Serving a cascade: the student on a local encoder, the teacher a few-shot prompt on an `openai` model that is
itself `tunebench serve` over loopback HTTP; the served cascade (`tunebench serve STUDY --trial ID`, a subprocess)
routes by the stored threshold and counts its fallbacks; the artifact with its teacher reloads as measured."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.test_causal import colour_rows
from tests.test_remote import KEY, TEMPLATE, Server
from tunebench.backends import load_backend
from tunebench.cli import app
from tunebench.config import StudyConfig
from tunebench.config.costs import ApiPrice, CostConfig
from tunebench.data import Split
from tunebench.errors import CapabilityError
from tunebench.serve import trial_engine
from tunebench.store import Store
from tunebench.store import artifacts
from tunebench.strategies import load_predictor
from tunebench.strategies.cascade import STUDENT_DIR, TEACHER_DIR, CascadePredictor, confidence
from tunebench.strategies.distill import CallPrice, label

runner = CliRunner()
QUICK = {"epochs": 1, "batch_size": 16, "max_length": 32}


@pytest.fixture(scope="module")
def teacher_server(tiny_gpt2_dir):
    srv = Server(["--model", str(tiny_gpt2_dir), "--name", "gpt2-tiny", "--precision", "fp32"],
                 env={"TUNEBENCH_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cascade_store(tmp_path_factory, teacher_server, tiny_model_dir):
    """A study whose cascade has a linear-probe student on the tiny encoder and a one-shot teacher on the remote
    model, run once for the module."""
    root = tmp_path_factory.mktemp("serve-cascade")
    files = {k: str(write_csv(root / f"{k}.csv", colour_rows(n, s))) for k, n, s in
             (("train", 32, 1), ("dev", 8, 2), ("test", 12, 3))}
    remote = {"name": "gpt2-remote", "backend": "openai", "base_url": f"{teacher_server.url}/v1",
              "model": "gpt2-tiny", "api_key_env": "TB_TEST_KEY", "max_concurrency": 4, "api": "completions"}
    doc = {"name": "casc", "task": {"data": files, "text": "text", "label": "label", "instruction": "Name the colour."},
           "models": [{"name": "tiny", "backend": "encoder", "path": str(tiny_model_dir), "precision": "fp32"},
                      remote],
           "strategies": [{"cascade": {
               "teacher": {"strategy": "few_shot", "model": "gpt2-remote", "params": {"shots": 1, "template": TEMPLATE}},
               "student": {"strategy": "linear_probe", "model": "tiny", "params": QUICK},
               "pool": "train", "pool_size": 12, "target": {"max_fallback": 0.5}}}],
           "seeds": [0], "train_sizes": [16], "store": str(root / "runs")}
    path = root / "casc.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("TB_TEST_KEY", KEY)
    done = runner.invoke(app, ["run", str(path), "--json"])
    assert done.exit_code == 0, done.output
    yield root / "runs"
    mp.undo()


def parts(store_root):
    """The stored cascade row and its two parts loaded on their own: the student (local), the teacher (remote)."""
    store = Store(store_root, create=False)
    row = next(r for r in store.trials("casc") if r["strategy"] == "cascade")
    models = {m.name: m for m in StudyConfig.from_stored(store.study_config("casc")["config"]).all_models()}
    artifact = store.artifact_path(row)
    student = load_predictor(artifact / STUDENT_DIR, load_backend(models["tiny"]))
    teacher = load_predictor(artifact / TEACHER_DIR, load_backend(models["gpt2-remote"]))
    return store, row, student, teacher


def test_cascade_artifact_reloads_with_its_teacher_and_predicts_as_measured(cascade_store, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    store, row, _, teacher = parts(cascade_store)
    assert row["record"]["cascade"]["teacher"]["model"] == "gpt2-remote"
    assert teacher.strategy == "few_shot" and len(teacher.builder.demos) >= 1  # the teacher's demonstrations travel with the artifact
    loaded = artifacts.open_trial(store, "casc", row)
    p = loaded.predictor
    assert isinstance(p, CascadePredictor) and p.threshold == row["record"]["cascade"]["threshold"]
    assert p.teacher.backend.name == "openai" and p.student.backend is loaded.backend
    records = [{"input": w} for w, _ in colour_rows(12, 3)]  # the test split, in its stored order
    measured = store.items([row["key"]])[row["key"]]["predictions"]
    assert p.run(records).predictions.tolist() == measured
    assert p.requests == len(records) and p.fallbacks == round(row["record"]["cascade"]["test"]["fallback_rate"] * 12)

    # without the teacher's model the cascade does not load (it never serves the student alone in silence)
    with pytest.raises(Exception, match="teacher's model"):
        load_predictor(loaded.artifact, loaded.backend)


def test_cascade_served_over_http_routes_by_the_threshold_and_counts_fallbacks(cascade_store, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    store, row, student, teacher = parts(cascade_store)
    words = sorted({w for w, _ in colour_rows(32, 1) + colour_rows(8, 2) + colour_rows(12, 3)})
    conf = confidence(student.predict_scores(words))
    # both toy models are at chance, so dev chose no fallback: the served threshold is set to the median confidence
    # (in the artifact's cascade.json, put back afterwards) so that both routes are taken
    meta_path = store.artifact_path(row) / "cascade.json"
    stored = meta_path.read_text(encoding="utf-8")
    threshold = float(np.sort(conf)[len(words) // 2])
    meta_path.write_text(json.dumps({**json.loads(stored), "threshold": threshold}), encoding="utf-8")
    back = conf < threshold
    assert 0 < back.sum() < len(words)
    student_out = student.run(words)
    teacher_out = teacher.run([w for w, b in zip(words, back) if b])
    expected = np.asarray(student_out.predictions).copy()
    expected[back] = teacher_out.predictions
    srv = Server(["casc", "--trial", row["key"][:8], "--store", str(cascade_store), "--no-auth"],
                 env={"TB_TEST_KEY": KEY})
    try:
        info = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]["tunebench"]["cascade"]
        assert info["requests"] == 0 and info["fallback_rate"] is None and info["threshold"] == threshold
        assert info["teacher"]["model"] == "gpt2-remote"
        r = httpx.post(f"{srv.url}/v1/classify", json={"input": words}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        info = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]["tunebench"]["cascade"]
    finally:
        meta_path.write_text(stored, encoding="utf-8")
        srv.stop()
    got = [d["label_id"] for d in body["data"]]
    assert got == expected.tolist()
    labels = student.labels
    taught = [labels[i] for i in teacher_out.predictions]
    assert [d["label"] for d, b in zip(body["data"], back) if b] == taught  # the teacher's answers where it fell back
    assert info["fallbacks"] == int(back.sum()) and info["requests"] == len(words)
    assert info["fallback_rate"] == pytest.approx(back.sum() / len(words), abs=1e-6)
    # usage: the student's tokens on every input, plus the teacher's on the inputs that fell back
    assert body["usage"]["prompt_tokens"] == sum(student_out.prompt_tokens) + sum(teacher_out.prompt_tokens)
    assert sum(teacher_out.prompt_tokens) > 0


def test_export_and_raw_serving_refuse_a_cascade(cascade_store, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    row = next(r for r in Store(cascade_store, create=False).trials("casc") if r["strategy"] == "cascade")
    r = runner.invoke(app, ["export", "casc", "--trial", row["key"][:8], "--format", "merged",
                            "--store", str(cascade_store)])
    assert r.exit_code != 0 and "two models and a threshold" in " ".join(r.output.split())
    import tunebench.serve as serve_mod

    loads = []
    monkeypatch.setattr(serve_mod, "open_trial", lambda *a, **k: loads.append(a))
    with pytest.raises(CapabilityError, match="is a cascade of two models"):
        trial_engine(cascade_store, "casc", row["key"][:8], best=False, raw=True)
    assert loads == []  # refused from the stored row, before either model is loaded


def test_a_remote_teachers_calls_are_bounded_before_they_are_made_and_the_dollar_budget_holds(cascade_store,
                                                                                              monkeypatch):
    """The endpoint counts the tokens; before each call the teacher bounds them from the bytes it sends, so a
    dollar budget on a priced endpoint is never exceeded (it stops before the call that could go over)."""
    monkeypatch.setenv("TB_TEST_KEY", KEY)
    _, _, _, teacher = parts(cascade_store)
    words = [w for w, _ in colour_rows(24, 5)]
    records = [{"input": w} for w in words]
    prompt, answer = teacher.request_tokens(records)
    out = teacher.run(records)
    assert all(0 < billed <= bound for billed, bound in zip(out.prompt_tokens, prompt))
    assert max(out.completion_tokens) <= answer

    costs = CostConfig(api={"gpt2-remote": ApiPrice(input_per_1m=1e6, output_per_1m=1e6)})  # a dollar a token
    price = CallPrice("gpt2-remote", costs)
    pool = Split("pool", words, np.full(len(words), -1))
    full = label(teacher, pool, len(words), None, price)
    budget = full.dollars / 2
    run = label(teacher, pool, len(words), budget, price)
    assert 0 < run.calls < len(words) and run.dollars <= budget and run.stopped
    assert run.predictions.tolist() == full.predictions[:run.calls].tolist()
