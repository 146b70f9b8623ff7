"""Evidence: statistics against known cases, perturbations, the cost model and the recommendation's verdicts."""

from __future__ import annotations

import random

import numpy as np
import pytest
from typer.testing import CliRunner

from tunebench.analysis import analyze
from tunebench.cli import app
from tunebench.config import ApiPrice, CostConfig
from tunebench.evaluation import consistency
from tunebench.evaluation.cost import Pricing, break_even, price
from tunebench.evaluation.stats import bootstrap_ci, compare, mcnemar, metric_fn
from tunebench.analysis.recommend import Constraints, parse_amount, recommend
from tunebench.store import Store
from tunebench.strategies.base import Output

runner = CliRunner()


def run(preds, scores=None):
    scores = scores if scores is not None else {}
    return {"predictions": list(preds), "scores": scores}


# ---- statistics -------------------------------------------------------------------------------------------------

def test_bootstrap_interval_covers_the_true_accuracy_in_simulation():
    """200 simulated test sets of 150 items from a model whose true accuracy is 0.7: the 95% interval must cover
    0.7 about 95% of the time (binomial noise allows 0.90-0.99 here)."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for t in range(200):
        correct = (rng.random(150) < 0.7).astype(float)
        m = metric_fn("accuracy", [run([0] * 150, {"accuracy": correct.tolist()})], {})
        lo, hi = bootstrap_ci(m, seed=t)
        covered += lo <= 0.7 <= hi
        widths.append(hi - lo)
        assert lo <= correct.mean() <= hi
    assert 0.90 <= covered / 200 <= 0.99
    assert 0.10 < np.mean(widths) < 0.20  # ~ 2 x 1.96 x sqrt(.7 x .3 / 150) = 0.147


def test_bootstrap_is_seeded_and_averages_seeds_per_item():
    a = [1.0, 0.0] * 20
    b = [1.0, 1.0] * 20
    m = metric_fn("accuracy", [run([0] * 40, {"accuracy": a}), run([0] * 40, {"accuracy": b})], {})
    assert m.value() == pytest.approx(0.75)
    assert bootstrap_ci(m, seed=3) == bootstrap_ci(m, seed=3)


def test_mcnemar_matches_a_hand_computed_table():
    # A right & B wrong on 10 items, the reverse on 2, both right on 5, both wrong on 3.
    a = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
    b = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    res = mcnemar(a, b)
    assert (res["b"], res["c"]) == (10, 2)
    # exact two-sided: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert res["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    assert mcnemar([1] * 6, [0] * 6)["p_value"] == pytest.approx(2 / 64)


def test_macro_f1_and_bleu_have_intervals():
    truth = {"labels": [0, 1] * 30, "label_names": ["a", "b"]}
    m = metric_fn("macro_f1", [run([0, 1] * 25 + [1, 0] * 5)], truth)
    lo, hi = bootstrap_ci(m, n_resamples=200)
    assert lo < m.value() < hi
    refs = {"targets": [f"the cat number {i} sat" for i in range(30)]}
    g = metric_fn("bleu", [run([f"the cat number {i} sat" if i % 3 else "a dog" for i in range(30)])], refs)
    lo, hi = bootstrap_ci(g, n_resamples=50)
    assert 0 < lo <= g.value() <= hi <= 1


def test_paired_comparison_separates_a_clear_gap_and_ties_a_small_one():
    rng = np.random.default_rng(1)
    good = (rng.random(400) < 0.9).astype(float)
    bad = np.where(rng.random(400) < 0.4, 0.0, good)  # same items, 40% of them knocked out
    close = good.copy()
    close[:3] = 1 - close[:3]
    fa = metric_fn("accuracy", [run([0] * 400, {"accuracy": good.tolist()})], {})
    fb = metric_fn("accuracy", [run([0] * 400, {"accuracy": bad.tolist()})], {})
    fc = metric_fn("accuracy", [run([0] * 400, {"accuracy": close.tolist()})], {})
    clear = compare(fb, fa, correct_pairs=[((0, 0), bad > 0, good > 0)])
    assert not clear.tied and clear.diff < 0 and clear.ci[1] < 0 and clear.p_mcnemar < 0.05
    small = compare(fc, fa, correct_pairs=[((0, 0), close > 0, good > 0)])
    assert small.tied and small.ci[0] <= 0 <= small.ci[1]  # tied exactly when the interval contains 0
    same = compare(fa, fa)
    assert same.tied and same.identical and same.diff == 0


# ---- perturbations --------------------------------------------------------------------------------------------

def test_perturbations_are_deterministic_and_preserve_the_words():
    text = "Hello, I want to buy a new card but the payment failed."
    for kind in ("case", "punctuation", "whitespace", "typo", "synonym"):
        a = consistency.perturb(text, kind, seed=0, index=4)
        assert a == consistency.perturb(text, kind, seed=0, index=4), kind
        assert a != text, kind
    assert consistency.perturb(text, "case", 0, 0) == text.lower()
    assert consistency.perturb(text, "punctuation", 0, 0) == text[:-1]
    assert consistency.perturb(text, "whitespace", 0, 0).split() == text.split()
    typo = consistency.perturb(text, "typo", 0, 0)
    assert len(typo) == len(text) and sorted(typo) == sorted(text)
    syn = consistency.perturb(text, "synonym", 0, 0)
    table = consistency.synonyms()
    assert any(syn == text.replace(f" {w} ", f" {s} ", 1) for w in table for s in table[w])  # one listed word swapped
    assert consistency.perturb("zzz qqq", "synonym", 0, 0) == "zzz qqq"  # no listed word: unchanged


class LengthPredictor:
    """Predicts 1 when the input has an even number of characters: whitespace and punctuation edits flip it."""

    def __init__(self, temperature: float = 0.0):
        self.decode = type("D", (), {"temperature": temperature})()
        self.seed = 0

    def run(self, records):
        if self.decode.temperature > 0:
            rng = random.Random(self.seed)
            return Output(np.asarray([rng.randint(0, 1) for _ in records]), [], [])
        return Output(np.asarray([len(r["input"]) % 2 for r in records]), [], [])


def test_flip_rate_counts_changed_predictions_on_edited_items_only():
    records = [{"text": t, "input": t} for t in ["Where is my order", "buy it now.", "cancel", "HELP ME"]]
    pred = LengthPredictor()
    base = pred.run(records).predictions
    res = consistency.measure(pred, records, list(base), kinds=["case", "punctuation", "synonym"], seed=0,
                              fields=["text"], join=lambda r: r["text"], samples=3)
    assert res["perturbation"]["case"] == 0.0  # same length
    assert res["perturbation"]["punctuation"] == 1.0  # one character more or less: parity flips
    assert res["perturbed_items"]["synonym"] == 3  # "Where is my order" has no listed word: left out
    assert "sample_agreement" not in res  # greedy: no samples
    sampled = LengthPredictor(temperature=1.0)
    res = consistency.measure(sampled, records * 10, list(sampled.run(records * 10).predictions), kinds=[], seed=0,
                              fields=["text"], join=lambda r: r["text"], samples=4)
    assert 0.0 <= res["sample_agreement"] < 0.5 and sampled.seed == 0
    assert consistency.agreement([[1, 2, 3], [1, 2, 4]]) == pytest.approx(2 / 3)
    assert consistency.agreement([["The cat."], ["the cat"]]) == 1.0


# ---- the cost model -------------------------------------------------------------------------------------------

def test_break_even_on_a_hand_computed_case():
    table = CostConfig(train_per_hour=2.0, serve_per_hour=1.0, concurrency=1,
                       api={"gpt": ApiPrice(input_per_1m=0.5, output_per_1m=1.5)})
    prompting = price({"train_seconds": 0.0, "prompt_tokens_mean": 400, "completion_tokens_mean": 10}, "gpt", table)
    tuned = price({"train_seconds": 3600.0, "latency_ms_mean": 36.0}, "local", table)
    assert prompting.per_request == pytest.approx(400 * 0.5e-6 + 10 * 1.5e-6)  # 0.000215 per request
    assert tuned.upfront == pytest.approx(2.0) and tuned.per_request == pytest.approx(0.036 / 3600)  # 1e-5
    be = break_even(prompting, tuned)
    assert be["status"] == "at" and be["requests"] == pytest.approx(2.0 / (0.000215 - 0.00001))  # 9756.1
    assert tuned.total(1000, 30) == pytest.approx(2.0 + 1e-5 * 30_000)
    four = price({"train_seconds": 0.0, "latency_ms_mean": 36.0}, "local", table.model_copy(update={"concurrency": 4}))
    assert four.per_request == pytest.approx(tuned.per_request / 4)
    assert break_even(Pricing(1, 0.001, "x"), Pricing(5, 0.002, "y"))["status"] == "never"
    assert break_even(Pricing(5, 0.001, "x"), Pricing(1, 0.002, "y")) == {"requests": pytest.approx(4000), "status": "below"}
    assert break_even(Pricing(5, 0.002, "x"), Pricing(1, 0.001, "y"))["status"] == "always"


def test_amounts_parse_with_units():
    assert parse_amount("50000/day", "volume") == 50000
    assert parse_amount("50k", "volume") == 50000
    assert parse_amount("100ms", "ms") == 100 and parse_amount("0.2s", "ms") == 200
    assert parse_amount("90d", "days") == 90 and parse_amount("2w", "days") == 14
    assert parse_amount("$200", "money") == 200
    with pytest.raises(ValueError):
        parse_amount("lots", "volume")


# ---- the recommendation, on a synthetic store -----------------------------------------------------------------

def fake_study(store: Store, name: str, trials: list[dict], n: int, costs: dict | None = None) -> None:
    """Store finished trials without running anything: what the study runner would have written."""
    labels = [i % 2 for i in range(n)]
    keys = []
    for t in trials:
        key = f"{name}-{t['label']}-{t.get('seed', 0)}-{t.get('train_size', 0)}"
        keys.append(key)
        preds = t["predictions"]
        acc = [float(p == y) for p, y in zip(preds, labels)]
        row = {"key": key, "study": name, "strategy": t["label"], "family": t["family"], "label": t["label"],
               "params": {}, "seed": t.get("seed", 0), "train_size": t.get("train_size", 0), "train_size_spec": "all",
               "metrics": {"accuracy": float(np.mean(acc)), "macro_f1": float(np.mean(acc)),
                           "confusion_matrix": [[1, 0], [0, 1]]},
               "cost": {"train_seconds": t.get("train_seconds", 0.0), "latency_ms_p50": t.get("latency", 10.0),
                        "latency_ms_p95": t.get("latency", 10.0) * 1.5, "latency_ms_mean": t.get("latency", 10.0),
                        "latency_ms_samples": [t.get("latency", 10.0)] * 4, "trainable_params": 0,
                        "prompt_tokens_mean": t.get("tokens", 20), "completion_tokens_mean": 1},
               "history": [], "record": {"fingerprints": {"test": "fp"}, "model": t.get("model", "default")}}
        store.add_trial(row, None, {"predictions": preds, "scores": {"accuracy": acc}},
                        ("fp", {"labels": labels, "label_names": ["neg", "pos"]}))
    store.save_study(name, {"name": name, "task": {"type": "classification"}, "costs": costs or {}}, None, keys)


def test_identical_predictions_give_a_tie_and_the_cheaper_one(tmp_path):
    store = Store(tmp_path)
    n = 200
    preds = [i % 2 if i % 5 else 1 - i % 2 for i in range(n)]  # 80% right
    fake_study(store, "same", [
        {"label": "lora", "family": "weight_tuning", "predictions": preds, "train_seconds": 36000, "train_size": 100,
         "model": "local"},
        {"label": "few_shot", "family": "prompting", "predictions": preds, "tokens": 900, "latency": 40.0},
    ], n, costs={"api": {"default": {"input_per_1m": 1.0}}})
    ev = analyze(store, "same")
    rec = recommend(ev, Constraints(volume_per_day=100))
    assert rec["verdict"] == "tie"
    assert set(rec["tied"]) == {"lora", "few_shot"}
    comparison = ev.to_dict()["strategies"][1]["vs_best"]
    assert comparison["identical"] and comparison["tied"] and comparison["diff"] == 0
    # 90 days x 100 requests x 900 tokens at $1/1M = $8.10 for few-shot; LoRA's 10 h of training cost $10 alone.
    # At 10M requests a day LoRA's serving time (10 ms at $1/h) is far cheaper than the tokens.
    assert rec["recommended"] == "few_shot"
    assert recommend(ev, Constraints(volume_per_day=10_000_000))["recommended"] == "lora"


def test_a_clear_winner_is_recommended_with_reasons_and_constraints_filter(tmp_path):
    store = Store(tmp_path)
    n = 300
    truth = [i % 2 for i in range(n)]
    good = [y if i % 20 else 1 - y for i, y in enumerate(truth)]  # 95%
    poor = [y if i % 3 else 1 - y for i, y in enumerate(truth)]  # 67%
    fake_study(store, "clear", [
        {"label": "full", "family": "weight_tuning", "predictions": good, "train_seconds": 60, "latency": 200.0,
         "train_size": 100},
        {"label": "zero_shot", "family": "prompting", "predictions": poor, "latency": 5.0},
    ], n)
    ev = analyze(store, "clear")
    rec = recommend(ev)
    assert rec["verdict"] == "recommend" and rec["recommended"] == "full"
    top = rec["ranking"][0]
    assert any("95% CI" in r for r in top["reasons"]) and any("per 1,000 requests" in r for r in top["reasons"])
    assert "ahead of zero_shot" in rec["summary"]
    fast = recommend(ev, Constraints(latency_p95_ms=50))
    assert fast["recommended"] == "zero_shot"
    assert any("latency" in p for p in fast["ranking"][-1]["problems"])
    strict = recommend(ev, Constraints(min_quality=0.99))
    assert strict["verdict"] == "none feasible" and strict["recommended"] is None
    near = recommend(ev, Constraints(min_quality=0.94))  # 0.95 observed, interval reaches below 0.94
    assert near["verdict"] == "not enough evidence" and near["recommended"] == "full"


def test_recommend_cli_json_and_bad_flags(tmp_path):
    store = Store(tmp_path / "runs")
    fake_study(store, "cli", [
        {"label": "full", "family": "weight_tuning", "predictions": [i % 2 for i in range(50)], "train_size": 10},
        {"label": "zero_shot", "family": "prompting", "predictions": [0] * 50},
    ], 50)
    res = runner.invoke(app, ["recommend", "cli", "--store", str(tmp_path / "runs"), "--json", "--volume", "5k/day",
                              "--api-price", "default=2/4"])
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(res.stdout)
    assert doc["recommended"] == "full" and doc["constraints"]["volume_per_day"] == 5000
    bad = runner.invoke(app, ["recommend", "cli", "--store", str(tmp_path / "runs"), "--latency-p95", "fast"])
    assert bad.exit_code == 2 and "--latency-p95: cannot read 'fast'" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["recommend", "cli", "--store", str(tmp_path / "runs"), "--api-price", "nonsense"])
    assert bad.exit_code == 2 and "MODEL=IN/OUT" in bad.output
    missing = runner.invoke(app, ["recommend", "nope", "--store", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and "no study named 'nope'" in missing.output
