"""The distillation learning curve: ``pool_sizes`` runs one distill trial per size on nested pools, the dry run
prices every size, the exchange rate between teacher and gold labels on a hand-made table, and the curve in the
report and in ``tunebench show``."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.analysis.distill_curve import crossing, curve_name, distill_curves, exchange
from tunebench.analysis.evidence import Group
from tunebench.cli import app
from tunebench.errors import ConfigError
from tunebench.strategies import distill as distill_mod
from tunebench.strategies import registry

QUICK = {"epochs": 1, "batch_size": 16, "max_length": 32}
TEACHER = {"strategy": "few_shot", "params": {"shots": 2}}
STUDENT = {"strategy": "linear_probe", "params": QUICK}
runner = CliRunner()


def config(**params):
    return registry.get("distill").config_from_dict({"teacher": TEACHER, "student": STUDENT, **params})


def study_doc(tmp_path, toy_files, model_dir, distill_params: dict, *, gold: bool = False, **extra) -> dict:
    strategies = [{"distill": {"teacher": TEACHER, "student": STUDENT, **distill_params}}]
    if gold:
        strategies.append({"linear_probe": QUICK})
    return {"name": "curve", "task": {"data": {k: str(v) for k, v in toy_files.items()}, "text": "text",
                                      "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
            "models": [{"name": "tiny", "backend": "encoder", "path": str(model_dir), "precision": "fp32"}],
            "strategies": strategies, "seeds": [0], "train_sizes": [16], "store": str(tmp_path / "runs"), **extra}


def write_study(tmp_path, doc) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


# ---- expansion: nested pools ------------------------------------------------------------------------------------
def test_pool_sizes_expand_to_nested_prefix_pools(toy_task):
    cls = registry.get("distill")
    expanded = cls.expand(config(pool="train", pool_sizes=[30, 5, 12]))
    assert [c.pool_size for c in expanded] == [5, 12, 30] and all(c.pool_sizes is None for c in expanded)
    train = toy_task.train.subset(range(16))
    pools = [distill_mod.labelling_pool(c, toy_task, train, seed=3) for c in expanded]
    assert [len(p) for p in pools] == [5, 12, 30]
    for small, large in zip(pools, pools[1:]):
        assert small.texts == large.texts[:len(small)]  # the smaller pool is the larger one's first N
    assert not set(pools[-1].texts) & set(train.texts)  # still only train inputs outside the trial's own
    other_seed = distill_mod.labelling_pool(expanded[1], toy_task, train, seed=4)
    assert other_seed.texts != pools[1].texts  # the order is the seed's


def plan(path: str):
    from tunebench.runner.loading import load_study
    from tunebench.runner.study import Study

    cfg, base = load_study(path)
    return Study(cfg, base_dir=base).plan()


def test_pool_sizes_trials_share_keys_with_single_pool_size_entries(tmp_path, toy_files, tiny_model_dir):
    curve = plan(write_study(tmp_path, study_doc(tmp_path, toy_files, tiny_model_dir,
                                                 {"pool": "train", "pool_sizes": [8, 24]})))
    assert [t.config.pool_size for t in curve] == [8, 24]
    assert len({t.name for t in curve}) == 2 and all("pool_size=" in t.name for t in curve)
    single = plan(write_study(tmp_path, study_doc(tmp_path, toy_files, tiny_model_dir,
                                                  {"pool": "train", "pool_size": 24})))
    assert single[0].key == curve[1].key and single[0].name == curve[1].name  # one trial, however it was asked for
    assert curve_name(curve[0].name) == curve_name(curve[1].name)


@pytest.mark.parametrize("params,message", [
    ({"pool_sizes": [250, "x"]}, r"pool_sizes\.1"),
    ({"pool_sizes": [250, 250]}, r"pool_sizes: \[250\] given twice"),
    ({"pool_sizes": [0, 5]}, "pool_sizes: every size must be a whole number >= 1"),
    ({"pool_sizes": []}, "pool_sizes: give a list"),
    ({"pool_sizes": 250}, "pool_sizes"),
    ({"pool_sizes": [5], "pool_size": 5}, "pool_sizes: give either pool_size"),
])
def test_bad_pool_sizes_name_the_field(params, message):
    with pytest.raises(ConfigError, match=message):
        config(**params)


# ---- the dry run prices every pool size ---------------------------------------------------------------------------
def test_dry_run_sums_the_pool_sizes(tmp_path, toy_files, tiny_model_dir):
    path = write_study(tmp_path, study_doc(tmp_path, toy_files, tiny_model_dir,
                                           {"pool": "train", "pool_sizes": [5, 20], "budget": {"calls": 12}}))
    dry = runner.invoke(app, ["run", path, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["pending"] == 2 and [e["calls"] for e in plan["spend"]] == [5, 12]  # the call budget caps each trial
    assert [e["pool"] for e in plan["spend"]] == [5, 20] and [e["reused"] for e in plan["spend"]] == [0, 5]
    text = " ".join(runner.invoke(app, ["run", path, "--dry-run"]).stdout.split())
    assert "12 (5 reused)" in text  # the larger pool starts with the smaller one, whose labels it reuses
    assert "total: 12 teacher calls (5 more labels reused" in text


# ---- the exchange rate on a hand-made table -----------------------------------------------------------------------
DISTILLED = [{"labels": 250, "mean": 0.60}, {"labels": 1000, "mean": 0.70}, {"labels": 4000, "mean": 0.80}]


def test_exchange_rate_interpolates_in_log_labels_and_says_when_curves_do_not_cross():
    gold = [{"train_size": 100, "mean": 0.65}, {"train_size": 400, "mean": 0.75}, {"train_size": 1600, "mean": 0.90},
            {"train_size": 50, "mean": 0.55}]
    out = {e["gold"]: e for e in exchange(DISTILLED, gold)}
    assert out[100]["status"] == "crossed" and out[100]["teacher_labels"] == pytest.approx(500.0)  # sqrt(250 * 1000)
    assert out[100]["rate"] == pytest.approx(5.0) and "5.00 teacher labels per gold label" in out[100]["text"]
    assert out[400]["teacher_labels"] == pytest.approx(2000.0) and out[400]["rate"] == pytest.approx(5.0)
    assert out[1600]["status"] == "below" and out[1600]["rate"] is None
    assert "do not cross" in out[1600]["text"] and "0.800 at 4,000" in out[1600]["text"]
    assert out[50]["status"] == "above" and out[50]["rate"] == pytest.approx(5.0)
    assert "at most 5.00" in out[50]["text"] and "do not cross inside" in out[50]["text"]
    # a dip: the first pool size that reaches the level counts
    dip = [{"labels": 100, "mean": 0.5}, {"labels": 400, "mean": 0.7}, {"labels": 1600, "mean": 0.6}]
    assert crossing(dip, 0.6)["labels"] == pytest.approx(math.exp((math.log(100) + math.log(400)) / 2))


def group(label, strategy, size, mean, params, *, calls=None, model="tiny"):
    record = {"distill": {"labelling": {"calls": calls}}} if calls is not None else {}
    row = {"seed": 0, "params": params, "record": record, "metrics": {"accuracy": mean}, "cost": {}}
    family = "weight_tuning"
    return Group(label, strategy, family, model, size, [row], [], "accuracy", None)


def test_curves_from_groups_find_the_gold_curve_of_the_student_strategy():
    student = {"strategy": "full", "model": "tiny", "params": {"epochs": 3}}
    dist = {"teacher": {"strategy": "zero_shot"}, "student": student}
    groups = [group(f"distill(pool_size={n}, student=full)", "distill", 16, m, {**dist, "pool_size": n}, calls=c)
              for n, m, c in ((1000, 0.70, 1000), (250, 0.60, 250), (4000, 0.80, 3000))]
    groups.append(group("distill(pool_size=9, student=full) @other", "distill", 16, 0.1, {**dist, "pool_size": 9},
                        model="other"))  # one pool size on another model: no curve
    groups += [group("full(epochs=3)", "full", n, m, {"epochs": 3}) for n, m in ((100, 0.65), (400, 0.75))]
    groups += [group("full", "full", n, 0.99, {"epochs": 1}) for n in (100, 200, 400)]  # other params: not the student
    (c,) = distill_curves(groups, ci=lambda g: None)
    assert c["name"] == "distill(student=full)" and c["model"] == "tiny" and c["train_size"] == 16
    assert [p["labels"] for p in c["points"]] == [250, 1000, 3000]  # labels bought, not the configured size
    assert [p["pool_size"] for p in c["points"]] == [250, 1000, 4000]
    assert c["gold_label"] == "full(epochs=3)" and [p["train_size"] for p in c["gold"]] == [100, 400]
    assert [e["rate"] for e in c["exchange"]] == [pytest.approx(5.0), pytest.approx(math.exp(
        math.log(1000) + 0.5 * (math.log(3000) - math.log(1000))) / 400)]
    assert distill_curves([g for g in groups if g.strategy == "distill"], ci=lambda g: None)[0]["gold"] == []


# ---- end to end: run, report, show ------------------------------------------------------------------------------
def test_report_and_show_carry_the_distillation_curve(tmp_path, toy_files, tiny_model_dir):
    doc = study_doc(tmp_path, toy_files, tiny_model_dir, {"pool": "train", "pool_sizes": [6, 18]}, gold=True)
    path = write_study(tmp_path, doc)
    done = runner.invoke(app, ["run", path, "--json"])
    assert done.exit_code == 0, done.output
    trials = json.loads(done.stdout)["trials"]
    assert sorted(t["cost"]["labelling_calls"] for t in trials if t.get("distill")) == [6, 18]
    store = str(tmp_path / "runs")
    report = runner.invoke(app, ["report", "curve", "--store", store, "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    (c,) = json.loads((tmp_path / "rep" / "report.json").read_text())["analysis"]["distill_curves"]
    assert c["train_size"] == 16 and [(p["pool_size"], p["labels"]) for p in c["points"]] == [(6, 6), (18, 18)]
    assert all(p["ci"] and p["ci"][0] <= p["mean"] <= p["ci"][1] for p in c["points"])
    assert c["gold_label"].startswith("linear_probe") and [p["train_size"] for p in c["gold"]] == [16]
    (e,) = c["exchange"]
    assert e["gold"] == 16 and e["status"] in ("crossed", "above", "below")
    assert (e["rate"] is None) == (e["status"] == "below")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Distillation curve: teacher labels against gold labels" in html and 'id="fig-distill_curves"' in html
    assert e["text"] in html
    assert e["text"] in (tmp_path / "rep" / "report.md").read_text()
    shown = runner.invoke(app, ["show", "curve", "--store", store])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "distillation curve: distill(" in text and " ".join(e["text"].split()) in text
