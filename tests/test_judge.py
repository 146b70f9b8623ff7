"""The LLM judge of generated text: schema, one retry, missing-not-zero, self-agreement, agreement with people
(against scipy/sklearn and hand-computed values), config errors, and a study judged over HTTP by a scripted
OpenAI-compatible endpoint whose every answer is known, so every stored figure is checked by hand."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import kendalltau
from sklearn.metrics import cohen_kappa_score
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.scripted import chat_completion, send_json, serving
from tunebench.backends.openai_api import RemoteError
from tunebench.cli import app
from tunebench.config import read_study
from tunebench.errors import ConfigError
from tunebench.evaluation.judge import (
    Judge,
    human_agreement,
    round_half_up,
    trust_warnings,
)
from tunebench.store import Store
from tunebench.store.prompts import PromptRegistry

runner = CliRunner()
RUBRIC = "Input:\n{{ input }}\nAnswer to grade:\n{{ output }}\nGrade it on {{ criteria|join(', ') }}."


@dataclass
class Gen:
    text: str
    prompt_tokens: int = 10
    completion_tokens: int = 5


class Scripted:
    """A judge backend whose answer to each prompt is a function of it (an Exception: the request fails)."""

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []
        self.temperatures: list[float] = []

    def format_prompt(self, text: str) -> str:
        return text

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, **kw):
        self.temperatures.append(temperature)
        out = []
        for p in prompts:
            self.prompts.append(p)
            got = self.answer(p)
            if isinstance(got, Exception):
                raise got
            out.append(Gen(got))
        return out


def _word(prompt: str) -> str:
    return re.search(r"Input:\n(\S+)", prompt).group(1)


def test_invalid_answers_are_retried_once_then_missing_never_zero():
    def answer(p: str):
        retry = "could not be used" in p
        return {"a": '{"correct": 5, "tone": 3}',
                "b": '{"correct": 2, "tone": 2}' if retry else "Looks fine to me.",
                "c": '{"correct": 9, "tone": 1}',  # out of the scale, twice
                "d": RemoteError("endpoint down")}[_word(p)]

    backend = Scripted(answer)
    judge = Judge(backend, RUBRIC, ["correct", "tone"], 1, 5, repeats=1)
    run = judge.run([{"input": w} for w in "abcd"], ["x"] * 4, ["ref"] * 4)
    s = run.summary()
    assert set(backend.temperatures) == {0.0}
    # a, b, c, d asked (the failed batch again one by one), then b, c, d once more each: one retry, no more
    retries = {p for p in backend.prompts if "could not be used" in p}
    assert sorted(_word(p) for p in retries) == ["b", "c", "d"]
    assert all(p.count("could not be used") == 1 for p in retries)
    assert s["calls"] == 4 and s["missing"] == 2 and s["missing_rate"] == 0.5 and s["retried"] == 3
    assert run.overall() == [4.0, 2.0, None, None]
    assert s["overall"] == 3.0  # (4 + 2) / 2; counting the missing two as 0 would give 1.5
    assert s["scores"] == {"correct": 3.5, "tone": 2.5}
    assert any("less than or equal to 5" in reason for reason in s["errors"])
    assert any("endpoint down" in reason for reason in s["errors"])
    assert judge.usage.requests == 4 + 3 and judge.usage.prompt_tokens == 10 * 5  # d's requests returned nothing


def test_self_agreement_is_exact_agreement_of_the_repeats():
    seen: Counter = Counter()

    def answer(p: str):
        seen[p] += 1
        w = _word(p)
        if w == "flaky":
            return '{"correct": 4, "tone": %d}' % (2 + seen[p] % 2)  # tone 3, 2, 3 over the repeats
        return '{"correct": 4, "tone": 4}'

    run = Judge(Scripted(answer), RUBRIC, ["correct", "tone"], 1, 5, repeats=3).run(
        [{"input": w} for w in ("same", "flaky", "steady")], ["x"] * 3, [""] * 3)
    agree = run.self_agreement()
    assert agree["items"] == 3 and agree["all_criteria"] == pytest.approx(2 / 3)
    assert agree["by_criterion"] == {"correct": 1.0, "tone": pytest.approx(2 / 3)}
    assert agree["mean_spread"] == pytest.approx(1 / 6)  # one spread of 1 among 3 items x 2 criteria
    assert trust_warnings({"self_agreement": agree})[0].startswith("the judge disagrees with itself")


def test_tau_and_kappa_equal_scipy_sklearn_and_the_hand_computed_values():
    # by hand: human 1,2,3,4 against judge 1,3,2,4: 5 concordant pairs, 1 discordant -> tau = 4/6; quadratic
    # kappa: observed weighted disagreement 2/9 / 4 = 1/18, expected 40/144 = 5/18 -> 1 - 1/5 = 0.8
    got = human_agreement([1, 2, 3, 4], [1, 3, 2, 4], 1, 4)
    assert got["tau"] == pytest.approx(2 / 3) and got["kappa"] == pytest.approx(0.8)
    table_h = [1, 2, 3, 4, 5, 3, 2, 4, 5, 1, None]
    table_j = [1.0, 2.5, 3.0, 11 / 3, 5.0, 2.0, 2.0, 13 / 3, 4.5, None, 3.0]
    got = human_agreement(table_h, table_j, 1, 5)
    pairs = [(h, j) for h, j in zip(table_h, table_j) if h is not None and j is not None]
    h, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assert got["n"] == 9 and got["rated"] == 10
    assert got["tau"] == pytest.approx(kendalltau(h, j).statistic)
    assert list(round_half_up(np.array([2.5, 11 / 3, 4.5, 1.49]))) == [3, 4, 5, 1]
    assert got["kappa"] == pytest.approx(cohen_kappa_score(h.astype(int), round_half_up(j), weights="quadratic",
                                                           labels=[1, 2, 3, 4, 5]))
    for k in ("tau", "kappa"):
        lo, hi = got[f"{k}_ci"]
        assert lo <= got[k] <= hi and -1 <= lo < hi <= 1
    assert human_agreement([1, 2], [1, 2], 1, 5)["tau"] is None  # too few rated items: no figure, no crash


def _write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _study(data: dict, judge: dict, **extra) -> dict:
    return {"name": "judged", "task": {"type": "generation", "data": data, "text": "word", "target": "phrase",
                                       **extra.pop("task", {})},
            "models": [{"name": "llm", "backend": "causal", "path": "unused", "precision": "fp32"},
                       {"name": "grader", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                        "api_key_env": None}],
            "strategies": [{"zero_shot": {"max_new_tokens": 4}}], "metrics": [{"judge": judge}], **extra}


@pytest.mark.parametrize("judge, extra, expected", [
    ({"model": "nobody"}, {}, "metrics[0].judge.model: no model named 'nobody'"),
    ({"model": "grader", "scale": "5-1"}, {}, "metrics.0.judge.scale: scale 5-1: LOW must be below HIGH"),
    ({"model": "grader", "criteria": ["is it right"]}, {}, "metrics.0.judge.criteria: criterion 'is it right'"),
    ({"model": "grader", "repeats": 0}, {}, "metrics.0.judge.repeats"),
    ({"model": "grader", "pairwise": "sometimes"}, {}, "metrics.0.judge.pairwise"),
    ({"model": "grader", "rubric": "r@1", "template": "x"}, {}, "give either rubric"),
    ({"model": "grader"}, {"task": {"human_rated": "reply"}}, "human_rated names the texts people rated"),
])
def test_config_errors_name_the_field(tmp_path, judge, extra, expected):
    path = _write(tmp_path / "study.yaml", _study("data.csv", judge, **extra))
    with pytest.raises(ConfigError) as err:
        read_study(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_judge_of_a_classification_task_or_a_table_metric_is_refused(tmp_path):
    study = _study("data.csv", {"model": "grader"})
    study["task"] = {"data": "data.csv", "text": "word", "label": "colour"}
    with pytest.raises(ConfigError, match="a judge scores generated text"):
        read_study(_write(tmp_path / "a.yaml", study))
    study = _study("data.csv", {"model": "grader"})
    study["metrics"] = ["rouge_l"]
    with pytest.raises(ConfigError, match="is computed already"):
        read_study(_write(tmp_path / "b.yaml", study))



def test_rubric_from_a_file_and_bad_references_or_ratings_fail_before_any_trial(tmp_path):
    rows = [(w, f"the {w}", str(1 + i % 5)) for i, w in enumerate(WORDS6 * 5)]
    data = str(write_csv(tmp_path / "data.csv", rows, ("word", "phrase", "rating")))
    (tmp_path / "rubric.jinja").write_text(RUBRIC, encoding="utf-8")
    study = _study(data, {"model": "grader", "template_file": "rubric.jinja"}, store="runs",
                   task={"human_score": "rating"})
    cfg, _, _ = read_study(_write(tmp_path / "inline.yaml", study))
    assert cfg.judge.template == RUBRIC
    ok = runner.invoke(app, ["validate", str(tmp_path / "inline.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "1 trials (zero_shot)" in " ".join(ok.output.split())  # the judge-only model runs no strategy
    # a reference the registry does not know, once the store exists
    assert runner.invoke(app, ["prompts", "import", str(tmp_path / "rubric.jinja"), "--name", "other", "--kind",
                               "rubric", "--store", str(tmp_path / "runs")]).exit_code == 0
    study["metrics"][0]["judge"] = {"model": "grader", "rubric": "support-reply@3"}
    bad = runner.invoke(app, ["validate", str(_write(tmp_path / "ref.yaml", study))])
    assert bad.exit_code != 0 and "metrics[0].judge.rubric: no prompt named 'support-reply'" in " ".join(
        bad.output.split())
    # ratings off the judge's scale, or not numbers, name the file, the line and the column
    study["metrics"][0]["judge"] = {"model": "grader", "scale": "1-3"}
    bad = runner.invoke(app, ["validate", str(_write(tmp_path / "scale.yaml", study))])
    said = " ".join(bad.output.split())
    assert bad.exit_code != 0 and re.search(r"data\.csv line \d+: human score [45] in column 'rating' is outside "
                                            r"the judge's scale 1-3 \(metrics\[0\]\.judge\.scale\)", said)
    write_csv(tmp_path / "data.csv", rows[:-1] + [("flame", "the flame", "great")], ("word", "phrase", "rating"))
    study["task"]["data"] = {"train": data, "test": data}
    bad = runner.invoke(app, ["validate", str(_write(tmp_path / "nan.yaml", study))])
    said = " ".join(bad.output.split())
    assert bad.exit_code != 0 and re.search(r"data\.csv line 31: human score 'great' in column 'rating' is not a "
                                            "number", said)

# ---- a study judged over HTTP by a scripted endpoint -----------------------------------------------------------
WORDS6 = ["apple", "river", "stone", "cloud", "grass", "flame"]
HUMAN = [1, 2, 3, 4, 5, None]
CALIBRATION = {"REPLY-1": 2, "REPLY-2": 1, "REPLY-3": 4, "REPLY-4": 3, "REPLY-5": 2}  # the judge on the rated texts


class JudgeEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions answering as the script says: by the rated text for the human-rated replies, by the
    input word for the strategy's answers (which a random tiny model writes)."""

    seen: Counter = Counter()
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        prompt = body["messages"][-1]["content"]
        self.seen[prompt] += 1
        rated = re.search(r"Answer to grade:\n(REPLY-\d)", prompt)
        retry = "could not be used" in prompt
        if rated:
            s = CALIBRATION[rated.group(1)]
            text = json.dumps({"correct": s, "tone": s})
        else:
            text = {"apple": '{"correct": 5, "tone": 3}',
                    "river": '{"correct": 4, "tone": 4}' if retry else "I think it is good.",
                    "stone": "no idea",
                    "cloud": '{"correct": 2, "tone": %d}' % (2 if self.seen[prompt] == 1 else 3),
                    "grass": 'Scores: {"correct": 1, "tone": 1}',
                    "flame": '{"correct": 3, "tone": 3}' if retry else '{"correct": 6, "tone": 1}'}[_word(prompt)]
        send_json(self, chat_completion(text))

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    JudgeEndpoint.seen, JudgeEndpoint.requests = Counter(), []
    with serving(JudgeEndpoint) as url:
        yield url


def test_a_study_judged_over_http_stores_hand_checked_figures(tmp_path, tiny_llama_dir, endpoint):
    train = [(w, f"the {w}", "", "") for w in WORDS6 * 3]
    test = [(w, f"the {w}", "" if h is None else str(h), "" if h is None else f"REPLY-{h}")
            for w, h in zip(WORDS6, HUMAN)]
    header = ("word", "phrase", "rating", "reply")
    data = {"train": str(write_csv(tmp_path / "train.csv", train, header)),
            "dev": str(write_csv(tmp_path / "dev.csv", train[:4], header)),
            "test": str(write_csv(tmp_path / "test.csv", test, header))}
    (tmp_path / "rubric.jinja").write_text(RUBRIC, encoding="utf-8")
    imported = runner.invoke(app, ["prompts", "import", str(tmp_path / "rubric.jinja"), "--name", "support-reply",
                                   "--kind", "rubric", "--store", str(tmp_path / "runs")])
    assert imported.exit_code == 0, imported.output
    study = _study(data, {"model": "grader", "rubric": "support-reply@1", "criteria": ["correct", "tone"],
                          "scale": "1-5", "repeats": 2},
                   task={"human_score": "rating", "human_rated": "reply"},
                   consistency={"perturbations": [], "max_items": 2}, store="runs",
                   costs={"api": {"grader": {"input_per_1m": 1.0, "output_per_1m": 2.0}}})
    study["models"][0]["path"] = str(tiny_llama_dir)
    study["models"][1]["base_url"] = endpoint
    path = _write(tmp_path / "study.yaml", study)
    result = runner.invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["trials"]
    assert [(t["strategy"], t["model"]) for t in trials] == [("zero_shot", "llm")]  # the judge-only model is no candidate
    j = trials[0]["metrics"]["judge"]
    assert all(r["temperature"] == 0 for r in JudgeEndpoint.requests)
    # scoring: 6 answers x 2 repeats; river and flame are retried and then valid, stone never is (missing)
    assert (j["calls"], j["missing"], j["retried"]) == (12, 2, 6) and j["missing_rate"] == pytest.approx(1 / 6)
    assert j["items_scored"] == 5 and j["overall"] == pytest.approx((4 + 4 + 2.25 + 1 + 3) / 5)  # not /6 with a 0
    assert j["scores"] == {"correct": pytest.approx(3.0), "tone": pytest.approx(2.7)}
    assert j["self_agreement"]["all_criteria"] == pytest.approx(0.8)  # cloud's tone changed between repeats
    assert j["self_agreement"]["by_criterion"] == {"correct": 1.0, "tone": pytest.approx(0.8)}
    # people rated 1..5, the judge gave 2,1,4,3,2: C=5, D=4, one judge tie -> tau-b = 1/sqrt(90); quadratic kappa
    # = 1 - (13/80)/(17/80) = 4/17
    h = j["human"]
    assert h["n"] == 5 and h["tau"] == pytest.approx(1 / math.sqrt(90)) and h["kappa"] == pytest.approx(4 / 17)
    assert h["tau_ci"][0] <= h["tau"] <= h["tau_ci"][1] and not h["reused"]
    # the judge's own cost, apart from the strategy's: 12 + 6 scoring requests, 10 calibration requests
    assert j["cost"]["requests"] == 18 and j["cost"]["dollars"] == pytest.approx((180 * 1 + 90 * 2) / 1e6)
    assert h["cost"]["requests"] == 10 and h["cost"]["dollars"] == pytest.approx((100 + 50 * 2) / 1e6)
    assert not any("judge" in k for k in trials[0]["cost"])

    rep = runner.invoke(app, ["report", str(path), "--json"])
    assert rep.exit_code == 0, rep.output
    report_json = Path(json.loads(rep.stdout)["json"])
    trust = json.loads(report_json.read_text())["analysis"]["judge"]
    assert trust["human"]["tau"] == pytest.approx(h["tau"])
    assert any("agrees weakly with people" in w for w in trust["warnings"])
    assert trust["cost"]["dollars"] == pytest.approx(0.00056)
    html = (report_json.parent / "report.html").read_text()
    assert html.index("Can the judge be trusted?") < html.index("<h3>The judge")
    md = (report_json.parent / "report.md").read_text()
    assert md.index("Trust first: self-agreement 80.0%") < md.index("| strategy | overall (95% CI) | correct | tone |")
    assert "missing calls 16.7% (2 of 12, 6 retried)" in md and "tau-b 0.105" in md and "Cohen kappa (quadratic) 0.235" in md
    rec = runner.invoke(app, ["recommend", str(path)])
    assert rec.exit_code == 0, rec.output
    said = " ".join(rec.output.split())
    assert "Judge: the judge agrees weakly with people: Kendall tau-b 0.11" in said
    assert "judge grader: 2.85 on 1-5 (95% CI" in said and "16.7% of its calls missing" in said
    # the rubric used is linked to the trial in the prompt registry
    uses = PromptRegistry(Store(tmp_path / "runs", create=False)).uses("support-reply")
    assert [u["key"] for u in uses] == [trials[0]["key"]]

