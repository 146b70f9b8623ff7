"""`tunebench ui` in a real browser: Playwright driving Debian's headless Chromium against the app served by
uvicorn on loopback, over the tiny-model store of tests/test_ui.py."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import uvicorn

from tunebench.ui import create_app

from .test_ui import EVIL, _truth_and_preds, ui_store  # noqa: F401 (the module's store fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _serve(app) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("headless Chromium is needed: apt-get install chromium (the test command installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def site(ui_store, browser):  # noqa: F811
    base, server = _serve(create_app(ui_store["store"]))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = {"errors": [], "offsite": [], "dialogs": []}
    page.on("console", lambda m: problems["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems["errors"].append(str(e)))
    page.on("request", lambda r: problems["offsite"].append(r.url)
            if urlparse(r.url).netloc != urlparse(base).netloc and not r.url.startswith("data:") else None)
    page.on("dialog", lambda d: (problems["dialogs"].append(d.message), d.dismiss()))
    yield base, page, problems
    page.close()
    server.should_exit = True
    assert problems["errors"] == [], problems["errors"]
    assert problems["offsite"] == [], problems["offsite"]  # nothing leaves the machine
    assert problems["dialogs"] == []  # no script from the store ever ran


def _indices(page) -> list[int]:
    return [int(x) for x in page.locator("#items tr[data-index]").evaluate_all(
        "rows => rows.map(r => r.dataset.index)")]


def test_every_page_opens_without_errors(site, ui_store):  # noqa: F811
    base, page, _ = site
    key = ui_store["rows"][0]["key"][:10]
    for path, heading in [("/", "Studies"), ("/study/toy-ui", "toy-ui"), ("/study/toy-ui/items", "Test items"),
                          (f"/study/toy-ui/trial/{key}", ui_store["rows"][0]["label"]), ("/prompts", "Prompt registry"),
                          ("/prompts/builtin.label", "builtin.label")]:
        response = page.goto(base + path)
        assert response.status == 200, path
        assert heading in page.locator("h1").inner_text()
    page.goto(base + "/study/toy-ui")
    for img in page.locator("figure img").all():
        img.scroll_into_view_if_needed()
        # lazy images load after the scroll, and a figure is drawn on its first request (seconds on a busy CI
        # machine): wait for it, and fail when it never decodes to a real picture
        page.wait_for_function("i => i.complete && i.naturalWidth > 100", arg=img.element_handle(), timeout=90_000)


def test_explorer_filters_baseline_and_a_copied_link(site, ui_store):  # noqa: F811
    base, page, _ = site
    rows = ui_store["rows"]
    keys = [r["key"] for r in rows][:3]
    truth, preds = _truth_and_preds(ui_store, keys)
    labels, n = truth["labels"], len(truth["labels"])
    page.goto(base + "/study/toy-ui/items?" + "&".join(f"trial={k[:10]}" for k in keys) + "&per_page=500")
    expected = {
        "all": list(range(n)),
        "wrong_any": [i for i in range(n) if any(preds[k][i] != labels[i] for k in keys)],
        "wrong_all": [i for i in range(n) if all(preds[k][i] != labels[i] for k in keys)],
        "disagree": [i for i in range(n) if len({preds[k][i] for k in keys}) > 1],
    }
    for flt, want in expected.items():
        page.select_option("#f-filter", flt)
        page.click("button[type=submit]")
        page.wait_for_load_state("load")
        assert _indices(page) == want, flt
    page.select_option("#f-filter", "all")
    page.select_option("#f-true", "positive")
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    assert _indices(page) == [i for i in range(n) if labels[i] == 1]
    page.select_option("#f-true", "")
    page.select_option("#f-baseline", keys[0][:10])
    page.check("#f-diff")
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    for k in keys[1:]:
        row = page.locator(f'#versus tr[data-key="{k}"]')
        gains = sum(preds[k][i] == labels[i] != preds[keys[0]][i] for i in range(n))
        losses = sum(preds[keys[0]][i] == labels[i] != preds[k][i] for i in range(n))
        assert row.locator(".gain").inner_text() == f"+{gains}" and row.locator(".loss").inner_text() == f"−{losses}"
    shown, link = _indices(page), page.url
    assert shown == [i for i in range(n) if any(preds[k][i] != preds[keys[0]][i] for k in keys[1:])]
    page.goto(base + "/")
    page.goto(link)  # a copied link reproduces the view
    assert _indices(page) == shown and page.locator("#f-diff").is_checked()
    assert page.locator("#f-baseline").input_value() == keys[0][:10]
    if os.environ.get("TUNEBENCH_SCREENSHOTS"):  # the README's picture of the explorer
        page.goto(base + "/study/toy-ui/items?" + "&".join(f"trial={k[:10]}" for k in keys)
                  + "&filter=wrong_any&sort=confidence&per_page=12")
        page.set_viewport_size({"width": 1280, "height": 820})
        Path(os.environ["TUNEBENCH_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["TUNEBENCH_SCREENSHOTS"]) / "ui-explorer.png"))


def test_a_constraint_recomputes_the_verdict_in_place(site):
    base, page, _ = site
    page.goto(base + "/study/toy-ui")
    before = page.locator("#verdict .verdict").inner_text()
    page.fill("#c-quality", "1.01")
    page.click("form[data-live] button[type=submit]")
    page.wait_for_function("() => document.querySelector('#verdict').innerText.toLowerCase().includes('none feasible')")
    assert page.locator("#verdict .verdict").inner_text() != before
    assert "min_quality=1.01" in page.url  # the form's state went into the address bar
    page.reload()
    assert "none feasible" in page.locator("#verdict").inner_text().lower()


def test_script_in_an_item_is_shown_as_text(site):
    base, page, problems = site
    page.goto(base + "/study/toy-ui/items?q=great+movie")
    assert EVIL in page.locator("#items").inner_text()
    assert page.locator("#items script").count() == 0
    assert problems["dialogs"] == []


def test_off_loopback_the_browser_must_sign_in(ui_store, browser):  # noqa: F811
    key = "ui-test-key-0123456789abcdef"
    base, server = _serve(create_app(ui_store["store"], api_keys={key}, allowed_hosts=["127.0.0.1"]))
    page = browser.new_page()
    try:
        response = page.goto(base + "/study/toy-ui")
        assert response.status == 401 and page.locator("#key").count() == 1
        page.fill("#key", "wrong")
        page.click("button[type=submit]")
        assert "unknown key" in page.locator(".error").inner_text()
        page.fill("#key", key)
        page.click("button[type=submit]")
        page.wait_for_load_state("load")
        assert page.url == base + "/study/toy-ui" and "toy-ui" in page.locator("h1").inner_text()
        cookie = next(c for c in page.context.cookies() if c["name"] == "tunebench_ui")
        assert cookie["httpOnly"] and cookie["value"] != key
    finally:
        page.close()
        server.should_exit = True
