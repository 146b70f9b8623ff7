"""The report: built from the store alone, self-contained, and every plot renders in headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app

from .conftest import assert_verdicts_follow_intervals

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_model_dir):
    """A small ladder on the tiny BERT, two seeds and two train sizes, run once for the module."""
    from .conftest import toy_rows, write_csv

    tmp = tmp_path_factory.mktemp("report")
    files = {"train": write_csv(tmp / "train.csv", toy_rows(64, 1)), "dev": write_csv(tmp / "dev.csv", toy_rows(16, 2)),
             "test": write_csv(tmp / "test.csv", toy_rows(40, 3))}
    study = {
        "name": "toy-report",
        "task": {"data": {k: str(v) for k, v in files.items()}, "text": "text", "label": "label",
                 "labels": {"neg": "negative", "pos": "positive"}},
        "model": {"path": str(tiny_model_dir), "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 16, "max_length": 32},
        "strategies": [{"zero_shot": {}}, {"few_shot": {"shots": 2}}, {"linear_probe": {}}, {"full": {"epochs": 2}}],
        "seeds": [0, 1], "train_sizes": [16, "all"], "store": str(tmp / "runs"),
        "consistency": {"max_items": 20},
        "costs": {"train_per_hour": 3.0, "serve_per_hour": 1.5, "volume_per_day": 20000, "horizon_days": 30},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    return {"path": path, "store": tmp / "runs", "files": files, "tmp": tmp}


def _report(store: Path, out: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["report", "toy-report", "--store", str(store), "--out", str(out), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_report_has_every_section_and_rebuilds_from_the_store_alone(finished_study, monkeypatch):
    out = finished_study["tmp"] / "rep1"
    paths = _report(finished_study["store"], out)
    doc = json.loads(Path(paths["json"]).read_text())
    a = doc["analysis"]
    assert assert_verdicts_follow_intervals(Path(paths["json"]), Path(paths["html"]).read_text()) >= 3
    labels = {s["label"] for s in a["strategies"]}
    assert labels == {"zero_shot", "few_shot(shots=2)", "linear_probe", "full"}
    for s in a["strategies"]:
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
        assert set(s["consistency"]["perturbation"]) == {"case", "punctuation", "whitespace", "typo", "synonym"}
        assert s["cost"]["per_1k_requests"] > 0 and len(s["latency_ms_samples"]) >= 32
        assert s["confusion_matrix"] is not None
        if s["label"] != a["strategies"][0]["label"]:
            assert s["vs_best"]["ci"][0] <= s["vs_best"]["diff"] <= s["vs_best"]["ci"][1]
    multi = [s for s in a["strategies"] if len(s["seeds"]) == 2]
    assert multi and all(s["consistency"]["seed_agreement"] is not None for s in multi)
    assert {p["train_size"] for p in a["curves"]["linear_probe"]} == {16, 64}
    assert a["crossover"]["status"] in ("reached", "not reached") and a["crossover"]["steps"]
    assert len(a["break_even"]) == 4  # 2 prompting x 2 tuning
    assert a["cost_model"]["train_per_hour"] == 3.0
    assert doc["recommendation"]["verdict"] in ("recommend", "tie", "not enough evidence")
    md = Path(paths["md"]).read_text()
    assert "## Recommendation" in md and "figures/leaderboard.png" in md and (out / "figures" / "pareto.png").exists()

    # Now without the data files and with trials made impossible to run: the report must come out the same.
    for f in finished_study["files"].values():
        f.unlink()

    def no_trials(*a, **k):
        raise AssertionError("the report reran a trial")

    monkeypatch.setattr("tunebench.runner.executors.execute_staged", no_trials)
    monkeypatch.setattr("tunebench.runner.study.Study.run", no_trials)
    again = json.loads(Path(_report(finished_study["store"], finished_study["tmp"] / "rep2")["json"]).read_text())
    assert again["analysis"] == a
    assert again["recommendation"] == doc["recommendation"]


def test_report_renders_in_headless_chromium(finished_study, tmp_path):
    if CHROMIUM is None:
        pytest.fail("headless Chromium is needed for this test: apt-get install chromium (the README's test command "
                    "installs it)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    paths = _report(finished_study["store"], tmp_path / "rep", "--volume", "1m/day", "--latency-p95", "500ms")
    html = Path(paths["html"])
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(html.as_uri())
            page.wait_for_load_state("load")
            shot = page.screenshot(full_page=True)
            (tmp_path / "report.png").write_bytes(shot)
            figures = page.locator("figure.plot")
            ids = [figures.nth(i).get_attribute("id") for i in range(figures.count())]
            assert set(ids) == {"fig-leaderboard", "fig-learning_curves", "fig-pareto", "fig-latency",
                                "fig-confusion", "fig-break_even"}
            for i in range(figures.count()):
                img = figures.nth(i).locator("img")
                size = img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
                assert size[0] and size[1] > 100 and size[2] > 100, (ids[i], size)
                png = Image.open(io.BytesIO(img.screenshot())).convert("L")
                lo, hi = png.getextrema()
                assert hi - lo > 100, f"{ids[i]} rendered blank"
            verdict = page.locator(".verdict").inner_text()
            assert any(v in verdict.lower() for v in ("recommend", "tie", "not enough evidence", "none feasible"))
            assert page.locator("#consistency + p + table tr").count() == 5  # header + 4 strategies
        finally:
            browser.close()
    assert errors == []
    assert requests == []  # self-contained: nothing fetched from the network
    full = Image.open(io.BytesIO(shot))
    assert full.size[1] > 2000
