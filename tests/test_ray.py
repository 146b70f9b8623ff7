"""Trials on a real local Ray cluster (started by the test command): the same metrics as in-process, and a study
that survives a worker killed mid-trial."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tunebench.config import StudyConfig
from tunebench.runner import Study
from tunebench.runner.executors import LocalExecutor
from tunebench.store import Store

from .conftest import toy_study

pytest.importorskip("ray")

QUALITY = ("accuracy", "macro_f1", "per_class", "confusion_matrix")


def _config(tmp_path, toy_files, tiny_model_dir, store: str, **execution) -> StudyConfig:
    doc = toy_study(tmp_path, toy_files, tiny_model_dir, store=store)
    if execution:
        doc["execution"] = execution
    return StudyConfig.model_validate(doc)


def _trial_processes() -> dict[int, str]:
    """Ray worker processes running a trial now (Ray titles them ``ray::trial:NAME``)."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::trial:"):
                out[int(pid)] = cmd.strip()
    return out


def test_ray_gives_the_metrics_of_the_local_executor_trial_by_trial(tmp_path, toy_files, tiny_model_dir, ray_cluster):
    local_cfg = _config(tmp_path, toy_files, tiny_model_dir, str(tmp_path / "local"))
    local = Study(local_cfg, base_dir=tmp_path).run(executor=LocalExecutor())
    ray_cfg = _config(tmp_path, toy_files, tiny_model_dir, str(tmp_path / "ray"), executor="ray", address=ray_cluster)
    on_ray = Study(ray_cfg, base_dir=tmp_path).run()
    assert len(local) == len(on_ray) == 14
    by_key = {r["key"]: r for r in on_ray}
    assert set(by_key) == {r["key"] for r in local}  # same trial keys whichever executor
    for row in local:
        other = by_key[row["key"]]
        for m in QUALITY:
            assert other["metrics"][m] == row["metrics"][m], (row["label"], m)
        assert other["params"] == row["params"]
        assert row["record"]["ran_on"]["pid"] == os.getpid() != other["record"]["ran_on"]["pid"]  # on a worker
        assert Store(tmp_path / "ray").artifact_path(other).joinpath("predictor.json").is_file()
    assert Store(tmp_path / "ray").claims() == []  # every claim dropped at its commit


def test_a_worker_killed_mid_trial_is_retried_and_each_trial_stored_once(tmp_path, toy_files, tiny_model_dir,
                                                                         ray_cluster):
    cfg = _config(tmp_path, toy_files, tiny_model_dir, str(tmp_path / "runs"), executor="ray", address=ray_cluster,
                  max_retries=2)
    study = Study(cfg, base_dir=tmp_path)
    killed: list[str] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for pid, title in _trial_processes().items():
                if "full" in title:  # the longest trials: kill one while it trains
                    time.sleep(1.0)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(title)
                    except ProcessLookupError:
                        continue
                    break
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rows = study.run()
    t.join(timeout=5)
    assert killed, "no trial worker was seen running"
    assert study.failures == []
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 14
    store = Store(tmp_path / "runs")
    assert len(store.trials("toy-ladder")) == 14
    for r in rows:
        assert store.artifact_path(r).joinpath("predictor.json").is_file()
    leftovers = [p.name for p in (tmp_path / "runs" / "artifacts").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def _small_yaml(tmp_path, toy_files, tiny_model_dir, **extra) -> Path:
    import yaml

    doc = toy_study(tmp_path, toy_files, tiny_model_dir, **extra)
    doc.update(strategies=[{"zero_shot": {}}, {"linear_probe": {}}], seeds=[0], train_sizes=["all"])
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_cli_runs_on_ray_and_refuses_what_no_node_can_run(tmp_path, toy_files, tiny_model_dir, ray_cluster):
    import json

    from typer.testing import CliRunner

    from tunebench.cli import app

    cli = CliRunner()
    path = _small_yaml(tmp_path, toy_files, tiny_model_dir)
    result = cli.invoke(app, ["run", str(path), "--executor", "ray", "--address", ray_cluster,
                              "--max-concurrent", "1", "--json"])
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 2

    bad = cli.invoke(app, ["run", str(path), "--executor", "slurm"])
    assert bad.exit_code != 0 and "--executor" in bad.output and "ray" in bad.output

    greedy = _small_yaml(tmp_path, toy_files, tiny_model_dir, store=str(tmp_path / "greedy"),
                         execution={"executor": "ray", "address": ray_cluster,
                                    "resources": {"linear_probe": {"gpu": 1}}})
    refused = cli.invoke(app, ["run", str(greedy)])
    assert refused.exit_code != 0 and "no node of the Ray cluster has that much" in refused.output

    typo = _small_yaml(tmp_path, toy_files, tiny_model_dir, execution={"executor": "ray", "resources": {"lroa": {}}})
    refused = cli.invoke(app, ["run", str(typo)])
    assert refused.exit_code != 0 and "execution.resources: unknown key(s) ['lroa']" in refused.output
