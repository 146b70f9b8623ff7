"""`tunebench ui` over a store made by a tiny-model study: every page, the explorer's filters checked against the
store, baseline gains and losses, auth off loopback, the Host guard, and escaping of item text."""

from __future__ import annotations

import re

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.store import Store
from tunebench.ui import Query, create_app, explore, session_token

from .conftest import toy_rows, write_csv

runner = CliRunner()
EVIL = "<script>alert(1)</script> great movie"


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, tiny_model_dir) -> dict:
    """Two seeds of zero-shot, few-shot, linear probe and full fine-tuning; one test item carries a script tag."""
    tmp = tmp_path_factory.mktemp("ui")
    test = toy_rows(40, 3)
    test[5] = (EVIL, "pos")
    files = {"train": write_csv(tmp / "train.csv", toy_rows(64, 1)), "dev": write_csv(tmp / "dev.csv", toy_rows(16, 2)),
             "test": write_csv(tmp / "test.csv", test)}
    study = {"name": "toy-ui", "task": {"data": {k: str(v) for k, v in files.items()}, "text": "text", "label": "label",
                                        "labels": {"neg": "negative", "pos": "positive"}},
             "model": {"path": str(tiny_model_dir), "precision": "fp32"},
             "training": {"epochs": 2, "batch_size": 16, "max_length": 32},
             "strategies": [{"zero_shot": {}}, {"few_shot": {"shots": 2}}, {"linear_probe": {}}, {"full": {"epochs": 2}}],
             "seeds": [0, 1], "store": str(tmp / "runs"), "consistency": {"max_items": 20},
             "costs": {"train_per_hour": 3.0, "serve_per_hour": 1.5, "volume_per_day": 20000, "horizon_days": 30}}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    store = Store(tmp / "runs")
    return {"store": store, "rows": store.trials("toy-ui"), "tmp": tmp}


@pytest.fixture()
def client(ui_store) -> TestClient:
    return TestClient(create_app(ui_store["store"]), base_url="http://127.0.0.1:8765")


def _truth_and_preds(ui_store, keys):
    store = ui_store["store"]
    truth = store.test_set(ui_store["rows"][0]["record"]["fingerprints"]["test"])
    items = store.items(keys)
    return truth, {k: items[k]["predictions"] for k in keys}


def _shown(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-index="(\d+)">', html)]


def test_every_page_renders(client, ui_store):
    name = "toy-ui"
    key = ui_store["rows"][0]["key"]
    for url in ("/", "/fragments/studies", f"/study/{name}", f"/study/{name}/verdict?budget=1", f"/study/{name}/items",
                f"/study/{name}/trial/{key[:10]}", "/prompts", "/prompts/builtin.label", "/health"):
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:2000])
    home = client.get("/").text
    assert "toy-ui" in home and "finished" in home and f"{len(ui_store['rows'])}/{len(ui_store['rows'])}" in home
    assert client.get(f"/study/{name}/figure/leaderboard.png").headers["content-type"] == "image/png"
    assert client.get("/study/nope").status_code == 404


@pytest.mark.parametrize("flt", ["all", "wrong_any", "wrong_all", "disagree"])
def test_explorer_filters_match_the_store(client, ui_store, flt):
    keys = [r["key"] for r in ui_store["rows"]][:4]
    truth, preds = _truth_and_preds(ui_store, keys)
    n = len(truth["labels"])
    right = {k: [preds[k][i] == truth["labels"][i] for i in range(n)] for k in keys}
    expect = [i for i in range(n) if {
        "all": True, "wrong_any": not all(right[k][i] for k in keys), "wrong_all": not any(right[k][i] for k in keys),
        "disagree": len({preds[k][i] for k in keys}) > 1}[flt]]
    params = [("trial", k[:10]) for k in keys] + [("filter", flt), ("per_page", "500")]
    html = client.get("/study/toy-ui/items", params=params).text
    assert _shown(html) == expect
    assert f"{len(expect)} of {n} items match" in html


def test_explorer_label_and_text_filters_and_baseline_counts(ui_store):
    store, rows = ui_store["store"], ui_store["rows"]
    keys = [r["key"] for r in rows][:3]
    truth, preds = _truth_and_preds(ui_store, keys)
    labels = truth["labels"]
    page = explore(store, rows, Query(trials=keys, true="positive", pred="negative", per_page=500))
    assert [r["index"] for r in page.rows] == [i for i in range(len(labels)) if labels[i] == 1
                                               and any(preds[k][i] == 0 for k in keys)]
    page = explore(store, rows, Query(trials=keys, q="GREAT MOVIE", per_page=500))
    assert [r["input"] for r in page.rows] == [EVIL]
    page = explore(store, rows, Query(trials=keys, baseline=keys[0][:10], diff=True, per_page=500))
    for k in keys[1:]:
        gains = sum(preds[k][i] == labels[i] != preds[keys[0]][i] for i in range(len(labels)))
        losses = sum(preds[keys[0]][i] == labels[i] != preds[k][i] for i in range(len(labels)))
        assert page.versus[k]["gains"] == gains and page.versus[k]["losses"] == losses
    assert [r["index"] for r in page.rows] == [i for i in range(len(labels))
                                               if any(preds[k][i] != preds[keys[0]][i] for k in keys[1:])]


def test_item_text_is_escaped_and_scripts_are_not_allowed(client):
    html = client.get("/study/toy-ui/items", params={"q": "great movie"})
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.text and "<script>alert" not in html.text
    assert "script-src 'self'" in html.headers["content-security-policy"]


def test_constraints_change_the_verdict(client):
    loose = client.get("/study/toy-ui/verdict").text
    strict = client.get("/study/toy-ui/verdict", params={"min_quality": "1.01"}).text
    assert loose != strict and "none feasible" in strict
    bad = client.get("/study/toy-ui/verdict", params={"budget": "lots"}).text
    assert "budget: &#39;lots&#39; is not a non-negative number" in bad


def test_off_loopback_needs_a_key_and_a_known_host(ui_store):
    key = "k" * 24
    app_ = create_app(ui_store["store"], api_keys={key}, allowed_hosts=["ui.example"])
    c = TestClient(app_, base_url="http://ui.example")
    assert c.get("/").status_code == 401
    assert c.get("/study/toy-ui/items").status_code == 401
    assert c.get("/", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert c.post("/login", data={"key": "wrong", "next": "/"}).status_code == 401
    r = c.post("/login", data={"key": key, "next": "/prompts"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/prompts"
    assert "httponly" in r.headers["set-cookie"].lower() and key not in r.headers["set-cookie"]
    assert c.get("/", cookies={"tunebench_ui": session_token(key)}).status_code == 200
    evil = TestClient(app_, base_url="http://attacker.example")
    assert evil.get("/", headers={"Authorization": f"Bearer {key}"}).status_code == 400


def test_no_route_writes_the_store(ui_store):
    store = ui_store["store"]
    before = (store.trials("toy-ui"), store.studies())
    c = TestClient(create_app(store), base_url="http://127.0.0.1")
    for method in ("post", "put", "delete", "patch"):
        for url in ("/", "/study/toy-ui", "/study/toy-ui/items"):
            assert getattr(c, method)(url).status_code in (404, 405)
    assert (store.trials("toy-ui"), store.studies()) == before


def test_explorer_on_a_generation_study_shows_outputs_references_and_item_metrics(tmp_path):
    store = Store(tmp_path / "gen")
    refs = [f"answer {i}" for i in range(30)]
    outputs = {"a": [r if i % 3 else "wrong" for i, r in enumerate(refs)],
               "b": [r if i % 5 else "other" for i, r in enumerate(refs)]}
    for name, preds in outputs.items():
        em = [float(p == r) for p, r in zip(preds, refs)]
        row = {"key": f"{name}-key-0000", "study": "g", "strategy": "zero_shot", "family": "prompting",
               "label": name, "params": {}, "seed": 0, "train_size": 0, "train_size_spec": "all",
               "metrics": {"exact_match": sum(em) / len(em)}, "cost": {}, "history": [],
               "record": {"model": "m", "fingerprints": {"test": "fp"}}}
        store.add_trial(row, None, {"predictions": preds, "scores": {"exact_match": em, "rouge_l": em}},
                        ("fp", {"targets": refs, "inputs": [f"question {i}" for i in range(30)]}))
    rows = store.trials("g")
    page = explore(store, rows, Query(trials=["a-key", "b-key"], filter="wrong_any", per_page=100))
    assert page.generation and [r["index"] for r in page.rows] == [i for i in range(30) if i % 3 == 0 or i % 5 == 0]
    first = page.rows[0]
    assert first["truth"] == "answer 0" and first["input"] == "question 0"
    assert [c["prediction"] for c in first["cells"]] == ["wrong", "other"]
    assert first["cells"][0]["scores"] == {"exact_match": 0.0, "rouge_l": 0.0} and not first["cells"][0]["correct"]
    page = explore(store, rows, Query(trials=["a-key", "b-key"], baseline="a-key", per_page=100))
    assert page.versus["b-key-0000"]["gains"] == sum(1 for i in range(30) if i % 3 == 0 and i % 5 != 0)
