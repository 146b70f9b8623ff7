"""MLflow tracking with the real mlflow package: a file store and a real `mlflow server` on loopback.

Each finished trial is one run (params, metrics with intervals, per-epoch history as steps, cost, tags, the
artifact's path); a rerun or a second `tunebench track` makes no new run; a run deleted in MLflow is made again;
an unreachable server never fails the study."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.tracking import run_content
from tunebench.tracking.mlflow_runs import PARAM_MAX

from .conftest import toy_study

pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 serves a directory store only when asked

runner = CliRunner()


def _study(tmp_path: Path, toy_files, tiny_model_dir, **extra) -> Path:
    """Two trials: zero-shot (no history) and a 2-epoch linear probe (history, artifact)."""
    doc = toy_study(tmp_path, toy_files, tiny_model_dir, **extra)
    doc.update(strategies=[{"zero_shot": {"label_templates": ["it was {{ label }}"]}},
                           {"linear_probe": {"epochs": 2}}], seeds=[0], train_sizes=["all"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri if "://" in uri else Path(uri).as_uri())


def _runs(uri: str, experiment: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=1000))


def _tracked(store: Path) -> dict[str, str]:
    with sqlite3.connect(store / "tunebench.db") as con:
        return dict(con.execute("SELECT key, run_id FROM tracked").fetchall())


def _run(args: list[str]):
    result = runner.invoke(app, args)
    return result, (result.stderr if result.stderr_bytes is not None else "")


def _check_runs(uri: str, experiment: str, trials: list[dict], store: Path) -> None:
    """Every trial has exactly one run holding what the trial stored."""
    client = _client(uri)
    runs = _runs(uri, experiment)
    by_key = {r.data.tags["tunebench.key"]: r for r in runs}
    assert len(runs) == len(trials) == len(by_key)
    assert {k: r.info.run_id for k, r in by_key.items()} == _tracked(store)
    for t in trials:
        run = by_key[t["key"]]
        assert run.info.status == "FINISHED"
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["strategy"] == t["strategy"] and tags["family"] == t["family"] and tags["key"] == t["key"]
        assert tags["model"] == t["model"] and t["model"]
        assert params["seed"] == "0" and params["train_size"] == str(t["train_size"])
        assert metrics["accuracy"] == pytest.approx(t["metrics"]["accuracy"])
        assert metrics["macro_f1"] == pytest.approx(t["metrics"]["macro_f1"])
        low, high = metrics["accuracy_ci_low"], metrics["accuracy_ci_high"]
        assert 0.0 <= low <= metrics["accuracy"] <= high <= 1.0 and low < high
        assert metrics["cost/latency_ms_p50"] == pytest.approx(t["cost"]["latency_ms_p50"])
        assert Path(tags["tunebench.artifact"]).is_dir() == (t["artifact"] is not None)
        history = client.get_metric_history(run.info.run_id, "history/dev_accuracy")
        if t["strategy"] == "linear_probe":
            assert t["cost"]["trainable_params"] > 0 and params["epochs"] == "2"
            assert sorted(m.step for m in history) == [1, 2]
            assert sorted(m.value for m in history) == sorted(h["dev_accuracy"] for h in t["history"])
        else:
            assert history == []


def test_file_store_run_resume_and_deleted_run(tmp_path, toy_files, tiny_model_dir):
    path = _study(tmp_path, toy_files, tiny_model_dir, tracking={"mlflow": {"uri": "mlruns", "experiment": "tb-exp"}})
    mlruns = str(tmp_path / "mlruns")  # relative to the study file
    result, _ = _run(["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tracking"]["created"] == 2 and doc["tracking"]["error"] is None
    _check_runs(mlruns, "tb-exp", doc["trials"], tmp_path / "runs")
    before = {r.info.run_id for r in _runs(mlruns, "tb-exp")}

    again, _ = _run(["run", str(path), "--json"])  # resume: everything finished, nothing tracked twice
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout)["tracking"]
    assert (resumed["created"], resumed["existing"], resumed["error"]) == (0, 2, None)
    assert {r.info.run_id for r in _runs(mlruns, "tb-exp")} == before

    gone = next(iter(before))
    _client(mlruns).delete_run(gone)
    backfill, _ = _run(["track", str(path), "--json"])
    assert backfill.exit_code == 0, backfill.output
    out = json.loads(backfill.stdout)
    assert (out["created"], out["recreated"], out["existing"]) == (0, 1, 1)
    after = {r.info.run_id for r in _runs(mlruns, "tb-exp")}
    assert len(after) == 2 and gone not in after and before - {gone} <= after
    _check_runs(mlruns, "tb-exp", doc["trials"], tmp_path / "runs")


def test_track_backfills_a_study_run_without_tracking(tmp_path, toy_files, tiny_model_dir, monkeypatch):
    path = _study(tmp_path, toy_files, tiny_model_dir)
    result, _ = _run(["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "tracking" not in doc
    monkeypatch.chdir(tmp_path)  # a command-line directory is relative to the current directory
    args = ["track", "toy-ladder", "--store", str(tmp_path / "runs"), "--mlflow", "backfill", "--json"]
    first, _ = _run(args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["created"] == 2
    _check_runs(str(tmp_path / "backfill"), "toy-ladder", doc["trials"], tmp_path / "runs")
    second, _ = _run(args)
    assert second.exit_code == 0, second.output
    assert (json.loads(second.stdout)["created"], json.loads(second.stdout)["existing"]) == (0, 2)
    assert len(_runs(str(tmp_path / "backfill"), "toy-ladder")) == 2
    text, _ = _run(["track", "toy-ladder", "--store", str(tmp_path / "runs"), "--mlflow", "backfill",
                    "--mlflow-experiment", "other"])
    assert text.exit_code == 0 and "2 run(s) created" in text.stdout and "'other'" in text.stdout
    assert len(_runs(str(tmp_path / "backfill"), "other")) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port with its own SQLite backend and artifact directory."""
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    if not Path(exe).exists():
        pytest.skip("the mlflow executable is not installed (pip install 'tunebench[test]')")
    port = _free_port()
    root = tmp_path / "server"
    root.mkdir()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow server did not become healthy: " + (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_real_server_run_resume_and_lost_store_record(tmp_path, toy_files, tiny_model_dir, mlflow_server):
    path = _study(tmp_path, toy_files, tiny_model_dir)
    result, _ = _run(["run", str(path), "--mlflow", mlflow_server, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tracking"]["created"] == 2, doc["tracking"]
    _check_runs(mlflow_server, "toy-ladder", doc["trials"], tmp_path / "runs")
    run_ids = {r.info.run_id for r in _runs(mlflow_server, "toy-ladder")}
    client = _client(mlflow_server)
    stored = json.loads(Path(client.download_artifacts(next(iter(run_ids)), "tunebench/trial.json",
                                                       str(tmp_path))).read_text())
    assert stored["key"] in {t["key"] for t in doc["trials"]}

    again, _ = _run(["run", str(path), "--mlflow", mlflow_server, "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["tracking"]["created"] == 0
    assert {r.info.run_id for r in _runs(mlflow_server, "toy-ladder")} == run_ids

    with sqlite3.connect(tmp_path / "runs" / "tunebench.db") as con:  # the store lost its record of the runs
        con.execute("DELETE FROM tracked")
    backfill, _ = _run(["track", str(path), "--mlflow", mlflow_server, "--json"])
    assert backfill.exit_code == 0, backfill.output
    assert (json.loads(backfill.stdout)["created"], json.loads(backfill.stdout)["existing"]) == (0, 2)
    assert {r.info.run_id for r in _runs(mlflow_server, "toy-ladder")} == run_ids  # adopted by their key tag
    assert set(_tracked(tmp_path / "runs").values()) == run_ids


def test_unreachable_server_warns_and_the_study_succeeds(tmp_path, toy_files, tiny_model_dir):
    dead = f"http://127.0.0.1:{_free_port()}"
    path = _study(tmp_path, toy_files, tiny_model_dir, tracking={"mlflow": {"uri": dead}})
    t0 = time.time()
    result, stderr = _run(["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["trials"]) == 2 and all(t["metrics"]["accuracy"] >= 0 for t in doc["trials"])
    assert doc["tracking"]["created"] == 0 and "unavailable" in doc["tracking"]["error"]
    assert "unavailable" in stderr and "tunebench track toy-ladder" in stderr
    assert time.time() - t0 < 60  # no minutes of retries against a dead server
    assert _tracked(tmp_path / "runs") == {}
    failed, stderr = _run(["track", str(path)])  # the backfill against the dead server says so and exits 1
    assert failed.exit_code == 1 and "unavailable" in stderr
    later, _ = _run(["track", str(path), "--mlflow", str(tmp_path / "later"), "--json"])
    assert later.exit_code == 0 and json.loads(later.stdout)["created"] == 2


def test_run_content_truncates_long_params_and_names_them():
    row = {"key": "ab" * 10, "study": "s", "strategy": "few_shot", "family": "prompting", "label": "few_shot",
           "params": {"template": "x" * 2000, "nested": {"a": 1, "b": [1, 2]}, "seed": 7}, "seed": 3,
           "train_size": 10, "train_size_spec": "10", "metrics": {"accuracy": 0.5, "per_class": {"a b": {"f1": 0.4}},
                                                                  "confusion_matrix": [[1, 0], [0, 1]],
                                                                  "bad": float("nan")},
           "cost": {"train_seconds": 1.5, "latency_ms_samples": [1.0], "adapt_seconds": 2.0},
           "history": [{"epoch": 1, "dev_accuracy": 0.4}, {"epoch": 2, "dev_accuracy": 0.6}],
           "record": {"model": "m"}, "finished_at": 100.0}
    c = run_content(row, intervals={"accuracy": (0.3, 0.7)}, artifact="/a/b")
    assert len(c.params["template"]) == PARAM_MAX and c.params["template"].endswith("...")
    assert c.truncated == ["template"] and c.tags["tunebench.truncated_params"] == "template"
    assert c.params["nested.a"] == "1" and c.params["nested.b"] == "[1, 2]"
    assert c.params["seed"] == "3" and c.params["params.seed"] == "7"
    metrics = {(n, s): v for n, v, s in c.metrics}
    assert metrics[("accuracy", 0)] == 0.5 and metrics[("per_class.a b.f1", 0)] == 0.4
    assert metrics[("accuracy_ci_low", 0)] == 0.3 and metrics[("accuracy_ci_high", 0)] == 0.7
    assert metrics[("history/dev_accuracy", 2)] == 0.6 and metrics[("cost/train_seconds", 0)] == 1.5
    assert not any(n in ("bad", "confusion_matrix", "cost/latency_ms_samples") for n, _ in metrics)
    assert (c.start_ms, c.end_ms) == (98_000, 100_000) and c.tags["tunebench.artifact"] == "/a/b"


def test_bad_tracking_config_and_flags_are_clear_errors(tmp_path, toy_files, tiny_model_dir):
    path = _study(tmp_path, toy_files, tiny_model_dir, tracking={"mlflow": {"url": "x"}})
    result, stderr = _run(["validate", str(path)])
    assert result.exit_code == 2 and "tracking" in stderr and "url" in stderr and "Traceback" not in stderr
    path = _study(tmp_path, toy_files, tiny_model_dir, tracking={"wandb": {}})
    result, stderr = _run(["validate", str(path)])
    assert result.exit_code == 2 and "wandb" in stderr
    path = _study(tmp_path, toy_files, tiny_model_dir)
    result, stderr = _run(["run", str(path), "--mlflow-experiment", "x"])
    assert result.exit_code == 2 and "--mlflow" in stderr and not (tmp_path / "runs" / "tunebench.db").exists()
