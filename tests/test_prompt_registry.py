"""The prompt registry: versions by content, references in studies, diff/log/export/import through the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.test_causal import colour_rows
from tunebench.cli import app
from tunebench.errors import ConfigError, StoreError
from tunebench.store.prompts import PromptRegistry, backfill, content_hash
from tunebench.store import Store

runner = CliRunner()
V1 = "{{ instruction }}\nWord: {{ input }}\nColour:"
V2 = "{{ instruction }}\nThe word: {{ input }}\nColour:"


def flat(result) -> str:
    """CLI output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture()
def reg(tmp_path) -> PromptRegistry:
    return PromptRegistry(Store(tmp_path / "runs"))


def test_versions_grow_only_when_the_text_changes(reg):
    first = reg.register("colours", V1, source="test")
    assert (first.version, first.hash, first.ref) == (1, content_hash(V1), "colours@1")
    again = reg.register("colours", V1)
    assert (again.version, again.hash, again.created) == (1, first.hash, first.created)
    second = reg.register("colours", V2)
    assert second.version == 2 and second.hash != first.hash
    assert reg.register("colours", V1).version == 1  # going back to old text is the old version
    assert reg.register("colours", V1 + "\n").version == 3  # one character is a new version
    assert reg.register("other", V1).version == 1  # numbers are per name
    assert [v.version for v in reg.versions("colours")] == [1, 2, 3]

    assert reg.get("colours").version == reg.get("colours@latest").version == 3
    assert reg.get("colours@2").template == V2
    assert reg.get(f"colours@#{second.hash[:6]}").version == 2
    with pytest.raises(StoreError, match=r"no prompt named 'nope'.*known: colours, other"):
        reg.get("nope@1")
    with pytest.raises(StoreError, match=r"no version 7 \(versions: 1 \(#\w{12}\), 2"):
        reg.get("colours@7")
    with pytest.raises(ConfigError, match="version number, 'latest'"):
        reg.get("colours@v2")
    with pytest.raises(ConfigError, match="prompt name"):
        reg.register("../escape", V1)


def test_diff_shows_the_changed_line_and_nothing_else(reg):
    lines = [f"line {i}: {{{{ input }}}}" for i in range(8)]
    reg.register("long", "\n".join(lines))
    lines[4] = "line 4 changed: {{ input }}"
    reg.register("long", "\n".join(lines))
    store = ["--store", str(reg.store.root)]
    result = runner.invoke(app, ["prompts", "diff", "long@1", "long@2", *store])
    assert result.exit_code == 0, result.output
    changed = [ln for ln in result.stdout.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert changed == ["-line 4: {{ input }}", "+line 4 changed: {{ input }}"]
    assert "long@1" in result.stdout and "long@2" in result.stdout
    same = runner.invoke(app, ["prompts", "diff", "long@2", "long@latest", *store])
    assert same.exit_code == 0 and "identical" in same.stdout
    missing = runner.invoke(app, ["prompts", "diff", "long@1", "long@9", *store])
    assert missing.exit_code == 2 and "no version 9" in flat(missing) and "Traceback" not in missing.output


@pytest.fixture()
def colour_study(tmp_path, tiny_llama_dir):
    """A causal zero-shot study whose prompt comes from the registry (write(ref) sets the reference)."""
    files = {k: str(write_csv(tmp_path / f"{k}.csv", colour_rows(n, s)))
             for k, n, s in (("train", 32, 1), ("dev", 8, 2), ("test", 12, 3))}

    def write(params: dict) -> Path:
        study = {"name": "colours", "task": {"data": files, "text": "text", "label": "label",
                                             "instruction": "Name the colour."},
                 "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
                 "strategies": [{"zero_shot": {"max_length": 64, **params}}],
                 "consistency": {"perturbations": []}, "store": "runs"}
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
        return path

    return write


def test_a_study_runs_a_registered_version_and_log_shows_its_score(tmp_path, colour_study):
    reg = PromptRegistry(Store(tmp_path / "runs"))
    reg.register("colours", V1)
    reg.register("colours", V2)
    reg.register("colours", V1 + "\nAnswer with one word.")  # @latest is not what the study asks for
    study = colour_study({"prompt": "colours@2"})
    result = runner.invoke(app, ["run", str(study), "--json"])
    assert result.exit_code == 0, result.output
    (trial,) = json.loads(result.stdout)["trials"]
    assert trial["prompt"]["template"] == V2 and trial["params"]["prompt"] == "colours@2"
    assert trial["label"] == "zero_shot(prompt=colours@2, max_length=64)"  # the reference, not the text

    store = ["--store", str(tmp_path / "runs")]
    log = json.loads(runner.invoke(app, ["prompts", "log", "colours", *store, "--json"]).stdout)
    used = {v["version"]: v["trials"] for v in log["versions"]}
    assert [u["key"] for u in used[2]] == [trial["key"]] and used[1] == used[3] == []
    assert used[2][0]["metric"] == "accuracy" and used[2][0]["score"] == trial["metrics"]["accuracy"]
    text = runner.invoke(app, ["prompts", "log", "colours", *store])
    assert text.exit_code == 0 and trial["key"][:8] in text.stdout
    assert f"{trial['metrics']['accuracy']:.3f}" in text.stdout
    doc = json.loads(runner.invoke(app, ["prompts", "list", *store, "--json"]).stdout)
    listed = {p["name"]: p for p in doc["prompts"]}
    assert listed["colours"]["latest"] == 3 and listed["colours"]["trials"] == 1
    assert listed["colours"]["best"]["version"] == 2
    shown = runner.invoke(app, ["prompts", "show", "colours@2", *store])
    assert shown.exit_code == 0 and "The word: {{ input }}" in shown.stdout and trial["key"][:8] in shown.stdout

    # @latest resolves when planned: a new latest version is a new trial
    from tunebench.runner import load_study
    from tunebench.runner.study import Study

    def keys(ref: str) -> set[str]:
        cfg, base = load_study(colour_study({"prompt": ref}))
        return {t.key for t in Study(cfg, base_dir=base).plan()}

    before = keys("colours@latest")
    reg.register("colours", V2 + " ")
    assert keys("colours@latest") != before and keys("colours@2") == {trial["key"]}


def test_unknown_reference_fails_before_any_trial(tmp_path, colour_study):
    PromptRegistry(Store(tmp_path / "runs")).register("colours", V1)
    for ref, expect in (("nope@1", "no prompt named 'nope'"), ("colours@4", "no version 4")):
        result = runner.invoke(app, ["run", str(colour_study({"prompt": ref}))])
        assert result.exit_code == 2, result.output
        assert "strategies[0].zero_shot.prompt" in flat(result) and expect in flat(result)
        assert "Traceback" not in result.output
    assert "tunebench prompts list" in flat(runner.invoke(app, ["run", str(colour_study({"prompt": "nope"}))]))
    with sqlite3.connect(tmp_path / "runs" / "tunebench.db") as con:
        assert con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0
    both = runner.invoke(app, ["validate", str(colour_study({"prompt": "colours@1", "template": V2}))])
    assert both.exit_code == 2 and "strategies[0].zero_shot: give either template" in flat(both)
    bad = runner.invoke(app, ["validate", str(colour_study({"prompt": "nope@1"}))])
    assert bad.exit_code == 2 and "strategies[0].zero_shot.prompt" in flat(bad)


def test_export_then_import_into_a_fresh_store_round_trips(tmp_path, reg):
    text = "Résumé: {{ input }}\r\nAnswer:\n"  # exact bytes: CRLF and a final newline survive
    reg.register("team/support-intent", V1)
    pv = reg.register("team/support-intent", text)
    store = ["--store", str(reg.store.root)]
    out = tmp_path / "prompts"
    result = runner.invoke(app, ["prompts", "export", "team/support-intent", "--out", str(out), *store])
    assert result.exit_code == 0, result.output
    file = out / "team" / "support-intent@2.jinja"
    assert file.read_bytes() == text.encode("utf-8")
    meta = yaml.safe_load(file.with_suffix(".yaml").read_text())
    assert meta == {"name": "team/support-intent", "version": 2, "hash": pv.hash, "kind": "prompt",
                    "source": None}

    fresh = ["--store", str(tmp_path / "fresh")]
    imported = runner.invoke(app, ["prompts", "import", str(file), *fresh, "--json"])
    assert imported.exit_code == 0, imported.output
    (doc,) = json.loads(imported.stdout)["imported"]
    assert (doc["name"], doc["version"], doc["hash"], doc["new"]) == ("team/support-intent", 1, pv.hash, True)
    again = json.loads(runner.invoke(app, ["prompts", "import", str(file), *fresh, "--json"]).stdout)["imported"]
    assert (again[0]["version"], again[0]["new"]) == (1, False)
    assert PromptRegistry(Store(tmp_path / "fresh")).get("team/support-intent@1").template == text

    file.write_text("Edited: {{ input }}", encoding="utf-8")  # reviewed and changed in version control
    edited = runner.invoke(app, ["prompts", "import", str(file), *fresh])
    assert edited.exit_code == 0 and "team/support-intent@2" in flat(edited) and "edited" in flat(edited)
    clash = runner.invoke(app, ["prompts", "export", "team/support-intent@2", "--out", str(out), *store])
    assert clash.exit_code == 2 and "support-intent@2.jinja exists with different content" in flat(clash)
    forced = runner.invoke(app, ["prompts", "export", "--all", "--out", str(out), "--force", *store])
    assert forced.exit_code == 0 and file.read_bytes() == text.encode("utf-8")
    named = runner.invoke(app, ["prompts", "import", str(file), "--name", "copy", *fresh])
    assert named.exit_code == 0 and "copy@1" in flat(named)


def test_encoder_label_templates_are_registered_and_backfilled(tmp_path, toy_files, tiny_model_dir):
    study = {"name": "toy", "task": {"data": {k: str(v) for k, v in toy_files.items()}, "text": "text",
                                     "label": "label"},
             "model": {"path": str(tiny_model_dir), "precision": "fp32"},
             "strategies": [{"zero_shot": {"label_templates": ["{{ label }}", "it was {{ label }}"]}}],
             "consistency": {"perturbations": []}, "store": "runs"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    store = Store(tmp_path / "runs")
    reg = PromptRegistry(store)
    assert reg.names() == ["builtin.label", "toy.zero_shot.label"]
    assert reg.get("toy.zero_shot.label").kind == "label" and len(reg.uses("builtin.label")) == 1

    with sqlite3.connect(store.db_path) as con:  # a store written before the registry existed
        con.execute("DELETE FROM prompts")
        con.execute("DELETE FROM prompt_uses")
    assert reg.names() == []
    listed = json.loads(runner.invoke(app, ["prompts", "list", "--store", str(store.root), "--json"]).stdout)
    assert [(p["name"], p["trials"]) for p in listed["prompts"]] == [("builtin.label", 1), ("toy.zero_shot.label", 1)]
    assert backfill(store) == 0  # already linked: nothing to do
