"""Cascade: a distilled student with its low-confidence inputs sent to the teacher; the threshold chosen on dev for
a target, the whole test curve stored, the chosen point measured and compared as a candidate like any other."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.config.costs import ApiPrice, CostConfig
from tests.conftest import toy_rows
from tunebench.errors import ConfigError, StoreError
from tunebench.evaluation.cost import price
from tunebench.store import artifacts
from tunebench.store.results import Store
from tunebench.strategies import registry
from tunebench.strategies.base import Output, Predictor, StrategyConfig, as_texts
from tunebench.strategies.cascade import CascadePredictor, confidence
from tunebench.strategies.distill import Distill

QUICK = {"epochs": 1, "batch_size": 16, "max_length": 32}
TEACHER = {"strategy": "few_shot", "params": {"shots": 2}}
STUDENT = {"strategy": "linear_probe", "params": QUICK}
runner = CliRunner()


class Scripted(Predictor):
    """A predictor whose answer (and, for a student, its confidence) is written down per input text."""

    def __init__(self, answers: dict[str, int], confidence: dict[str, float] | None = None, tokens: int = 0):
        super().__init__("scripted", StrategyConfig(), ["negative", "positive"])
        self.answers, self.conf, self.tokens, self.calls = answers, confidence, tokens, 0

    def predict_scores(self, inputs) -> np.ndarray:
        out = []
        for t in as_texts(inputs):
            c = self.conf[t] if self.conf else 1.0
            z = np.log(c / (1 - c)) if c < 1 else 20.0  # two labels: softmax([0, z]) tops at c
            out.append([z, 0.0] if self.answers[t] == 0 else [0.0, z])
        return np.asarray(out)

    def run(self, inputs) -> Output:
        texts = as_texts(inputs)
        self.calls += len(texts)
        if self.conf is not None:
            return super().run(inputs)
        return Output(np.asarray([self.answers[t] for t in texts]), [self.tokens] * len(texts), [1] * len(texts))

    def _save(self, directory):
        raise NotImplementedError

    @classmethod
    def _load(cls, *a):
        raise NotImplementedError


def scripted_case(task):
    """Dev: confidence 0.55 + 0.025 i, the student right from item 8 on, the teacher always right: for
    min_accuracy 0.75 the least fallback is items 0-3 (threshold 0.65, accuracy 12/16). Test: confidence 0.60 + 0.02 i,
    the student right from item 2 on, the teacher right everywhere but item 15: test alone would pick no fallback
    (accuracy 14/16 already), dev's threshold sends items 0-2 (all below 0.65) to the teacher: 16/16, above the
    student alone (14/16) and the teacher alone (15/16)."""
    answers_s, answers_t, conf = {}, {}, {}
    for split, base, step, right_from in ((task.dev, 0.55, 0.025, 8), (task.test, 0.60, 0.02, 2)):
        for i, (t, y) in enumerate(zip(split.texts, split.labels.tolist())):
            conf[t] = base + step * i
            answers_s[t] = y if i >= right_from else 1 - y
            answers_t[t] = 1 - y if split is task.test and i == 15 else y
    return Scripted(answers_s, conf), Scripted(answers_t, tokens=10)


@pytest.fixture()
def scripted(monkeypatch, toy_task):
    student, teacher = scripted_case(toy_task)
    student.distill = {"scripted": True}

    def adapt(self, backend, task, *, train, dev):
        self.taught = teacher
        return student
    monkeypatch.setattr(Distill, "adapt", adapt)
    return student, teacher


def cascade(params: dict, **kw):
    cls = registry.get("cascade")
    return cls(cls.config_from_dict({"teacher": {**TEACHER, "model": "gpt"}, "student": STUDENT, **params}),
               seed=0, **kw)


def test_curve_on_a_scripted_pair_with_the_threshold_chosen_on_dev(scripted, tiny_backend, toy_task):
    costs = CostConfig(api={"gpt": ApiPrice(input_per_1m=1e5, output_per_1m=1e5)})  # 10 + 1 tokens: 1.1 a call
    pred = cascade({"target": {"min_accuracy": 0.75}}, costs=costs).adapt(tiny_backend, toy_task,
                                                                          train=toy_task.train, dev=toy_task.dev)
    c = pred.cascade
    assert c["threshold"] == pytest.approx(0.65) and c["target_met"]
    assert c["dev"]["fallback_rate"] == 4 / 16 and c["dev"]["accuracy"] == 12 / 16
    assert c["test"]["fallback_rate"] == 3 / 16 and c["test"]["accuracy"] == 1.0  # not test's own pick (no fallback)
    assert c["student"]["test_accuracy"] == 14 / 16 and c["teacher_alone"]["test_accuracy"] == 15 / 16
    curve = c["curve"]
    assert len(curve) == 18 and c["curve"][c["curve_index"]]["fallback_rate"] == 3 / 16
    assert (curve[0]["fallback_rate"], curve[0]["accuracy"]) == (0.0, 14 / 16)
    assert (curve[-1]["fallback_rate"], curve[-1]["accuracy"]) == (1.0, 15 / 16)
    assert [p["fallback_rate"] for p in curve[1:]] == [i / 16 for i in range(17)]
    student_cost = c["student"]["cost_per_request"]
    assert c["teacher_alone"]["cost_per_request"] == pytest.approx(1.1)
    assert c["test"]["cost_per_request"] == pytest.approx(student_cost + 3 / 16 * 1.1)
    assert c["api_dollars_per_request"] == pytest.approx(3 / 16 * 1.1)
    # choosing the threshold asked the teacher about all 16 dev items: upfront dollars, apart from per request
    assert c["selection"]["items"] == 16 and c["selection"]["dollars"] == pytest.approx(16 * 1.1)
    assert c["dev_pareto"][-1]["accuracy"] == 1.0

    # the predictor routes as the record says: items 0-2 answered by the teacher, the rest by the student
    _, teacher = scripted
    teacher.calls = 0
    out = pred.run(toy_task.test.records())
    assert np.mean(np.asarray(out.predictions) == toy_task.test.labels) == c["test"]["accuracy"]
    assert teacher.calls == 3 and out.prompt_tokens[:3] == [10] * 3 and out.prompt_tokens[3] == 0


def test_no_target_takes_the_most_accurate_dev_point_and_an_unreachable_one_says_so(scripted, tiny_backend,
                                                                                   toy_task, caplog):
    pred = cascade({}).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
    assert pred.cascade["dev"]["accuracy"] == 1.0 and pred.cascade["dev"]["fallback_rate"] == 8 / 16
    assert pred.cascade["target"] is None and pred.cascade["target_met"]
    pred = cascade({"target": {"max_fallback": 0.0}}).adapt(tiny_backend, toy_task, train=toy_task.train,
                                                           dev=toy_task.dev)
    assert pred.cascade["dev"]["fallback_rate"] == 0.0 and pred.cascade["threshold"] <= 0.55
    scripted[1].answers = {t: 1 - y for t, y in scripted[1].answers.items()}  # a teacher always wrong
    pred = cascade({"target": {"min_accuracy": 0.9}}).adapt(tiny_backend, toy_task, train=toy_task.train,
                                                           dev=toy_task.dev)
    assert not pred.cascade["target_met"] and pred.cascade["dev"]["fallback_rate"] == 0.0
    assert "no threshold reaches" in caplog.text


def test_blended_price_adds_the_teachers_api_dollars():
    costs = CostConfig()
    plain = price({"latency_ms_mean": 10.0}, "student", costs)
    blended = price({"latency_ms_mean": 10.0, "api_dollars_per_request": 0.002}, "student", costs)
    assert blended.per_request == pytest.approx(plain.per_request + 0.002) and "api tokens" in blended.basis


@pytest.mark.parametrize("params,field", [
    ({"target": {"min_acc": 0.9}}, "target: give one of"),
    ({"target": {"max_fallback": 1.5}}, "target.max_fallback"),
    ({"target": {"min_accuracy": 0.9, "max_fallback": 0.2}}, "target: give one of"),
    ({"target": 0.9}, "target"),
    ({"teacher": {"strategy": "full"}}, "teacher.strategy"),
    ({"pool": "dev"}, "pool must be"),
])
def test_bad_config_names_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        registry.get("cascade").config_from_dict(params)


def test_saved_artifact_holds_both_models_and_loads_with_the_teacher_as_a_peer(tmp_path, tiny_backend, toy_task):
    def adapted(name, params):
        cls = registry.get(name)
        return cls(cls.config_from_dict(params), seed=0).adapt(tiny_backend, toy_task, train=toy_task.train,
                                                               dev=toy_task.dev)

    student, teacher = adapted("linear_probe", QUICK), adapted("few_shot", {"shots": 2})
    texts = toy_task.test.texts
    threshold = float(np.median(confidence(student.predict_scores(texts))))
    cascade_pred = CascadePredictor(student, teacher, threshold, "tiny")
    measured = cascade_pred.run(texts)
    cascade_pred.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "cascade.json").read_text())["threshold"] == threshold
    from tunebench.strategies import load_predictor

    assert type(load_predictor(tmp_path / "a" / "student", tiny_backend)) is type(student)
    with pytest.raises(StoreError, match="teacher's model \('tiny'\)"):
        load_predictor(tmp_path / "a", tiny_backend)
    with pytest.raises(StoreError, match="model 'tiny', which was not loaded"):
        load_predictor(tmp_path / "a", tiny_backend, peers={"other": tiny_backend})
    loaded = load_predictor(tmp_path / "a", tiny_backend, peers={"tiny": tiny_backend})
    out, back = loaded.route(texts)
    assert out.predictions.tolist() == measured.predictions.tolist() and out.prompt_tokens == measured.prompt_tokens
    assert 0 < back.sum() < len(texts) and (loaded.requests, loaded.fallbacks) == (len(texts), int(back.sum()))
    assert out.predictions[back].tolist() == teacher.predict([t for t, b in zip(texts, back) if b]).tolist()


def study_doc(tmp_path, toy_files, model_dir, strategies: list) -> dict:
    return {"name": "casc", "task": {"data": {k: str(v) for k, v in toy_files.items()}, "text": "text",
                                     "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
            "model": {"name": "tiny", "backend": "encoder", "path": str(model_dir), "precision": "fp32"},
            "strategies": strategies, "seeds": [0], "train_sizes": [16], "store": str(tmp_path / "runs")}


def test_cascade_trial_is_a_candidate_like_any_other(tmp_path, toy_files, tiny_model_dir, tiny_backend, monkeypatch):
    params = {"teacher": TEACHER, "student": STUDENT, "pool": "train", "pool_size": 12,
              "target": {"max_fallback": 0.5}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc(tmp_path, toy_files, tiny_model_dir,
                                             [{"cascade": params}, {"few_shot": {"shots": 2}}])), encoding="utf-8")
    done = runner.invoke(app, ["run", str(path), "--json"])
    assert done.exit_code == 0, done.output
    trial = next(t for t in json.loads(done.stdout)["trials"] if t["strategy"] == "cascade")
    c = trial["cascade"]
    assert trial["metrics"]["accuracy"] == c["test"]["accuracy"]  # the measured trial is the chosen point
    assert trial["metrics"]["fallback_rate"] == c["test"]["fallback_rate"] <= 1
    assert trial["cost"]["labelling_calls"] == 12 and len(c["curve"]) >= 2
    cost = trial["cost"]  # upfront: the teacher's adaptation and labelling, and both models over dev for the threshold
    assert cost["selection_seconds"] == c["selection"]["seconds"] > 0 and c["selection"]["items"] == 16
    assert cost["train_seconds"] >= cost["teacher_seconds"] + cost["selection_seconds"] - 1e-3

    shown = runner.invoke(app, ["show", "casc", "--store", str(tmp_path / "runs")])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert f"chosen on dev: threshold {c['threshold']:.4f}" in text and "cascade curve on test" in text
    assert f"{c['curve'][-1]['threshold']:.4f}" in text

    report = runner.invoke(app, ["report", "casc", "--store", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    entry = next(s for s in doc["analysis"]["strategies"] if s["strategy"] == "cascade")
    assert entry["ci"] is not None and entry["mean"] == c["test"]["accuracy"]  # per-item results: an interval
    assert entry["cascade"]["seeds"][0]["curve"] == c["curve"]
    ranked = [r["label"] for r in doc["recommendation"]["ranking"]]
    assert trial["label"] in ranked and len(ranked) == 2  # a candidate beside the prompting trial
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Cascade: the student with the teacher behind it" in html and 'id="fig-cascade"' in html
    assert (tmp_path / "rep" / "figures" / "cascade.png").is_file()

    store = Store(tmp_path / "runs", create=False)  # its artifact loads as the cascade, the teacher on its model
    row = next(r for r in store.trials("casc") if r["strategy"] == "cascade")
    loaded = artifacts.open_trial(store, "casc", row, tiny_backend)
    assert isinstance(loaded.predictor, CascadePredictor) and loaded.predictor.teacher.strategy == "few_shot"
    measured = store.items([row["key"]])[row["key"]]["predictions"]
    assert loaded.predictor.run([t for t, _ in toy_rows(16, 3)]).predictions.tolist() == measured

    # an artifact written before cascades saved their teacher (the student, with cascade.json) loads as the student
    artifact = store.artifact_path(row)
    shutil.rmtree(artifact / "teacher")
    for f in (artifact / "student").iterdir():
        f.replace(artifact / f.name)
    warned = []
    monkeypatch.setattr(artifacts.log, "warning", lambda msg, *args: warned.append(msg % args))
    loaded = artifacts.open_trial(store, "casc", row, tiny_backend)
    assert loaded.predictor.strategy == "linear_probe" and "whose artifact holds only the student" in warned[0]
