"""Pairwise comparison by the judge: each pair asked in both orders, a verdict that changes with the order is a
tie, a failed call is missing (never a loss); figures checked by hand, on a scripted backend and over HTTP against a
study's stored answers, then read back by `judge` (stored, not asked again), `show` and the report."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.scripted import chat_completion, send_json, serving
from tests.test_judge import WORDS6, Scripted, _study, _write
from tunebench.analysis.pairwise import compare_trials
from tunebench.backends.openai_api import RemoteError
from tunebench.cli import app
from tunebench.config import read_study
from tunebench.config.judge import JudgeConfig
from tunebench.errors import JudgeError
from tunebench.evaluation.judge import PairwiseJudge, compare_answers, mean_interval
from tunebench.store import Store

runner = CliRunner()


def verdict(prompt: str, retried: bool) -> str:
    """The script: by the input word, and by whose answer is shown first (A answers alpha-*, B beta-*)."""
    word = re.search(r"Input:\n(\S+)", prompt).group(1)
    a_first = re.search(r"Answer 1:\n(\S+)", prompt).group(1).startswith("alpha")
    better = {"apple": "first" if a_first else "second",   # A better in both orders: a win
              "river": "second" if a_first else "first",   # B better in both orders: a loss
              "stone": "first",                            # whatever is shown first: the verdict flips, a tie
              "cloud": "tie",                              # a tie in both orders
              "grass": None,                               # never valid JSON: missing
              "flame": None if not retried else ("first" if a_first else "second")}[word]  # valid on its retry: a win
    return "I cannot say." if better is None else json.dumps({"better": better})


# by hand over the five items compared (grass is missing): A 1, B 0, tie 0.5 -> (1 + 0 + 0.5 + 0.5 + 1) / 5
POINTS = [1.0, 0.0, 0.5, 0.5, 1.0]


def test_order_swap_ties_and_missing_never_a_loss():
    backend = Scripted(lambda p: verdict(p, "could not be used" in p))
    judge = PairwiseJudge(backend, ["correct"])
    run = judge.compare([{"input": w} for w in WORDS6], [f"alpha-{w}" for w in WORDS6],
                        [f"beta-{w}" for w in WORDS6], [None] * 6)
    assert run.outcomes() == ["A", "B", "tie", "tie", None, "A"]
    s = run.summary()
    assert (s["wins"], s["ties"], s["losses"], s["order_ties"]) == (2, 2, 1, 1)
    assert (s["items"], s["compared"], s["missing"]) == (6, 5, 1)
    assert s["win_rate"] == pytest.approx(0.6)  # missing counted as a loss would give 3 / 6 = 0.5
    assert s["win_rate_ci"] == pytest.approx(mean_interval(np.array(POINTS)))
    assert s["win_rate_ci"][0] <= 0.6 <= s["win_rate_ci"][1]
    assert s["order_flip_rate"] == pytest.approx(1 / 5)  # stone
    # decided calls: apple first/second, river second/first, stone first/first, flame first/second -> 5 of 8 first
    assert s["first_shown_share"] == pytest.approx(5 / 8)
    assert (s["calls"], s["missing_calls"], s["retried"]) == (12, 2, 4)  # grass twice; grass and flame retried
    # only A shown first (no swap), stone would count as a win for A: 3 wins instead of 2
    assert [v for v in run.items()["a_first"]].count("A") == 3
    assert set(backend.temperatures) == {0.0}
    first = backend.prompts[0]
    assert "Answer 1:\nalpha-apple" in first and "Answer 2:\nbeta-apple" in first and '{"better": "first"}' in first
    assert "Answer 1:\nbeta-apple" in backend.prompts[6]  # the same item, B's answer first


def test_answers_of_different_lengths_are_refused():
    with pytest.raises(Exception, match="not scored on the same test split"):
        compare_answers(JudgeConfig(model="grader", pairwise=True), Scripted(lambda p: ""), ["x", "y"], ["", ""],
                        ["a", "b"], ["a"])


class PairEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions: scores for the per-answer judge, the script's verdicts for the pairwise prompts."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        prompt = body["messages"][-1]["content"]
        if "Answer 1:" in prompt:
            reply = verdict(prompt, "could not be used" in prompt)
        else:
            reply = json.dumps({"correct": 4})
        send_json(self, chat_completion(reply))

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    PairEndpoint.requests = []
    with serving(PairEndpoint) as url:
        yield url


def test_judge_pair_over_http_is_stored_and_shown(tmp_path, tiny_llama_dir, endpoint):
    rows = [(w, f"the {w}") for w in WORDS6]
    data = {"train": str(write_csv(tmp_path / "train.csv", rows * 3, ("word", "phrase"))),
            "dev": str(write_csv(tmp_path / "dev.csv", rows[:4], ("word", "phrase"))),
            "test": str(write_csv(tmp_path / "test.csv", rows, ("word", "phrase")))}
    study = _study(data, {"model": "grader", "criteria": ["correct"], "repeats": 1}, store="runs",
                   consistency={"perturbations": [], "max_items": 2},
                   costs={"api": {"grader": {"input_per_1m": 1.0, "output_per_1m": 2.0}}})
    study["strategies"] = [{"zero_shot": {"max_new_tokens": 3}}, {"zero_shot": {"max_new_tokens": 5}}]
    study["models"][0]["path"] = str(tiny_llama_dir)
    study["models"][1]["base_url"] = endpoint
    path = _write(tmp_path / "study.yaml", study)
    ran = runner.invoke(app, ["run", str(path), "--json"])
    assert ran.exit_code == 0, ran.output
    trials = json.loads(ran.stdout)["trials"]
    a, b = trials[0], trials[1]
    # the tiny random model's answers are replaced by known ones, so each verdict is the script's
    st = Store(tmp_path / "runs", create=False)
    with st.engine.begin() as con:
        for t, prefix in ((a, "alpha"), (b, "beta")):
            doc = json.loads(con.execute(text("SELECT data FROM items WHERE key = :k"), {"k": t["key"]}).scalar())
            doc["predictions"] = [f"{prefix}-{w}" for w in WORDS6]
            con.execute(text("UPDATE items SET data = :d WHERE key = :k"), {"d": json.dumps(doc), "k": t["key"]})

    off = runner.invoke(app, ["judge", str(path), "--pair", a["label"], b["label"]])
    assert off.exit_code != 0 and "turn it on with pairwise: true" in " ".join(off.output.split())

    study["metrics"][0]["judge"]["pairwise"] = True
    _write(path, study)
    before = len(PairEndpoint.requests)
    got = runner.invoke(app, ["judge", str(path), "--pair", a["label"], b["label"], "--json"])
    assert got.exit_code == 0, got.output
    r = json.loads(got.stdout)
    assert (r["wins"], r["ties"], r["losses"], r["order_ties"], r["missing"]) == (2, 2, 1, 1, 1)
    assert r["win_rate"] == pytest.approx(0.6) and r["order_flip_rate"] == pytest.approx(0.2)
    assert r["items_detail"]["outcome"] == ["A", "B", "tie", "tie", None, "A"]
    assert not r["cached"] and (r["a"], r["b"]) == (a["key"], b["key"])
    # the judge's own cost, apart: 12 calls, then grass and flame asked again in both orders
    assert len(PairEndpoint.requests) - before == 16 and r["cost"]["requests"] == 16
    assert r["cost"]["dollars"] == pytest.approx((160 * 1 + 80 * 2) / 1e6)
    assert all(q["temperature"] == 0 for q in PairEndpoint.requests)

    again = runner.invoke(app, ["judge", str(path), "--pair", a["key"][:8], b["label"]])
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert "stored comparison" in said and "60.0% [" in said and len(PairEndpoint.requests) - before == 16

    shown = runner.invoke(app, ["show", "judged", "--store", str(tmp_path / "runs")])
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())
    assert "can it be trusted?" in said and "self-agreement" in said and "missing calls 0.0%" in said
    assert "The judge's scores" in said and "4.00 [4.000, 4.000]" in said
    assert "Pairwise" in said and "60.0% [" in said and "2 (1 by order)" in said and "1 of 6" in said
    as_json = json.loads(runner.invoke(app, ["show", "judged", "--store", str(tmp_path / "runs"), "--json"]).stdout)
    assert as_json["judge"]["trust"]["calls"] == 12 and as_json["judge"]["pairwise"][0]["wins"] == 2
    assert {s["overall"] for s in as_json["judge"]["scores"]} == {4.0}

    rep = runner.invoke(app, ["report", str(path), "--json"])
    assert rep.exit_code == 0, rep.output
    out_dir = Path(json.loads(rep.stdout)["json"]).parent
    assert "| 2 | 2 (1) | 1 | 60.0% [" in (out_dir / "report.md").read_text()
    assert "Pairwise: which answer is better?" in (out_dir / "report.html").read_text()

    # the UI's study page has the judge's section (trust figures, scores, the comparison), the trial page its own
    from fastapi.testclient import TestClient

    from tunebench.ui import create_app

    client = TestClient(create_app(Store(tmp_path / "runs", create=False)), base_url="http://127.0.0.1:8765")
    page = client.get("/study/judged")
    assert page.status_code == 200, page.text
    assert page.text.index("Can the judge be trusted?") < page.text.index("The judge's scores")
    assert "Pairwise: which answer is better?" in page.text and "60.0% [" in page.text
    trial = client.get(f"/study/judged/trial/{a['key'][:10]}")
    assert trial.status_code == 200, trial.text
    assert "self-agreement" in trial.text and "4.00" in trial.text and "not in this trial's cost" in trial.text
    assert "Compared with another strategy by the judge" in trial.text and "2 (1)" in trial.text

    # asked the other way round, the stored comparison is read from B's side; nothing is asked again
    swapped = json.loads(runner.invoke(app, ["judge", str(path), "--pair", b["label"], a["label"], "--json"]).stdout)
    assert swapped["cached"] and (swapped["wins"], swapped["losses"], swapped["ties"]) == (1, 2, 2)
    assert swapped["win_rate"] == pytest.approx(0.4) and swapped["win_rate_ci"] == pytest.approx(
        [1 - r["win_rate_ci"][1], 1 - r["win_rate_ci"][0]])
    assert swapped["items_detail"]["outcome"] == ["B", "A", "tie", "tie", None, "B"]
    assert len(PairEndpoint.requests) - before == 16
    # asked again while the judge is down: an error, and the stored comparison is kept (not replaced by all-missing)
    with pytest.raises(JudgeError, match="no item could be compared"):
        compare_trials(st, "judged", a["key"], b["key"], config=read_study(path)[0], backend=Down(), again=True)
    assert [c["wins"] for c in st.pairwise("judged")] == [2]


class Down:
    """A judge whose every request fails."""

    def format_prompt(self, text):
        return text

    def generate(self, prompts, **kw):
        raise RemoteError("endpoint down")


def test_failed_calls_are_missing_not_losses():
    run = PairwiseJudge(Down(), ["correct"]).compare([{"input": "x"}], ["a"], ["b"], [None])
    s = run.summary()
    assert (s["compared"], s["missing"], s["wins"], s["losses"]) == (0, 1, 0, 0) and s["win_rate"] is None
    assert "endpoint down" in next(iter(s["errors"]))


def test_store_copy_takes_the_comparisons_along(tmp_path):
    from tunebench.store.copy import copy_store

    src = Store(tmp_path / "a")
    src.save_study("s", {"name": "s"}, None, [])
    src.add_pairwise("s", "k1", "ta", "tb", {"wins": 3, "a_label": "x", "b_label": "y"})
    dst = Store(tmp_path / "b")
    copy_store(src, dst)
    got = dst.pairwise("s")
    assert [(c["key"], c["a"], c["b"], c["wins"], c["a_label"]) for c in got] == [("k1", "ta", "tb", 3, "x")]
