"""The two-level bootstrap (seeds, then items), verdicts that follow the printed interval, Holm's correction and
the seeds-needed estimate."""

from __future__ import annotations

import numpy as np
import pytest

from tunebench.evaluation.stats import bootstrap_ci, compare, holm, holm_adjust, metric_fn


def _runs(correct: np.ndarray) -> list[dict]:
    """Stored items of one run per row of ``correct`` (seeds x items of 0/1)."""
    return [{"predictions": [0] * correct.shape[1], "scores": {"accuracy": row.astype(float).tolist()}}
            for row in correct]


def _simulate(rng, mu: float, seed_sd: float, seeds: int, items: int) -> np.ndarray:
    """Each seed has its own accuracy around ``mu``; each item a difficulty; outcomes Bernoulli."""
    p_seed = np.clip(mu + rng.normal(0, seed_sd, seeds), 0.01, 0.99)
    return rng.random((seeds, items)) < p_seed[:, None]


@pytest.mark.parametrize("seed_sd", [0.04, 0.0], ids=["seed-variance", "no-seed-variance"])
def test_two_level_intervals_cover_at_the_stated_rate(seed_sd):
    """200 simulated studies with known seed variance (seed accuracies spread by ``seed_sd``) and item variance
    (Bernoulli outcomes): the 95% interval covers the true accuracy 93-97% of the time, also when seeds add
    nothing (a plain two-level resample of a crossed design would over-cover there)."""
    rng = np.random.default_rng(7)
    mu, hits, n = 0.75, 0, 200
    for _ in range(n):
        m = metric_fn("accuracy", _runs(_simulate(rng, mu, seed_sd, seeds=10, items=400)), {})
        lo, hi = bootstrap_ci(m, n_resamples=1000, seed=int(rng.integers(1 << 30)))
        hits += lo <= mu <= hi
    assert 0.93 <= hits / n <= 0.97, hits / n


def test_with_one_seed_it_is_the_item_bootstrap():
    rng = np.random.default_rng(0)
    m = metric_fn("accuracy", _runs(rng.random((1, 500)) < 0.8), {})
    lo, hi = bootstrap_ci(m, n_resamples=2000)
    se = np.sqrt(m.value() * (1 - m.value()) / 500)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_items_separate_but_seeds_do_not_so_the_verdict_is_a_tie_with_the_interval_to_match():
    rng = np.random.default_rng(3)
    a = np.stack([rng.random(1000) < p for p in (0.95, 0.95, 0.65)])  # unstable across seeds: mean 0.85
    b = np.stack([rng.random(1000) < 0.80 for _ in range(3)])  # steady: 0.80
    fa, fb = metric_fn("accuracy", _runs(a), {}), metric_fn("accuracy", _runs(b), {})
    items_only = compare(metric_fn("accuracy", _runs(a.mean(0, keepdims=True) > 0.5), {}),
                         metric_fn("accuracy", _runs(b[:1]), {}))
    assert not items_only.tied  # over items alone the gap is clear
    c = compare(fa, fb, correct_pairs=[((s, s), x, y) for s, x, y in zip(range(3), a, b)])
    assert c.tied and c.ci[0] <= 0 <= c.ci[1]  # the printed interval and the verdict agree
    assert c.seed_share > 0.5 and c.seeds_needed is not None and c.seeds_needed > 3
    assert "seed variance dominates" in c.note and f"about {c.seeds_needed} seeds" in c.note
    assert "McNemar differs by seed" in c.note  # separated on seeds 0 and 1, not on seed 2


def test_holm_matches_a_hand_computed_table():
    # sorted p: 0.01*5=0.05, 0.02*4=0.08, 0.03*3=0.09, 0.04*2=0.08 -> 0.09 (monotone), 0.20*1=0.20
    assert holm_adjust([0.04, 0.01, 0.20, 0.03, 0.02]) == pytest.approx([0.09, 0.05, 0.20, 0.09, 0.08])
    assert holm_adjust([0.5]) == [0.5]


def test_holm_widens_intervals_and_a_chance_separation_becomes_a_tie():
    rng = np.random.default_rng(11)
    ref = metric_fn("accuracy", _runs(rng.random((1, 300)) < 0.8), {})
    others = []
    for shift in (0.25, 0.045, 0.0, 0.0, 0.0):  # one real gap, one borderline, three nulls
        base = ref.per_item.copy()
        flip = rng.random(300) < shift
        others.append(metric_fn("accuracy", _runs(np.where(flip, 0.0, base)[None, :] > 0.5), {}))
    raw = [compare(o, ref) for o in others]
    corrected = holm(raw)
    for r, c in zip(raw, corrected):
        assert c.p_holm >= r.p_bootstrap and c.level >= r.level
        assert c.ci[0] <= r.ci[0] and c.ci[1] >= r.ci[1]  # never narrower than uncorrected
        assert c.tied == (c.ci[0] <= 0 <= c.ci[1])
    assert not corrected[0].tied
    assert sum(not c.tied for c in corrected) <= sum(not r.tied for r in raw)


def test_the_recommendation_says_when_more_seeds_are_needed(tmp_path):
    from tunebench.analysis.evidence import analyze
    from tunebench.analysis.recommend import recommend
    from tunebench.store import Store

    rng = np.random.default_rng(3)
    labels = (rng.random(1000) < 0.5).astype(int)
    store = Store(tmp_path / "runs")
    rows = []
    for strategy, family, accs in (("lora", "weight_tuning", (0.95, 0.95, 0.65)), ("few_shot", "prompting",
                                                                                   (0.80, 0.80, 0.80))):
        for seed, acc in enumerate(accs):
            right = rng.random(1000) < acc
            preds = np.where(right, labels, 1 - labels)
            key = f"{strategy}-{seed}"
            rows.append(key)
            row = {"key": key, "study": "s", "strategy": strategy, "family": family, "label": strategy,
                   "params": {}, "seed": seed, "train_size": 100, "train_size_spec": "100",
                   "metrics": {"accuracy": float(right.mean())}, "cost": {"train_seconds": 1.0 if family !=
                                                                          "prompting" else 0.0},
                   "history": [], "record": {"model": "default", "fingerprints": {"test": "fp"}}}
            store.add_trial(row, None, {"predictions": preds.tolist(), "scores": {"accuracy": right.astype(float)
                                                                                   .tolist()}},
                            ("fp", {"labels": labels.tolist(), "label_names": ["neg", "pos"]}))
    store.save_study("s", {"name": "s", "task": {"type": "classification"}}, None, rows)
    rec = recommend(analyze(store, "s"))
    assert rec["verdict"] == "tie"
    assert "Seed-to-seed variation dominates" in rec["summary"] and "seeds per strategy" in rec["summary"]
