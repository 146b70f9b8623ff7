"""The results store on SQLite and on a real PostgreSQL server: same behaviour, same CLI. Claims let several
drivers share one store; a commit is checked against the claim, so a trial is never stored twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.errors import StoreError
from tunebench.store import Store
from tunebench.store.prompts import PromptRegistry
from tunebench.store.results import new_owner

runner = CliRunner()


def _row(key: str, study: str = "s", acc: float = 0.5, template: str | None = None) -> dict:
    record = {"model": "default", "prompt": {"template": template} if template else None}
    return {"key": key, "study": study, "strategy": "few_shot", "family": "prompting", "label": f"few_shot {key}",
            "params": {"shots": 2}, "seed": 0, "train_size": 16, "train_size_spec": "16",
            "metrics": {"accuracy": acc}, "cost": {"adapt_seconds": 1.0}, "history": [], "record": record}


def _stage(store: Store, key: str, owner: str, content: str = "weights") -> str:
    loc = store.staging(key, owner)
    Path(loc).mkdir(parents=True)
    (Path(loc) / "predictor.json").write_text(json.dumps({"content": content}))
    return loc


@pytest.fixture()
def store(store_location, tmp_path) -> Store:
    return Store(store_location, artifacts=tmp_path / "artifacts" if "://" in store_location else None)


def test_rows_items_truth_and_studies_round_trip(store):
    store.save_study("s", {"name": "s"}, "study.yaml", ["k1", "k2"])
    owner = new_owner()
    assert store.claim("s", "k1", owner, ttl=60)
    assert store.add_trial(_row("k1", acc=0.75), _stage(store, "k1", owner), {"pred": [1, 0]},
                           ("fp", {"labels": [1, 1]}), owner=owner)
    [row] = store.trials("s")
    assert row["metrics"] == {"accuracy": 0.75} and row["params"] == {"shots": 2}
    assert json.loads((store.artifact_path(row) / "predictor.json").read_text()) == {"content": "weights"}
    assert store.items(["k1", "k2"]) == {"k1": {"pred": [1, 0]}}
    assert store.test_set("fp") == {"labels": [1, 1]} and store.test_set("nope") is None
    assert store.current_keys("s") == {"k1", "k2"} and store.done_keys("s") == {"k1"}
    assert [(s["name"], s["trials"]) for s in store.studies()] == [("s", 1)]
    assert store.claims("s") == []  # the commit dropped the claim
    with pytest.raises(StoreError, match="no study named 'other'"):
        store.study_config("other")


def test_a_trial_is_never_committed_twice(store):
    a, b = new_owner(), new_owner()
    assert store.claim("s", "k", a, ttl=60)
    assert not store.claim("s", "k", b, ttl=60)  # a live claim of another driver
    staged_a = _stage(store, "k", a, "first")
    assert store.add_trial(_row("k", acc=0.1), staged_a, owner=a)
    assert not store.claim("s", "k", b, ttl=60)  # finished
    staged_b = _stage(store, "k", b, "second")
    assert not store.add_trial(_row("k", acc=0.9), staged_b, owner=b)
    [row] = store.trials("s")
    assert row["metrics"]["accuracy"] == 0.1
    assert json.loads((store.artifact_path(row) / "predictor.json").read_text()) == {"content": "first"}
    assert not Path(staged_b).exists()  # the loser's staging is cleaned, the winner's artifact untouched


def test_an_expired_claim_passes_to_the_next_driver_and_the_old_owner_cannot_commit(store):
    dead, alive = new_owner(), new_owner()
    assert store.claim("s", "k", dead, ttl=0.5)
    staged_dead = _stage(store, "k", dead, "stale")
    time.sleep(0.8)
    assert [c["expired"] for c in store.claims("s")] == [True]
    assert store.claim("s", "k", alive, ttl=60)
    assert not Path(staged_dead).exists()  # the new holder of the key cleared the dead owner's staging
    staged_alive = _stage(store, "k", alive, "fresh")
    assert staged_dead != staged_alive  # staging is per owner
    assert not store.add_trial(_row("k", acc=0.2), staged_dead, owner=dead)  # its claim was taken over
    assert store.trials("s") == []
    assert store.add_trial(_row("k", acc=0.8), staged_alive, owner=alive)
    [row] = store.trials("s")
    assert json.loads((store.artifact_path(row) / "predictor.json").read_text()) == {"content": "fresh"}


def test_heartbeat_renews_and_release_frees(store):
    a, b = new_owner(), new_owner()
    assert store.claim("s", "k", a, ttl=0.5)
    assert store.renew(a, ttl=60) == 1
    time.sleep(0.7)
    assert not store.claim("s", "k", b, ttl=60)  # renewed: still a's
    store.release("k", a)
    assert store.claim("s", "k", b, ttl=60)


def test_failures_are_recorded_and_cleared_by_a_later_success(store):
    a = new_owner()
    assert store.claim("s", "k", a, ttl=60)
    store.record_failure("s", "k", "few_shot k", "ValueError: boom", a)
    assert [(f["key"], f["reason"]) for f in store.failures("s")] == [("k", "ValueError: boom")]
    assert store.claims("s") == []
    store.save_study("s", {"name": "s"}, None, ["k"])
    status = runner.invoke(app, ["store", "status", "--store", store.location, "--json"])
    assert status.exit_code == 0, status.output
    assert [f["reason"] for f in json.loads(status.stdout)["failures"]] == ["ValueError: boom"]
    shown = runner.invoke(app, ["show", "s", "--store", store.location, "--json"])
    assert json.loads(shown.stdout)["pending"] == {"planned": 1, "running": 0, "failed": [
        {k: v for k, v in store.failures("s")[0].items()}]}
    assert store.claim("s", "k", a, ttl=60)
    assert store.add_trial(_row("k"), None, owner=a)
    assert store.failures("s") == []


def test_prompt_registry_versions_on_both_databases(store):
    reg = PromptRegistry(store)
    assert reg.register("intent", "Classify: {{ input }}").ref == "intent@1"
    assert reg.register("intent", "Classify: {{ input }}").ref == "intent@1"  # same text, same version
    assert reg.register("intent", "Label: {{ input }}").ref == "intent@2"
    assert reg.get("intent@latest").version == 2
    owner = new_owner()
    store.claim("s", "k", owner, ttl=60)
    store.add_trial(_row("k", template="Label: {{ input }}"), None, owner=owner)
    [summary] = [s for s in reg.summary() if s["name"] == "s.few_shot"]
    assert summary["kinds"] == ["prompt"] and summary["trials"] == 1


def test_postgres_store_needs_an_artifact_root_and_remembers_it(pg_url, tmp_path):
    bare = Store(pg_url)
    with pytest.raises(StoreError, match="no artifact location"):
        bare.staging("k", new_owner())
    Store(pg_url, artifacts=tmp_path / "shared")
    assert Store(pg_url).artifacts.location == str((tmp_path / "shared").resolve())


def test_cli_reads_a_postgres_store(pg_url, tmp_path):
    store = Store(pg_url, artifacts=tmp_path / "art")
    store.save_study("s", {"name": "s"}, None, ["k"])
    owner = new_owner()
    store.claim("s", "k", owner, ttl=60)
    store.add_trial(_row("k"), None, owner=owner)
    result = runner.invoke(app, ["ls", "--store", pg_url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "tunebench:***@" in doc["store"] and [s["name"] for s in doc["studies"]] == ["s"]


def test_unreachable_postgres_is_a_clear_error():
    result = runner.invoke(app, ["ls", "--store", "postgresql://nobody:secret@127.0.0.1:9/none"])
    assert result.exit_code != 0
    assert "cannot open the results store" in result.output and "secret" not in result.output


def test_tracked_runs_are_kept_per_trial_and_target(store):
    store.save_study("s", {"name": "s"}, "study.yaml", ["k1", "k2"])
    assert store.add_trial(_row("k1"), None)
    assert store.trial("k1")["metrics"] == {"accuracy": 0.5} and store.trial("nope") is None
    assert store.tracked_runs("s", "mlflow|a|s") == {}
    store.set_tracked_run("s", "k1", "mlflow|a|s", "run1", "7")
    store.set_tracked_run("s", "k1", "mlflow|b|s", "run9", "1")  # another server: its own run
    store.set_tracked_run("s", "k1", "mlflow|a|s", "run2", "7")  # the run was deleted there and made again
    assert store.tracked_runs("s", "mlflow|a|s") == {"k1": "run2"}
    assert store.tracked_runs("s", "mlflow|b|s") == {"k1": "run9"}
    assert store.tracked_runs("other", "mlflow|a|s") == {}
