"""Distill: unlabelled data, a prompted teacher labelling a pool within a budget, a student trained on its labels,
the label audit, the dry-run estimate and the errors of a bad config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.config import TaskConfig
from tunebench.config.costs import ApiPrice, CostConfig
from tunebench.data import load_task
from tunebench.errors import ConfigError, DataError
from tunebench.evaluation.metrics import label_audit
from tunebench.strategies import distill as distill_mod
from tunebench.strategies import registry

from .conftest import toy_rows, write_csv

QUICK = {"epochs": 1, "batch_size": 16, "max_length": 32}
TEACHER = {"strategy": "few_shot", "params": {"shots": 2}}
STUDENT = {"strategy": "linear_probe", "params": QUICK}
runner = CliRunner()


def distill(params: dict, **kw):
    cls = registry.get("distill")
    return cls(cls.config_from_dict({"teacher": TEACHER, "student": STUDENT, **params}), seed=0, **kw)


def task_with_pool(toy_files, tmp_path, rows, name="pool.csv", header=("text", "label")):
    path = write_csv(tmp_path / name, rows, header=header)
    cfg = TaskConfig(data={**{k: str(v) for k, v in toy_files.items()}, "unlabelled": str(path)}, text="text",
                     label="label", labels={"neg": "negative", "pos": "positive"})
    return load_task(cfg)


@pytest.fixture()
def spy(monkeypatch):
    """Every labelling run of the teacher, as it returned."""
    runs = []
    real = distill_mod.label
    monkeypatch.setattr(distill_mod, "label", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    return runs


# ---- unlabelled data ---------------------------------------------------------------------------------------------
def test_unlabelled_file_is_checked_and_cleaned(toy_files, tmp_path, caplog):
    dev_text = load_task(TaskConfig(data={k: str(v) for k, v in toy_files.items()}, text="text",
                                    label="label")).dev.texts[0]
    rows = [(t, "") for t, _ in toy_rows(12, 7)]
    rows += [rows[0], (dev_text, "")]  # a duplicate and a dev input
    data = task_with_pool(toy_files, tmp_path, [(t,) for t, _ in rows], header=("text",))
    assert len(data.unlabelled) == 12 and (data.unlabelled.labels == -1).all()
    assert data.checks["duplicates_unlabelled"] == 1 and data.checks["overlap_unlabelled_dropped"] == 1
    assert any("dev or test dropped" in w for w in data.warnings)
    assert "unlabelled" not in data.fingerprints()  # other trials' keys do not move

    gold = task_with_pool(toy_files, tmp_path, [("a b c", "pos"), ("d e f", "")], name="gold.csv")
    assert gold.unlabelled.labels.tolist() == [1, -1]  # a known gold label is kept (audit), a blank one is not

    with pytest.raises(DataError, match="column\\(s\\) \\['text'\\] not found"):
        task_with_pool(toy_files, tmp_path, [("x",)], name="bad.csv", header=("body",))
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_task(TaskConfig(data={**{k: str(v) for k, v in toy_files.items()},
                                   "unlabelled": str(tmp_path / "empty.csv")}, text="text", label="label"))
    with pytest.raises(DataError, match="no unlabelled input left"):
        task_with_pool(toy_files, tmp_path, [(dev_text,)], name="leak.csv", header=("text",))


# ---- the teacher never sees gold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["unlabelled", "train"])
def test_poisoned_pool_gold_changes_neither_teacher_nor_student(pool, tiny_backend, toy_files, tmp_path, spy):
    rows = toy_rows(24, 11)
    clean = task_with_pool(toy_files, tmp_path, rows, name="clean.csv")
    flipped = [(t, "neg" if y == "pos" else "pos") for t, y in rows]
    poisoned = task_with_pool(toy_files, tmp_path, flipped, name="poisoned.csv")
    if pool == "train":  # the trial's labelled examples are train's first 16; the pool is the other 48
        poisoned.train.labels = clean.train.labels.copy()
        poisoned.train.labels[16:] = 1 - poisoned.train.labels[16:]
    runs = []
    for data in (clean, poisoned):
        pred = distill({"pool": pool, "pool_size": 20}).adapt(tiny_backend, data, train=data.train.subset(range(16)),
                                                              dev=data.dev)
        runs.append((pred, spy[-1]))
    (a, la), (b, lb) = runs
    np.testing.assert_array_equal(la.predictions, lb.predictions)
    np.testing.assert_allclose(la.scores, lb.scores)
    test = clean.test.records()
    np.testing.assert_allclose(a.predict_scores(test), b.predict_scores(test), rtol=1e-6, atol=1e-6)
    audit_a, audit_b = a.distill["audit"], b.distill["audit"]
    assert audit_a["n"] == audit_b["n"] == 20
    assert audit_a["agreement"] == pytest.approx(1 - audit_b["agreement"])  # the poison reached only the audit


# ---- budget and dry run ------------------------------------------------------------------------------------------
def test_call_budget_is_the_estimate_and_never_exceeded(tiny_backend, toy_task, spy):
    train = toy_task.train.subset(range(16))
    strategy = distill({"pool": "train", "budget": {"calls": 7}})
    est = registry.get("distill").spend_estimate(strategy.config, toy_task, train, 0, None)
    assert est["pool"] == len(toy_task.train) - 16 and est["calls"] == 7 and est["dollars"] is None
    pred = strategy.adapt(tiny_backend, toy_task, train=train, dev=toy_task.dev)
    assert spy[-1].calls == 7 == len(spy[-1].predictions) and spy[-1].stopped is None
    assert pred.distill["pool"]["labelled"] == 7 and pred.distill["audit"]["n"] == 7


def test_dollar_budget_stops_before_exceeding(tiny_backend, toy_task, spy):
    costs = CostConfig(api={"teacher": ApiPrice(input_per_1m=1e6)})  # one dollar per prompt token
    train = toy_task.train.subset(range(16))
    strategy = distill({"pool": "train", "budget": {"dollars": 60},
                        "teacher": {**TEACHER, "model": "teacher"}}, peers={"teacher": tiny_backend}, costs=costs)
    est = registry.get("distill").spend_estimate(strategy.config, toy_task, train, 0, costs)
    assert est["calls"] == len(toy_task.train) - 16 and est["dollars"] > 60  # the calls alone would overspend
    strategy.adapt(tiny_backend, toy_task, train=train, dev=toy_task.dev)
    run = spy[-1]
    assert 0 < run.calls < est["calls"] and run.stopped and "dollar budget" in run.stopped
    assert run.dollars == run.prompt_tokens <= 60  # priced as the cost model prices API tokens
    with pytest.raises(ConfigError, match="none of the teacher's 0 label"):
        distill({"pool": "train", "budget": {"dollars": 0}}).adapt(tiny_backend, toy_task, train=train,
                                                                   dev=toy_task.dev)


def test_causal_teacher_on_another_model_labels_for_an_encoder_student(tiny_backend, tiny_llama, toy_task, spy):
    """The teacher's backend is a second model (a causal LM scoring labels); its calls are priced before they are
    made (prompt tokens counted here, the longest label as the answer), so the dollar budget holds exactly."""
    costs = CostConfig(api={"llama": ApiPrice(input_per_1m=1e6, output_per_1m=1e6)})
    teacher = {"strategy": "zero_shot", "model": "llama", "params": {"max_length": 160}}
    pred = distill({"pool": "train", "teacher": teacher, "budget": {"dollars": 400}}, peers={"llama": tiny_llama},
                   costs=costs).adapt(tiny_backend, toy_task, train=toy_task.train.subset(range(16)), dev=toy_task.dev)
    run = spy[-1]
    assert "template" in pred.distill["teacher"]["prompt"] and pred.backend is tiny_backend
    assert 0 < run.calls < 48 and run.stopped and run.completion_tokens > 0
    assert run.dollars == run.prompt_tokens + run.completion_tokens <= 400


# ---- soft labels -------------------------------------------------------------------------------------------------
def test_soft_targets_train_like_one_hot_hard_labels(tiny_backend, toy_task):
    """A one-hot distribution is the hard label: the same loss, the same model; a real distribution trains too."""
    lp = registry.get("linear_probe")
    cfg = lp.config_from_dict({**QUICK, "epochs": 2})
    hard = lp(cfg, seed=0).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
    soft_split = toy_task.train.subset(range(len(toy_task.train)))
    soft_split.soft = np.eye(2, dtype=np.float32)[soft_split.labels]
    soft = lp(cfg, seed=0).adapt(tiny_backend, toy_task, train=soft_split, dev=toy_task.dev)
    test = toy_task.test.records()
    np.testing.assert_allclose(hard.predict_scores(test), soft.predict_scores(test), rtol=1e-5, atol=1e-6)


def test_soft_labels_from_the_teacher_train_the_student(tiny_backend, toy_task, spy):
    pred = distill({"pool": "train", "labels": "soft", "temperature": 0.05}).adapt(
        tiny_backend, toy_task, train=toy_task.train.subset(range(16)), dev=toy_task.dev)
    assert pred.distill["pool"]["soft"] is True
    probs = distill_mod.softmax(spy[-1].scores, 0.05)
    assert np.allclose(probs.sum(1), 1) and (probs.max(1) < 1).any()  # distributions, not one-hot
    assert len(pred.train_result.history) == 1 and np.isfinite(pred.train_result.history[0]["train_loss"])
    keep = distill({"pool": "train", "temperature": 0.05, "min_confidence": float(np.median(probs.max(1)))}).adapt(
        tiny_backend, toy_task, train=toy_task.train.subset(range(16)), dev=toy_task.dev)
    assert 0 < keep.distill["pool"]["kept"] < keep.distill["pool"]["labelled"]


# ---- the audit ---------------------------------------------------------------------------------------------------
def test_audit_numbers_on_a_hand_made_case():
    gold = [0, 0, 1, 1, -1, 1]
    teacher = [0, 1, 1, -1, 0, 1]
    a = label_audit(gold, teacher, ["neg", "pos"], kept=[True, True, False, False, True, True])
    assert a["n"] == 5 and a["n_labelled"] == 6 and a["unparsed"] == 1
    assert a["agreement"] == pytest.approx(3 / 5)
    assert a["confusion_matrix"] == [[1, 1], [0, 2]]
    assert a["per_class"]["neg"] == {"gold": 2, "teacher": 1, "precision": 1.0, "recall": 0.5}
    assert a["per_class"]["pos"]["gold"] == 3 and a["per_class"]["pos"]["teacher"] == 3
    assert a["per_class"]["pos"]["precision"] == pytest.approx(2 / 3) and a["per_class"]["pos"]["recall"] == \
        pytest.approx(2 / 3)
    assert a["n_kept"] == 3 and a["agreement_kept"] == pytest.approx(2 / 3)  # the unlabelled kept one is not counted
    assert label_audit([-1, -1], [0, 1], ["neg", "pos"])["agreement"] is None


# ---- bad config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,field", [
    ({"teacher": {"strategy": "full"}}, "teacher.strategy"),
    ({"student": {"strategy": "zero_shot"}}, "student.strategy"),
    ({"teacher": {"strategy": "few_shot", "params": {"shots": 0}}}, "teacher.params"),
    ({"student": {"strategy": "full", "params": {"epochs": -1}}}, "student.params"),
    ({"teacher": {"strategy": "few_shot", "size": 3}}, "teacher: unknown key"),
    ({"budget": {"calls": -1}}, "budget.calls"),
    ({"budget": {"euros": 3}}, "budget: unknown key"),
    ({"pool": "dev"}, "pool must be"),
    ({"labels": "fuzzy"}, "labels must be"),
    ({"min_confidence": 2}, "min_confidence"),
    ({"teacher": {"strategy": "zero_shot", "params": {"prompt": "x@1"}}}, "teacher.params.prompt"),
])
def test_bad_config_names_the_field(params, field):
    with pytest.raises(ConfigError, match=field.replace("(", "\\(")):
        registry.get("distill").config_from_dict(params)


def test_pool_unlabelled_without_a_file_says_what_to_do(tiny_backend, toy_task):
    with pytest.raises(ConfigError, match="task.data.unlabelled"):
        distill({}).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
    with pytest.raises(ConfigError, match="train_sizes below"):
        distill({"pool": "train"}).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)


def study_doc(tmp_path, toy_files, model_dir, distill_params: dict, **extra) -> dict:
    return {"name": "distil", "task": {"data": {k: str(v) for k, v in toy_files.items()}, "text": "text",
                                       "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
            "models": [{"name": "tiny", "backend": "encoder", "path": str(model_dir), "precision": "fp32"}],
            "strategies": [{"distill": distill_params}], "seeds": [0], "train_sizes": [16],
            "store": str(tmp_path / "runs"), **extra}


def test_study_level_errors_name_the_entry(tmp_path, toy_files, tiny_model_dir):
    from tunebench.runner.loading import load_study

    def load(params, **extra):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(study_doc(tmp_path, toy_files, tiny_model_dir, params, **extra)))
        return load_study(path)

    with pytest.raises(ConfigError, match=r"strategies\[0\]\.distill\.teacher\.model: no model named 'gpt'"):
        load({"teacher": {"strategy": "zero_shot", "model": "gpt"}})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.distill\.student\.model: no model named 'big'"):
        load({"student": {"strategy": "full", "model": "big"}})
    with pytest.raises(ConfigError, match="neither inside a search nor under cv"):
        load({"pool": "train"}, cv=2)


# ---- end to end: dry run, run, show ------------------------------------------------------------------------------
def test_dry_run_estimate_equals_the_calls_the_run_makes(tmp_path, toy_files, tiny_model_dir):
    params = {"teacher": TEACHER, "student": STUDENT, "pool": "train", "budget": {"calls": 9}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc(tmp_path, toy_files, tiny_model_dir, params)), encoding="utf-8")
    dry = runner.invoke(app, ["run", str(path), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["pending"] == 1 and plan["spend"][0]["calls"] == 9
    assert not (tmp_path / "runs" / "tunebench.db").exists()  # nothing written, nothing spent
    text = " ".join(runner.invoke(app, ["run", str(path), "--dry-run"]).stdout.split())
    assert "paid calls before training" in text and "total: 9 teacher calls" in text

    done = runner.invoke(app, ["run", str(path), "--json"])
    assert done.exit_code == 0, done.output
    trial = json.loads(done.stdout)["trials"][0]
    assert trial["cost"]["labelling_calls"] == 9 and trial["cost"]["teacher_seconds"] > 0
    assert trial["cost"]["train_seconds"] >= trial["cost"]["teacher_seconds"]  # labelling is upfront cost
    d = trial["distill"]
    assert d["audit"]["n"] == 9 and len(d["teacher_key"]) == 20
    shown = runner.invoke(app, ["show", "distil", "--store", str(tmp_path / "runs")])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "label audit on 9 gold-labelled input(s)" in text and "labelled 9 of 48 pool inputs" in text
    again = runner.invoke(app, ["run", str(path), "--dry-run", "--json"])
    assert json.loads(again.stdout)["pending"] == 0
    report = runner.invoke(app, ["report", "distil", "--store", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    entry = json.loads((tmp_path / "rep" / "report.json").read_text())["analysis"]["strategies"][0]
    assert entry["distill"]["seeds"][0]["audit"]["n"] == 9
    assert entry["distill"]["agreement_mean"] == d["audit"]["agreement"]
    assert "Distillation: teacher labels and their audit" in (tmp_path / "rep" / "report.html").read_text()
    assert "| distill(" in (tmp_path / "rep" / "report.md").read_text()


# ---- the cascade curve -------------------------------------------------------------------------------------------
def cascade_table(shift: float = 0.0):
    from tunebench.evaluation.cascade import CascadeTable

    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3]) - shift
    return CascadeTable(conf, np.array([1, 1, 1, 0, 1, 0, 0, 1]), np.array([1, 1, 0, 1, 1, 1, 1, 0]),
                        student_cost=0.001, teacher_cost=0.02, student_latency_ms=10.0, teacher_latency_ms=500.0)


def test_cascade_curve_on_a_hand_made_table():
    from tunebench.evaluation.cascade import at, curve

    table = cascade_table()
    everything = curve(table)
    assert len(everything) == 10  # 0, the eight confidences, just above the largest
    points = {round(p.threshold, 6): p for p in everything[:-1]}
    none, every = points[0.0], everything[-1]
    assert (none.accuracy, none.fallback_rate, none.cost_per_request) == (5 / 8, 0.0, 0.001)  # the student alone
    assert (every.accuracy, every.fallback_rate) == (6 / 8, 1.0)  # the teacher alone (after the student)
    assert every.cost_per_request == pytest.approx(0.021)
    p = at(table, 0.6)  # 0.55, 0.4 and 0.3 go to the teacher
    assert p.accuracy == 6 / 8 and p.fallback_rate == 3 / 8
    assert p.cost_per_request == pytest.approx(0.001 + 3 / 8 * 0.02)
    assert p.latency_ms_p50 == 10.0 and p.latency_ms_p95 == pytest.approx(510.0)
    best = points[0.8]  # beats both models alone
    assert best.accuracy == 7 / 8 and best.fallback_rate == 5 / 8


def test_cascade_threshold_is_chosen_on_dev_for_a_target():
    from tunebench.evaluation.cascade import at, check_target, choose, curve, select_on_dev

    dev = curve(cascade_table())
    assert choose(dev, {"min_accuracy": 0.75}).threshold == 0.6  # the least fallback that reaches it
    assert choose(dev, {"max_fallback": 0.7}).threshold == 0.8  # the most accurate within it
    assert choose(dev, {"min_accuracy": 0.95}) is None
    test = cascade_table(shift=0.05)
    out = select_on_dev(cascade_table(), test, {"max_fallback": 0.7})
    assert out["dev"]["threshold"] == 0.8 and out["test"] == at(test, 0.8).to_dict()
    assert len(out["curve"]) == 10
    with pytest.raises(ConfigError, match="target.min_accuracy"):
        check_target({"min_accuracy": 2})
    with pytest.raises(ConfigError, match="target: give one of"):
        check_target({"accuracy": 0.9})


# ---- the teacher's own trial is reused -----------------------------------------------------------------------------
def test_teacher_reuses_the_studys_own_trial_of_it(tmp_path, toy_files, tiny_model_dir, monkeypatch):
    """A study that has the teacher's own trial (same key) labels with its stored predictor instead of adapting the
    teacher again, charges that trial's adaptation time, and trains the same student as a study without it."""
    cls = registry.get("few_shot")
    adapted = []
    real = cls.adapt
    monkeypatch.setattr(cls, "adapt", lambda self, *a, **k: adapted.append(1) or real(self, *a, **k))
    params = {"teacher": TEACHER, "student": STUDENT, "pool": "train", "budget": {"calls": 9}}

    def run(where, strategies):
        doc = {**study_doc(where, toy_files, tiny_model_dir, params), "strategies": strategies}
        path = where / "study.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        out = runner.invoke(app, ["run", str(path), "--json"])
        assert out.exit_code == 0, out.output
        return {t["strategy"]: t for t in json.loads(out.stdout)["trials"]}

    (tmp_path / "a").mkdir()
    both = run(tmp_path / "a", [{"few_shot": TEACHER["params"]}, {"distill": params}])
    assert len(adapted) == 1  # the own trial adapted the teacher; distill adopted it
    d = both["distill"]["distill"]
    assert d["teacher_reused"] is True and d["teacher_key"] == both["few_shot"]["key"]
    stored = json.loads((tmp_path / "a" / "runs" / "artifacts" / both["few_shot"]["key"] / "adapted.json")
                        .read_text())
    assert d["teacher_seconds"] == round(stored["adapt_seconds"], 4)
    assert both["distill"]["cost"]["train_seconds"] >= stored["adapt_seconds"]  # still the labels' upfront cost

    (tmp_path / "b").mkdir()
    alone = run(tmp_path / "b", [{"distill": params}])
    assert len(adapted) == 2 and alone["distill"]["distill"]["teacher_reused"] is False
    assert alone["distill"]["distill"]["audit"] == d["audit"]  # the same teacher labels
    assert alone["distill"]["metrics"]["accuracy"] == both["distill"]["metrics"]["accuracy"]


def test_trials_sharing_a_teacher_buy_each_label_once(tmp_path, toy_files, tiny_model_dir, spy):
    """Pool sizes of one curve share their teacher: the larger pool replays the smaller one's labels (its prefix)
    instead of asking again, at what they cost then, and trains the same student as when it labels them all."""
    params = {"teacher": TEACHER, "student": STUDENT, "pool": "train", "pool_sizes": [6, 12]}

    def run(where, params):
        where.mkdir()
        path = where / "study.yaml"
        path.write_text(yaml.safe_dump(study_doc(where, toy_files, tiny_model_dir, params)), encoding="utf-8")
        dry = json.loads(runner.invoke(app, ["run", str(path), "--dry-run", "--json"]).stdout)
        planned.append([(e["calls"], e["reused"]) for e in dry["spend"]])
        out = runner.invoke(app, ["run", str(path), "--json"])
        assert out.exit_code == 0, out.output
        return {t["distill"]["pool"]["size"]: t for t in json.loads(out.stdout)["trials"]}

    planned = []
    curve = run(tmp_path / "curve", params)
    assert planned[0] == [(6, 0), (12, 6)]  # the dry run counts the labels the smaller pool buys first
    small, large = spy[-2], spy[-1]
    assert (small.calls, small.reused) == (6, 0) and (large.calls, large.reused) == (12, 6)
    assert large.predictions[:6].tolist() == small.predictions.tolist()
    assert large.reused_dollars == pytest.approx(small.dollars)  # bought once, counted in both recipes
    lab = curve[12]["distill"]["labelling"]
    assert lab["reused"] == 6 and lab["seconds"] >= small.seconds
    shown = runner.invoke(app, ["show", "distil", "--store", str(tmp_path / "curve" / "runs")])
    assert "6 of them reused, bought by an earlier trial" in " ".join(shown.stdout.split())
    files = list((tmp_path / "curve" / "runs" / "artifacts" / ".teacher-labels").glob("*/*.json"))
    assert len(files) == 2  # one file per trial that labelled, under the teacher's key

    alone = run(tmp_path / "alone", {**params, "pool_sizes": None, "pool_size": 12})
    assert planned[1] == [(12, 0)] and spy[-1].reused == 0
    assert spy[-1].predictions.tolist() == large.predictions.tolist()
    assert alone[12]["metrics"]["accuracy"] == curve[12]["metrics"]["accuracy"]
    assert alone[12]["distill"]["audit"] == curve[12]["distill"]["audit"]


def test_label_cache_ignores_a_torn_file_and_keeps_one_file_per_trial(tmp_path, caplog):
    from tunebench.store.labels import LabelCache
    from tunebench.store.locations import ArtifactRoot

    root = ArtifactRoot(tmp_path)
    entry = {"label": 1, "scores": [0.1, 0.9], "prompt_tokens": 3, "completion_tokens": 1, "cost": 0.5,
             "seconds": 0.01}
    LabelCache(root, "teacher", "trial-a").add(["x", "y"], [entry, {**entry, "label": 0}])
    LabelCache(root, "teacher", "trial-b").add(["z"], [{**entry, "label": 2}])
    (tmp_path / ".teacher-labels" / "teacher" / "trial-c.json").write_text("{\"items\": ", encoding="utf-8")
    found = LabelCache(root, "teacher", "trial-d").lookup(["y", "z", "w"])
    assert [f and f["label"] for f in found] == [0, 2, None]
    assert "trial-c.json unreadable" in caplog.text
    assert LabelCache(root, "other-teacher", "trial-d").lookup(["x"]) == [None]  # another teacher answers apart


def test_replayed_labels_follow_the_budget_rule_of_a_fresh_run_and_failures_keep_what_was_paid(tiny_backend,
                                                                                               toy_task, tmp_path):
    from tunebench.store.labels import LabelCache
    from tunebench.store.locations import ArtifactRoot

    few = registry.get("few_shot")
    teacher = few(few.config_from_dict({"shots": 2}), seed=0).adapt(tiny_backend, toy_task, train=toy_task.train,
                                                                    dev=toy_task.dev)
    price = distill_mod.CallPrice("teacher", CostConfig(api={"teacher": ApiPrice(input_per_1m=1e6)}))
    pool, root = toy_task.test, ArtifactRoot(tmp_path)
    everything = distill_mod.label(teacher, pool, len(pool), None, price, cache=LabelCache(root, "t", "big"))
    budget = everything.dollars / 3
    fresh = distill_mod.label(teacher, pool, len(pool), budget, price, chunk=4)
    replayed = distill_mod.label(teacher, pool, len(pool), budget, price, chunk=4, cache=LabelCache(root, "t", "small"))
    assert replayed.reused == replayed.calls == fresh.calls > 0 and fresh.reused == 0
    assert (replayed.predictions.tolist(), replayed.dollars, replayed.stopped) == \
        (fresh.predictions.tolist(), fresh.dollars, fresh.stopped)
    assert replayed.reused_dollars == replayed.dollars <= budget

    class Failing:  # a teacher whose endpoint goes down after its first batch
        def __init__(self):
            self.calls = 0

        def run(self, batch):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("endpoint down")
            return teacher.run(batch)

    with pytest.raises(RuntimeError, match="endpoint down"):
        distill_mod.label(Failing(), pool, len(pool), None, price, chunk=4, cache=LabelCache(root, "t2", "trial"))
    kept = LabelCache(root, "t2", "rerun").lookup(list(pool.texts))
    assert [e is not None for e in kept] == [True] * 4 + [False] * (len(pool) - 4)  # the first batch was paid: kept
