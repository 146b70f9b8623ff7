"""`tunebench store copy`: a study's trials, artifacts and prompt registry moved between a SQLite directory, a
PostgreSQL store and an artifact root behind an fsspec URL; the copies serve the same predictions."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.store import Store
from tunebench.store.artifacts import open_trial
from tunebench.store.prompts import PromptRegistry

runner = CliRunner()


@pytest.fixture()
def source_store(tmp_path, toy_files, tiny_model_dir, tiny_backend) -> str:
    study = {"name": "small", "task": {"type": "classification", "data": {k: str(v) for k, v in toy_files.items()},
                                       "text": "text", "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
             "model": {"backend": "encoder", "path": str(tiny_model_dir), "precision": "fp32"},
             "training": {"epochs": 1, "batch_size": 16, "max_length": 32},
             "strategies": [{"zero_shot": {"label_templates": ["it was {{ label }}"]}}, {"linear_probe": {}}],
             "store": str(tmp_path / "laptop")}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return str(tmp_path / "laptop")


def _copy(src: str, dst: str, *extra: str) -> dict:
    result = runner.invoke(app, ["store", "copy", src, dst, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _predictions(store: Store, backend) -> dict[str, list]:
    texts = ["the movie was wonderful", "quite dull and bad"]
    return {r["key"]: [int(p) for p in open_trial(store, "small", r, backend).predictor.predict(texts)]
            for r in store.trials("small")}


def test_copy_to_postgres_and_back(source_store, pg_url, tmp_path, tiny_backend):
    doc = _copy(source_store, pg_url, "--artifacts", str(tmp_path / "team-artifacts"))
    assert doc["studies"] == {"small": {"copied": 2, "skipped": 0}} and doc["prompts_added"] >= 1
    src, team = Store(source_store), Store(pg_url)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "artifact"} for r in rows]  # noqa: E731
    assert strip(team.trials("small")) == strip(src.trials("small"))  # same rows, finish times included
    assert team.current_keys("small") == src.current_keys("small")
    keys = [r["key"] for r in src.trials("small")]
    assert team.items(keys) == src.items(keys)
    assert [v.ref for v in PromptRegistry(team).versions("small.zero_shot.label")] == ["small.zero_shot.label@1"]
    assert _predictions(team, tiny_backend) == _predictions(src, tiny_backend)

    again = _copy(source_store, pg_url)  # the store remembers its artifact root
    assert again["studies"] == {"small": {"copied": 0, "skipped": 2}} and again["prompts_added"] == 0

    back = _copy(pg_url, str(tmp_path / "back"))
    assert back["studies"]["small"]["copied"] == 2
    assert _predictions(Store(tmp_path / "back"), tiny_backend) == _predictions(src, tiny_backend)
    shown = runner.invoke(app, ["show", "small", "--store", pg_url, "--json"])
    assert shown.exit_code == 0, shown.output


def test_artifacts_behind_an_fsspec_url(source_store, tmp_path, tiny_backend):
    url = f"file://{tmp_path}/bucket/prefix"
    doc = _copy(source_store, str(tmp_path / "elsewhere"), "--artifacts", url, "--study", "small")
    assert doc["studies"]["small"]["copied"] == 2
    dst = Store(tmp_path / "elsewhere", artifacts=url)
    for row in dst.trials("small"):
        assert dst.artifact_location(row) == f"{url}/{row['key']}"
        assert (tmp_path / "bucket" / "prefix" / row["key"] / "predictor.json").is_file()
    assert dst.artifacts.leftovers() == []
    assert _predictions(dst, tiny_backend) == _predictions(Store(source_store), tiny_backend)


def test_copy_of_an_unknown_study_writes_nothing(source_store, tmp_path):
    result = runner.invoke(app, ["store", "copy", source_store, str(tmp_path / "dst"), "--study", "nope"])
    assert result.exit_code != 0 and "no study named 'nope'" in result.output
    assert Store(tmp_path / "dst").studies() == []
