"""Groups of users (task.groups): per-group metrics and the gap between groups against hand-computed cases, small
groups flagged, the group constraints of the recommendation, storage with the test truth, show/report/ui."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tunebench.analysis import analyze
from tunebench.analysis.recommend import Constraints, recommend
from tunebench.cli import app
from tunebench.config import TaskConfig
from tunebench.data import load_task
from tunebench.errors import DataError
from tunebench.evaluation.groups import breakdown
from tunebench.evaluation.measure import score_test
from tunebench.evaluation.stats import metric_fn
from tunebench.store import Store

runner = CliRunner()


def run(preds: list[int], labels: list[int]) -> dict:
    return {"predictions": list(preds), "scores": {"accuracy": [float(p == y) for p, y in zip(preds, labels)]}}


def knock(labels: list[int], wrong: set[int]) -> list[int]:
    """Predictions equal to ``labels`` except at the indices in ``wrong``."""
    return [1 - y if i in wrong else y for i, y in enumerate(labels)]


# ---- the statistics, by hand ----------------------------------------------------------------------------------

def test_per_group_values_match_hand_counts_and_the_worst_group_is_the_lowest():
    # 10 items: group a = items 0-5 (2 wrong: 4/6), group b = items 6-9 (1 wrong: 3/4).
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    preds = knock(labels, {0, 1, 6})
    truth = {"labels": labels, "label_names": ["neg", "pos"]}
    bd = breakdown("channel", ["a"] * 6 + ["b"] * 4, [run(preds, labels)], truth, metric="accuracy",
                   metrics=["macro_f1"])
    a, b = bd.group("a"), bd.group("b")
    assert (a.n, b.n) == (6, 4)
    assert a.values["accuracy"] == pytest.approx(4 / 6) and b.values["accuracy"] == pytest.approx(3 / 4)
    # group a: truth 0,1,0,1,0,1 / predicted 1,0,0,1,0,1 -> per class P = R = 2/3 -> macro-F1 2/3
    assert a.values["macro_f1"] == pytest.approx(2 / 3)
    # group b: truth 0,1,0,1 / predicted 1,1,0,1 -> neg: P 1, R 1/2, F1 2/3; pos: P 2/3, R 1, F1 0.8 -> 0.7333
    assert b.values["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert bd.worst == "a" and bd.best == "b" and bd.gap == pytest.approx(3 / 4 - 4 / 6)
    # the point values (Fairlearn's MetricFrame) are those of tunebench's own metric on the group's items
    sub = metric_fn("macro_f1", [{"predictions": preds[6:], "scores": {}}], {**truth, "labels": labels[6:]})
    assert sub.value() == pytest.approx(b.values["macro_f1"])
    assert all(g.small for g in bd.groups)  # under 30 items: flagged


def test_gap_interval_is_exact_when_groups_are_all_right_and_all_wrong():
    labels = [i % 2 for i in range(80)]
    preds = knock(labels, set(range(40, 80)))  # group a all right, group b all wrong
    bd = breakdown("region", ["a"] * 40 + ["b"] * 40, [run(preds, labels)],
                   {"labels": labels, "label_names": ["n", "p"]}, metric="accuracy")
    assert bd.group("a").ci["accuracy"] == (1.0, 1.0) and bd.group("b").ci["accuracy"] == (0.0, 0.0)
    assert bd.gap == 1.0 and bd.gap_ci == (1.0, 1.0)
    assert not bd.small


def test_gap_interval_matches_the_normal_approximation_of_two_independent_proportions():
    """Group a: 180/200 right, group b: 120/200. The gap is 0.30 and its standard error is
    sqrt(.9 x .1 / 200 + .6 x .4 / 200) = 0.0406, so the 95% interval is about 0.30 ± 0.080."""
    labels = [i % 2 for i in range(400)]
    wrong = set(range(0, 200, 10)) | {200 + i for i in range(200) if i % 5 in (0, 2)}
    preds = knock(labels, wrong)
    bd = breakdown("segment", ["a"] * 200 + ["b"] * 200, [run(preds, labels)],
                   {"labels": labels, "label_names": ["n", "p"]}, metric="accuracy")
    assert bd.group("a").values["accuracy"] == pytest.approx(0.9)
    assert bd.group("b").values["accuracy"] == pytest.approx(0.6)
    assert bd.gap == pytest.approx(0.3)
    lo, hi = bd.gap_ci
    se = np.sqrt(0.9 * 0.1 / 200 + 0.6 * 0.4 / 200)
    assert lo == pytest.approx(0.3 - 1.96 * se, abs=0.015) and hi == pytest.approx(0.3 + 1.96 * se, abs=0.015)
    for name, p in (("a", 0.9), ("b", 0.6)):  # each group's own interval: p ± 1.96 sqrt(p(1-p)/200)
        glo, ghi = bd.group(name).ci["accuracy"]
        half = 1.96 * np.sqrt(p * (1 - p) / 200)
        assert glo == pytest.approx(p - half, abs=0.015) and ghi == pytest.approx(p + half, abs=0.015)


def test_the_gap_is_paired_across_seeds():
    """Two seeds that move both groups together (seed 1 gets 20 more items wrong in each group): the gap is 0.3
    on both seeds, so seed-to-seed variation cancels in it although it widens each group's interval."""
    labels = [i % 2 for i in range(400)]
    wrong0 = set(range(0, 200, 10)) | {200 + i for i in range(200) if i % 5 in (0, 2)}
    wrong1 = wrong0 | {i for i in range(1, 200, 10)} | {200 + i for i in range(200) if i % 10 == 1}
    runs = [run(knock(labels, wrong0), labels), run(knock(labels, wrong1), labels)]
    truth = {"labels": labels, "label_names": ["n", "p"]}
    values = ["a"] * 200 + ["b"] * 200
    two = breakdown("segment", values, runs, truth, metric="accuracy", seeds=[0, 1])
    one = breakdown("segment", values, runs[:1], truth, metric="accuracy", seeds=[0])
    assert two.gap == pytest.approx(0.3)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(two.group("a").ci["accuracy"]) > 1.3 * width(one.group("a").ci["accuracy"])  # seeds widen a group
    assert width(two.gap_ci) < 1.15 * width(one.gap_ci)  # but not the paired gap


def test_a_one_item_group_is_flagged_and_gets_no_interval():
    labels = [i % 2 for i in range(41)]
    preds = knock(labels, {40} | set(range(0, 40, 4)))
    bd = breakdown("channel", ["chat"] * 40 + ["fax"], [run(preds, labels)],
                   {"labels": labels, "label_names": ["n", "p"]}, metric="accuracy")
    fax = bd.group("fax")
    assert fax.n == 1 and fax.small and fax.ci["accuracy"] is None
    assert bd.worst == "fax" and bd.gap == pytest.approx(30 / 40) and bd.gap_ci is None
    assert [g.name for g in bd.small] == ["fax"] and bd.to_dict()["small"] == ["fax"]


def test_generation_groups_use_the_studys_metric():
    targets = ["yes", "no", "maybe", "yes"]
    preds = ["yes", "no", "no", "no"]
    items = {"predictions": preds, "scores": {"exact_match": [1.0, 1.0, 0.0, 0.0]}}
    bd = breakdown("lang", ["en", "en", "de", "de"], [items], {"targets": targets}, metric="exact_match")
    assert bd.group("en").values == {"exact_match": 1.0} and bd.group("de").values == {"exact_match": 0.0}
    assert bd.metrics == ["exact_match"] and bd.worst == "de"


# ---- storage and analysis -------------------------------------------------------------------------------------

def group_study(store: Store, name: str, trials: list[dict], labels: list[int], groups: dict | None,
                columns: list[str] | None = None) -> None:
    """Store finished trials (what the runner would have written); ``groups`` None: a store from before groups."""
    keys = []
    truth = {"labels": labels, "label_names": ["neg", "pos"]}
    if groups is not None:
        truth["groups"] = groups
    for t in trials:
        key = f"{name}-{t['label']}-{t.get('seed', 0)}"
        keys.append(key)
        items = run(t["predictions"], labels)
        acc = float(np.mean(items["scores"]["accuracy"]))
        row = {"key": key, "study": name, "strategy": t["label"], "family": t["family"], "label": t["label"],
               "params": {}, "seed": t.get("seed", 0), "train_size": t.get("train_size", 0), "train_size_spec": "all",
               "metrics": {"accuracy": acc, "macro_f1": acc, "confusion_matrix": [[1, 0], [0, 1]]},
               "cost": {"train_seconds": 1.0, "latency_ms_p50": 5.0, "latency_ms_p95": 6.0, "latency_ms_mean": 5.0,
                        "latency_ms_samples": [5.0] * 4, "trainable_params": 0, "prompt_tokens_mean": 20,
                        "completion_tokens_mean": 1, "tokens_per_request": 21},
               "history": [], "record": {"fingerprints": {"test": "fp"}, "model": "default"}}
        store.add_trial(row, None, items, ("fp", truth))
    task = {"type": "classification", "groups": columns if columns is not None else sorted(groups or {})}
    store.save_study(name, {"name": name, "task": task, "costs": {}}, None, keys)


def uneven_study(store: Store, name: str = "uneven", groups: bool = True,
                 columns: tuple[str, ...] = ("channel", "route")) -> None:
    """full is best on average (0.85) but 0.70 on email; few_shot is 0.84 on average and 0.80 on email."""
    labels = [i % 2 for i in range(200)]
    channel = ["chat"] * 100 + ["email"] * 100
    full = knock(labels, set(range(100, 130)))  # chat 100%, email 70%
    few = knock(labels, set(range(0, 12)) | set(range(100, 120)))  # chat 88%, email 80%
    fax_channel = channel[:-1] + ["fax"]  # a second column with a one-item group
    group_study(store, name, [{"label": "full", "family": "weight_tuning", "predictions": full, "train_size": 100},
                              {"label": "few_shot", "family": "prompting", "predictions": few}],
                labels, {"channel": channel, "route": fax_channel} if groups else None, columns=list(columns))


def test_analysis_reads_groups_from_the_stored_truth_and_old_stores_show_none(tmp_path):
    store = Store(tmp_path / "new")
    uneven_study(store)
    ev = analyze(store, "uneven")
    assert ev.group_columns == ["channel", "route"] and ev.groups_note() is None
    full = ev.group("full")
    by = {b.column: b for b in ev.by_group(full)}
    assert by["channel"].worst == "email" and by["channel"].gap == pytest.approx(0.3)
    assert by["route"].group("fax").small
    doc = ev.to_dict()
    entry = next(s for s in doc["strategies"] if s["label"] == "full")
    assert entry["groups"][0]["column"] == "channel" and doc["group_metrics"] == ["accuracy", "macro_f1"]

    old = Store(tmp_path / "old")  # trials stored before groups were: nothing shown, a note says why
    uneven_study(old, groups=False)
    ev = analyze(old, "uneven")
    assert ev.group_columns == [] and ev.by_group(ev.group("full")) == []
    assert "tunebench run" in ev.groups_note()
    assert ev.to_dict()["strategies"][0]["groups"] == []


def test_group_values_are_kept_added_and_merged_with_the_test_truth(tmp_path):
    store = Store(tmp_path)
    labels = [0, 1, 0, 1]
    row = lambda key: {"key": key, "study": "s", "strategy": "x", "family": "prompting", "label": key,  # noqa: E731
                       "params": {}, "seed": 0, "train_size": 0, "train_size_spec": "none", "metrics": {},
                       "cost": {}, "history": [], "record": {}}
    store.add_trial(row("a"), None, run(labels, labels), ("fp", {"labels": labels, "label_names": ["n", "p"]}))
    assert "groups" not in store.test_set("fp")
    assert store.add_test_groups("fp", {"region": ["eu", "eu", "us", "us"]})  # backfill: no trial rerun
    assert not store.add_test_groups("fp", {"region": ["eu", "eu", "us", "us"]})  # nothing new
    assert not store.add_test_groups("other", {"region": ["eu"] * 4})  # not stored yet: left to its first trial
    # a later trial from a study that names other groups (or none) keeps the region column
    store.add_trial(row("b"), None, run(labels, labels),
                    ("fp", {"labels": labels, "label_names": ["n", "p"], "groups": {"channel": list("abab")}}))
    assert store.test_set("fp")["groups"] == {"region": ["eu", "eu", "us", "us"], "channel": list("abab")}
    store.add_trial(row("c"), None, run(labels, labels), ("fp", {"labels": labels, "label_names": ["n", "p"]}))
    assert set(store.test_set("fp")["groups"]) == {"region", "channel"}


def test_task_groups_are_read_with_the_test_rows_and_scored_with_the_truth(tmp_path):
    rows = ["text,label,channel"] + [f"message number {i},{'pos' if i % 2 else 'neg'},{['chat', 'email'][i % 3 == 0]}"
                                     for i in range(60)]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    task = TaskConfig(data="all.csv", text="text", label="label", groups="channel")
    assert task.groups == ["channel"]
    data = load_task(task, tmp_path)  # the test split is carved from train: each item keeps its own group
    by_text = {f"message number {i}": ["chat", "email"][i % 3 == 0] for i in range(60)}
    assert data.test.groups["channel"] == [by_text[t] for t in data.test.texts]
    assert data.fingerprints() == load_task(TaskConfig(data="all.csv", text="text", label="label"),
                                            tmp_path).fingerprints()  # trial keys do not change with groups
    _, _, truth = score_test(data, data.test.labels)
    assert truth["groups"]["channel"] == data.test.groups["channel"]

    with pytest.raises(DataError, match=r"all\.csv: group column\(s\) \['region'\] not found.*task\.groups"):
        load_task(TaskConfig(data="all.csv", text="text", label="label", groups=["region"]), tmp_path)
    with pytest.raises(ValueError, match="named twice"):
        TaskConfig(data="all.csv", text="text", label="label", groups=["channel", "channel"])


# ---- the recommendation's group constraints, show --groups, report, ui ----------------------------------------

def test_recommend_excludes_a_strategy_over_the_group_gap_with_the_reason(tmp_path):
    store = Store(tmp_path / "runs")
    uneven_study(store, "channel", columns=("channel",))  # the route column's one-item group would fail everything
    uneven_study(store)
    ev = analyze(store, "channel")
    assert recommend(ev)["recommended"] == "full"  # best on average
    rec = recommend(ev, Constraints(max_group_gap=0.2))
    assert rec["recommended"] == "few_shot"
    full = next(r for r in rec["ranking"] if r["label"] == "full")
    assert not full["feasible"] and full["checks"]["group_gap"] == "fail"
    problem = full["problems"][0]
    assert "differs by 0.300 between groups of channel" in problem and "email accuracy 0.700" in problem
    assert "chat 1.000" in problem and "0.2" in problem
    assert "full scores higher on average" in rec["summary"]
    low = recommend(ev, Constraints(min_group_accuracy=0.75))
    assert low["recommended"] == "few_shot"
    full = next(r for r in low["ranking"] if r["label"] == "full")
    assert "accuracy on channel = email is 0.700" in full["problems"][0]

    res = runner.invoke(app, ["recommend", "uneven", "--store", str(tmp_path / "runs"), "--json",
                              "--max-group-gap", "0.05"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["constraints"]["max_group_gap"] == 0.05 and doc["constraints"]["min_group_accuracy"] is None
    assert doc["verdict"] == "none feasible"  # both have a gap over 0.05 (and fax is a group of one)
    ranked = {r["label"]: r for r in doc["ranking"]}
    assert any("between groups of route" in p and "n=1, small group" in p for p in ranked["few_shot"]["problems"])
    assert ranked["full"]["groups"][0]["worst"] == "email"
    res = runner.invoke(app, ["recommend", "uneven", "--store", str(tmp_path / "runs"), "--min-group-accuracy",
                              "0.75", "--max-group-gap", "nonsense"])
    assert res.exit_code == 2 and "--max-group-gap: cannot read 'nonsense'" in res.output


def test_group_constraints_without_group_values_are_not_enough_evidence(tmp_path):
    store = Store(tmp_path)
    uneven_study(store, groups=False)
    rec = recommend(analyze(store, "uneven"), Constraints(max_group_gap=0.1))
    assert rec["verdict"] == "not enough evidence"
    assert "no per-group results" in rec["summary"]


def test_show_groups_prints_groups_intervals_gap_and_flags(tmp_path):
    store = Store(tmp_path / "runs")
    uneven_study(store)
    res = runner.invoke(app, ["show", "uneven", "--store", str(tmp_path / "runs"), "--groups"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "by channel" in text and "email" in text and "0.700 [" in text and "worst" in text
    assert "gap chat − email" in text and "0.300 [" in text
    assert "⚠" in text and "fax" in text and "small group" in text
    assert "best on average: full" in text and "best worst group: few_shot" in text
    res = runner.invoke(app, ["show", "uneven", "--store", str(tmp_path / "runs"), "--groups", "--json"])
    doc = json.loads(res.stdout)
    full = next(s for s in doc["strategies"] if s["label"] == "full")
    assert full["groups"][0]["gap"] == pytest.approx(0.3) and len(full["groups"][0]["gap_ci"]) == 2

    old = Store(tmp_path / "old")
    uneven_study(old, groups=False)
    res = runner.invoke(app, ["show", "uneven", "--store", str(tmp_path / "old"), "--groups"])
    assert res.exit_code == 0 and "no stored group values" in res.stdout


def test_report_and_ui_show_groups(tmp_path):
    from tunebench import report
    from tunebench.cli.decide import write_report

    store = Store(tmp_path / "runs")
    uneven_study(store)
    ev = analyze(store, "uneven")
    figs = report.figures(report.build(ev, recommend(ev)))
    assert "groups" in figs and figs["groups"][:4] == b"\x89PNG"
    paths = write_report(ev, Constraints(max_group_gap=0.2), tmp_path / "rep", store.root)["paths"]
    html = paths["html"].read_text()
    assert 'id="groups"' in html and "By channel" in html and "fax" in html and "⚠" in html
    assert "gap between groups ≤ 0.2" in html
    md = paths["md"].read_text()
    assert "### By channel" in md and "figures/groups.png" in md

    from fastapi.testclient import TestClient

    from tunebench.ui import create_app

    client = TestClient(create_app(store), base_url="http://127.0.0.1")
    page = client.get("/study/uneven", params={"max_group_gap": "0.2"})
    assert page.status_code == 200
    assert "By channel" in page.text and 'name="max_group_gap"' in page.text
    assert "differs by 0.300 between groups of channel" in page.text
