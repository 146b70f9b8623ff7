"""Counterfactual checks (consistency.counterfactual): swaps that are deterministic, whole-word and case-keeping,
only the items a swap changed counted, McNemar against scipy, the pairs file's errors, and a study end to end."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import yaml
from scipy import stats as sps
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.config import CounterfactualConfig, StudyConfig, parse_study, read_study
from tunebench.errors import ConfigError
from tunebench.evaluation import counterfactual
from tunebench.evaluation.counterfactual import Swap
from tunebench.store import Store
from tunebench.strategies.base import Output

from .conftest import toy_rows, write_csv

runner = CliRunner()
pronouns = counterfactual.swaps(CounterfactualConfig(pronouns=True))["pronouns"]
names = counterfactual.swaps(CounterfactualConfig(names=True))


# ---- the swaps --------------------------------------------------------------------------------------------------

def test_pronouns_swap_both_ways_at_once_keep_case_and_tell_her_apart():
    text = "He said she lost her card; HE told him. Call her back, thank her. The book is his, his order too."
    swapped = pronouns.apply(text)
    assert swapped == ("She said he lost his card; SHE told her. Call him back, thank him. The book is hers, "
                       "her order too.")
    assert pronouns.apply("Himself, herself") == "Herself, himself"
    assert pronouns.apply(text) == swapped  # deterministic: nothing is drawn
    again = counterfactual.swaps(CounterfactualConfig(pronouns=True))["pronouns"]
    assert again.apply(text) == swapped


def test_swaps_match_whole_words_only():
    words = "the theory, other, shelter, hello, Hershey, hiss, Theo"
    assert pronouns.apply(words) == words  # "he" is not found inside a word
    sam = Swap.from_pairs([("Sam", "Alex")])
    assert sam.apply("Samuel met Sam and Sam's dog; SAM waved to sam.") == \
        "Samuel met Alex and Alex's dog; ALEX waved to alex."
    assert sam.apply(sam.apply("Sam and Alex")) == "Sam and Alex"  # both ways, one pass
    assert Swap.from_pairs([("New York", "Lagos"), ("New", "Old")]).apply("new  york is New") == "lagos is Old"


def test_names_swap_only_as_written_or_in_capitals():
    gender, region = names["names_gender"], names["names_region"]
    assert gender.apply("Emily emailed EMILY, cc emily and Maria (not Mariam).") == \
        "James emailed JAMES, cc emily and Carlos (not Youssef)."
    assert region.apply("Emily and James") == "Priya and Rahul"
    assert gender.apply(gender.apply("Emily and James")) == "Emily and James"
    assert gender.apply("Min-jun's order") == "Seo-yeon's order"


def test_the_shipped_lists_give_each_name_one_partner_per_swap():
    data = counterfactual.shipped()
    for kind in ("names_gender", "names_region"):
        counts = Counter(n for pair in data[kind] for n in pair)
        assert counts and max(counts.values()) == 1, kind
        assert all(n[:1].isupper() for n in counts), kind
    words = {"will", "mark", "grace", "hope", "may", "june", "rose", "bill", "don", "joy", "faith", "frank"}
    assert not words & {n.lower() for pair in data["names_gender"] for n in pair}  # no name is also a word


# ---- measuring ----------------------------------------------------------------------------------------------------

class SheSaysOne:
    """Predicts 1 when the input has the word "she", else 0; remembers what it was asked to predict."""

    def __init__(self):
        self.asked: list[list[str]] = []

    def run(self, records):
        self.asked.append([r["input"] for r in records])
        return Output(np.asarray([int("she" in r["input"].lower().split()) for r in records]), [], [])


def _records(texts: list[str]) -> list[dict]:
    return [{"text": t, "input": t} for t in texts]


def test_only_changed_items_count_and_mcnemar_matches_scipy():
    # 10 items right before the swap and wrong after it (b), 2 wrong before and right after (c), 5 unchanged
    texts = ["he paid twice"] * 10 + ["she paid twice"] * 2 + ["refund please"] * 5
    labels = [0] * 10 + [0] * 2 + [1] * 5  # the unchanged items are all wrong: they must not count
    pred = SheSaysOne()
    records = _records(texts)
    base = list(pred.run(records).predictions)
    res, flips = counterfactual.measure(pred, records, base, labels, {"pronouns": pronouns}, fields=["text"],
                                        join=lambda r: r["text"], max_items=100)
    c = res["pronouns"]
    assert pred.asked[-1] == ["she paid twice"] * 10 + ["he paid twice"] * 2  # only the changed items are rerun
    assert c["n_changed"] == 12 and c["flip_rate"] == 1.0 and c["metric"] == "accuracy"
    assert c["original"] == pytest.approx(10 / 12) and c["swapped"] == pytest.approx(2 / 12)
    assert c["change"] == pytest.approx(-8 / 12)
    assert (c["mcnemar"]["b"], c["mcnemar"]["c"]) == (10, 2)
    assert c["mcnemar"]["p_value"] == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue)
    assert round(c["mcnemar"]["p_value"], 4) == 0.0386  # 2 * P(X <= 2 | 12, 1/2)
    assert flips["pronouns"][0] == {"item": 0, "text": "she paid twice", "before": 0, "after": 1,
                                    "original": "he paid twice"}

    few, _ = counterfactual.measure(pred, records, base, labels, {"pronouns": pronouns}, fields=["text"],
                                    join=lambda r: r["text"], max_items=3)
    assert few["pronouns"]["n_changed"] == 3 and len(pred.asked[-1]) == 3  # the first max_items changed items
    none, flips = counterfactual.measure(pred, _records(["refund please"]), [0], [0], {"pronouns": pronouns},
                                         fields=["text"], join=lambda r: r["text"], max_items=10)
    assert none["pronouns"]["n_changed"] == 0 and none["pronouns"]["flip_rate"] is None and not flips
    blind, _ = counterfactual.measure(pred, records, base, None, {"pronouns": pronouns}, fields=["text"],
                                      join=lambda r: r["text"], max_items=100)
    assert blind["pronouns"]["flip_rate"] == 1.0 and blind["pronouns"]["mcnemar"] is None


class Echo:
    """A generation predictor that answers with its input."""

    def run(self, records):
        return Output([r["input"] for r in records], [], [])


def test_generated_text_that_follows_the_swap_is_neither_a_flip_nor_an_error():
    records = _records(["Dear Emily, your refund is on its way.", "No name here."])
    targets = [r["input"] for r in records]
    swaps = {"names_gender": names["names_gender"]}
    res, flips = counterfactual.measure(Echo(), records, targets, targets, swaps, fields=["text"],
                                        join=lambda r: r["text"], max_items=10)
    c = res["names_gender"]
    assert c["n_changed"] == 1 and c["flip_rate"] == 0.0 and c["metric"] == "exact_match"
    assert c["original"] == c["swapped"] == 1.0 and c["change"] == 0.0 and flips == {"names_gender": []}


def test_summary_over_seeds_keeps_mcnemar_per_seed():
    seed0 = {"pronouns": {"n_changed": 12, "flip_rate": 0.5, "metric": "accuracy", "original": 0.8, "swapped": 0.6,
                          "change": -0.2, "mcnemar": {"b": 4, "c": 1, "p_value": 0.375}}}
    seed1 = {"pronouns": {"n_changed": 12, "flip_rate": 0.25, "metric": "accuracy", "original": 0.9,
                          "swapped": 0.9, "change": 0.0, "mcnemar": {"b": 1, "c": 1, "p_value": 1.0}},
             "names_gender": {"n_changed": 0, "flip_rate": None, "metric": "accuracy", "original": None,
                              "swapped": None, "change": None, "mcnemar": None}}
    s = counterfactual.summarize([(0, seed0), (1, seed1)])
    assert list(s) == ["pronouns", "names_gender"]
    p = s["pronouns"]
    assert p["flip_rate"] == pytest.approx(0.375) and p["change"] == pytest.approx(-0.1)
    assert (p["p_min"], p["p_max"], p["seeds"]) == (0.375, 1.0, 2) and [t["seed"] for t in p["mcnemar"]] == [0, 1]
    assert s["names_gender"]["n_changed"] == 0 and s["names_gender"]["p_min"] is None


# ---- the study's own pairs ------------------------------------------------------------------------------------------

STUDY = {"name": "cf", "task": {"data": {"train": "train.csv"}, "text": "text", "label": "label"},
         "strategies": [{"zero_shot": {}}]}


def _study(tmp_path, pairs_file="swaps.csv", **cf):
    doc = {**STUDY, "consistency": {"perturbations": [], "counterfactual": {"pairs_file": pairs_file, **cf}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_pairs_file_is_read_relative_to_the_study_file_and_kept_with_the_config(tmp_path, monkeypatch):
    (tmp_path / "swaps.csv").write_text("original,replacement,note\nParis,Lagos,cities\n\nlagos,paris,again\n"
                                        "iPhone,Pixel,\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)  # not the study's folder
    cfg, _, _ = read_study(_study(tmp_path))
    cf = cfg.consistency.counterfactual
    assert cf.pairs == [("Paris", "Lagos"), ("iPhone", "Pixel")] and cf.kinds() == ["pairs"]
    assert StudyConfig.model_validate(cfg.model_dump()) == cfg  # a stored config reloads without the file
    swap = counterfactual.swaps(cf)["pairs"]
    assert swap.apply("From paris to LAGOS on my iphone") == "From lagos to PARIS on my pixel"
    assert parse_study({**STUDY, "consistency": {"counterfactual": {"pairs_file": "swaps.csv"}}},
                       base_dir=tmp_path).consistency.counterfactual.pairs == cf.pairs
    inline = parse_study({**STUDY, "consistency": {"counterfactual": {"names": True, "pairs": [["a", "b"]]}}})
    assert inline.consistency.counterfactual.kinds() == ["names_gender", "names_region", "pairs"]
    assert CounterfactualConfig().kinds() == []  # off by default


@pytest.mark.parametrize("content, message", [
    (None, r"swaps\.csv: file not found"),
    (b"original,replacement\nParis,Lagos\nCaf\xe9,Bar\n", r"swaps\.csv line 3: not valid UTF-8"),
    (b"original,target\nParis,Lagos\n", r"swaps\.csv line 1: the header has no column replacement"),
    (b"", r"swaps\.csv is empty"),
    (b"original,replacement\n\n", r"swaps\.csv has no pairs"),
    (b"original,replacement\nParis,Lagos\nRome,\n", r"swaps\.csv line 3: the replacement is empty"),
    (b"original,replacement\nParis\n", r"swaps\.csv line 2: 1 column\(s\)"),
    (b"original,replacement\nParis,paris\n", r"swaps\.csv line 2: Paris is swapped with itself"),
    (b"original,replacement\nParis,Lagos\n\nLagos,Rome\n",
     r"swaps\.csv line 4: Lagos is already swapped with Paris \(.*swaps\.csv line 2\); a term has one partner"),
])
def test_pairs_file_errors_name_the_study_line_the_file_and_its_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "swaps.csv").write_bytes(content)
    path = _study(tmp_path)
    with pytest.raises(ConfigError) as exc:
        read_study(path)
    text = str(exc.value)
    assert re.search(message, text), text
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "pairs_file" in t)
    assert text.startswith(f"{path} line {line}: consistency.counterfactual.pairs_file"), text


def test_pairs_written_in_the_study_are_checked_too():
    given = r"consistency\.counterfactual\.pairs: pairs\[1\]: A is already swapped with b \(pairs\[0\]\)"
    with pytest.raises(ConfigError, match=given):
        parse_study({**STUDY, "consistency": {"counterfactual": {"pairs": [["a", "b"], ["c", "A"]]}}})
    with pytest.raises(ConfigError, match="pairs_file is read when the study is read"):
        parse_study({**STUDY, "consistency": {"counterfactual": {"pairs_file": "x.csv", "pairs": []}}})


# ---- a study end to end: stored with the trial, shown by show, the report and the ui -----------------------------

NAMED = ["Emily asked", "ask James", "Maria wrote", "from Priya"]
GENDERED = ["he said", "she said", "ask her", "his note"]


def test_a_study_stores_and_shows_the_counterfactual_figures(tmp_path, tiny_model_dir):
    test = toy_rows(24, 3)
    for i in range(8):  # items 0-7 carry a name, 8-15 a pronoun, 16-18 a pair of the study's own; the rest none
        text, label = test[i]
        test[i] = (f"{NAMED[i % 4]} {text}", label)
        text, label = test[8 + i]
        test[8 + i] = (f"{GENDERED[i % 4]} {text}", label)
    for i in range(16, 19):
        test[i] = (test[i][0] + " plot twist", test[i][1])
    files = {"train": write_csv(tmp_path / "train.csv", toy_rows(48, 1)),
             "dev": write_csv(tmp_path / "dev.csv", toy_rows(16, 2)), "test": write_csv(tmp_path / "test.csv", test)}
    (tmp_path / "swaps.csv").write_text("original,replacement\nplot twist,surprise ending\n", encoding="utf-8")
    study = {"name": "cf-e2e", "task": {"data": {k: v.name for k, v in files.items()}, "text": "text",
                                        "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
             "model": {"path": str(tiny_model_dir), "precision": "fp32"},
             "training": {"epochs": 2, "batch_size": 16, "max_length": 32},
             "strategies": [{"zero_shot": {}}, {"linear_probe": {}}], "seeds": [0], "store": "runs",
             "consistency": {"perturbations": ["case"], "max_items": 20,
                             "counterfactual": {"names": True, "pronouns": True, "pairs_file": "swaps.csv"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output

    store = Store(tmp_path / "runs")
    rows = store.trials("cf-e2e")
    truth = store.test_set(rows[0]["record"]["fingerprints"]["test"])
    inputs = truth["inputs"]
    expected = {"names_gender": sum(any(n in t for n in ("Emily", "James", "Maria", "Priya")) for t in inputs),
                "names_region": sum(any(n in t for n in ("Emily", "James", "Maria", "Priya")) for t in inputs),
                "pronouns": sum(any(re.search(rf"\b{w}\b", t) for w in ("he", "she", "her", "his")) for t in inputs),
                "pairs": sum("plot twist" in t for t in inputs)}
    assert expected == {"names_gender": 8, "names_region": 8, "pronouns": 8, "pairs": 3}
    swaps = counterfactual.swaps(parse_study(study, base_dir=tmp_path).consistency.counterfactual)
    for row in rows:
        cf = row["record"]["consistency"]["counterfactual"]
        assert list(cf) == ["names_gender", "names_region", "pronouns", "pairs"]
        items = store.items([row["key"]])[row["key"]]
        for kind, c in cf.items():
            assert c["n_changed"] == expected[kind], (row["label"], kind)
            assert 0.0 <= c["flip_rate"] <= 1.0 and c["change"] == pytest.approx(c["swapped"] - c["original"])
            changed = [i for i, t in enumerate(inputs) if swaps[kind].apply(t) != t]
            right = np.mean([items["scores"]["accuracy"][i] for i in changed])
            assert c["original"] == pytest.approx(right)  # accuracy before the swap: the trial's own, on those items
            assert 0.0 <= c["mcnemar"]["p_value"] <= 1.0
        assert "perturbation" in row["record"]["consistency"]  # next to the existing perturbations
        assert row["record"]["config"]["consistency"]["counterfactual"]["pairs"] == [["plot twist", "surprise ending"]]

    res = runner.invoke(app, ["show", "cf-e2e", "--store", str(tmp_path / "runs"), "--consistency"])
    assert res.exit_code == 0, res.output
    assert "counterfactual swaps" in res.stdout and "flip: case" in res.stdout
    for word in ("names_gender", "names_region", "pronouns", "pairs", "McNemar p", " pts"):
        assert word in res.stdout, word
    res = runner.invoke(app, ["show", "cf-e2e", "--store", str(tmp_path / "runs"), "--consistency", "--json"])
    doc = json.loads(res.stdout)
    probe = next(s for s in doc["strategies"] if s["label"] == "linear_probe")
    stored = next(r for r in rows if r["label"] == "linear_probe")["record"]["consistency"]["counterfactual"]
    assert probe["consistency"]["counterfactual"]["pronouns"]["flip_rate"] == stored["pronouns"]["flip_rate"]
    assert probe["consistency"]["counterfactual"]["pronouns"]["p_min"] == stored["pronouns"]["mcnemar"]["p_value"]

    res = runner.invoke(app, ["report", "cf-e2e", "--store", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                              "--json"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="counterfactual"' in html and "names_region" in html and "McNemar p" in html
    assert "| linear_probe | pronouns |" in (tmp_path / "rep" / "report.md").read_text()

    from fastapi.testclient import TestClient

    from tunebench.ui import create_app

    client = TestClient(create_app(store), base_url="http://127.0.0.1")
    assert "Counterfactual swaps" in client.get("/study/cf-e2e").text
    page = client.get(f"/study/cf-e2e/trial/{rows[0]['key'][:10]}").text
    assert "Counterfactual swaps" in page and "names_gender" in page and "McNemar b / c" in page
