"""Two `tunebench run` processes on one store at once (SQLite and PostgreSQL): they split the trials, every trial
is stored exactly once with a whole artifact; one killed -9 while holding claims loses them (at once when it died
on this host, else at expiry) and the other finishes its trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.store import Store

from .conftest import toy_study

pytestmark = pytest.mark.slow
runner = CliRunner()


def _study(tmp_path: Path, toy_files, model_dir, location: str) -> Path:
    doc = toy_study(tmp_path, toy_files, model_dir, store=location, execution={"claim_ttl": 4})
    if "://" in location:
        doc["artifacts"] = str(tmp_path / "shared-artifacts")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _training_keys(path: Path) -> set[str]:
    """Keys of the study's trials that train a model (full fine-tuning: the slowest rung of the toy ladder)."""
    from tunebench.runner import Study, load_study

    cfg, base = load_study(path)
    return {t.key for t in Study(cfg, base_dir=base, store=Store(cfg.store_path(base))).plan() if t.strategy == "full"}


def _start(path: Path, **env) -> subprocess.Popen:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "tunebench", "run", str(path), "--json"], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_complete(location: str) -> list[dict]:
    store = Store(location)
    rows = store.trials("toy-ladder")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 14 and set(keys) == store.current_keys("toy-ladder")
    for r in rows:  # every artifact whole: a predictor file beside the weights or templates it names
        art = store.artifact_path(r)
        assert (art / "predictor.json").is_file(), r["label"]
        assert all(p.stat().st_size > 0 for p in art.iterdir() if p.is_file())
    assert store.claims("toy-ladder") == []
    assert store.artifacts.leftovers() == []  # no staging left behind, not even the killed run's
    return rows


def test_two_runs_on_one_store_split_the_trials_each_once(tmp_path, toy_files, tiny_model_dir, store_location):
    path = _study(tmp_path, toy_files, tiny_model_dir, store_location)
    a, b = _start(path), _start(path)
    seen = []  # `show` while both write: each read a consistent, growing set of whole trials
    while a.poll() is None or b.poll() is None:
        shown = runner.invoke(app, ["show", "toy-ladder", "--store", store_location, "--json"])
        if shown.exit_code == 0:
            trials = json.loads(shown.stdout)["trials"]
            assert all("accuracy" in t["metrics"] for t in trials)
            seen.append(len(trials))
        time.sleep(0.5)
    assert seen == sorted(seen) and len(set(seen)) > 1
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0, err_a[-3000:]
    assert b.returncode == 0, err_b[-3000:]
    rows = _check_complete(store_location)
    ran = {r["record"]["ran_on"]["pid"] for r in rows}
    assert ran == {a.pid, b.pid}  # both did part of the work, neither redid the other's


def test_a_run_killed_holding_claims_is_taken_over(tmp_path, toy_files, tiny_model_dir, store_location):
    path = _study(tmp_path, toy_files, tiny_model_dir, store_location)
    # On PostgreSQL the killed run poses as another machine: its claims can only pass on by expiring.
    remote = {"TUNEBENCH_HOSTNAME": "node-a"} if "://" in store_location else {}
    training = _training_keys(path)  # kill A while it trains (seconds), not in a zero-shot trial's millisecond
    a, b = _start(path, **remote), _start(path)
    store, held, deadline = None, [], time.time() + 300
    while time.time() < deadline and a.poll() is None:
        try:
            store = store or Store(store_location)
            held = [c for c in store.claims("toy-ladder") if c["pid"] == a.pid and c["key"] in training]
            if held and len(store.trials("toy-ladder")) >= 2:
                break
        except Exception:  # noqa: BLE001 (the store is being created by the runs)
            pass
        time.sleep(0.2)
    assert held, "run A never held a claim while trials were stored"
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    out_b, err_b = b.communicate(timeout=600)
    assert b.returncode == 0, err_b[-3000:]
    rows = {r["key"]: r for r in _check_complete(store_location)}
    by = {pid: [k for k, r in rows.items() if r["record"]["ran_on"]["pid"] == pid] for pid in (a.pid, b.pid)}
    assert len(by[a.pid]) + len(by[b.pid]) == 14 and len(by[a.pid]) < 14
    lost = [c["key"] for c in held if c["key"] not in by[a.pid]]  # what A was training when it died ...
    assert lost and all(k in by[b.pid] for k in lost)  # ... B ran again
