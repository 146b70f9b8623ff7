"""``tunebench ui``: a read-only web app over a results store (FastAPI + server-rendered Jinja2).

Pages: studies (live while runs write), a study (recommendation with a constraints form, leaderboard, figures,
break-even, consistency: the report's own analysis and partial templates), the item explorer, a trial, the prompt
registry. No route writes the store. Every value from the store is autoescaped; the Content-Security-Policy only
lets the app's own script run, so even an unescaped ``<script>`` would not. Assets are served from the package:
nothing is fetched from elsewhere.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import logging
import shlex
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import report
from ..analysis.evidence import Evidence, analyze
from ..analysis.recommend import Constraints, recommend
from ..errors import TunebenchError
from ..evaluation.judge import trust_warnings
from ..store import Store
from ..store.prompts import PromptRegistry
from ..version import __version__
from .explorer import FILTERS, SORTS, Query, explore

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COOKIE = "tunebench_ui"
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def session_token(key: str) -> str:
    """The cookie a key earns at the login form (derived from the key, not the key itself)."""
    return hmac.new(key.encode(), b"tunebench-ui-session", hashlib.sha256).hexdigest()


class _Evidence:
    """Analyses cached per study until its trials change (a run committing a trial invalidates it)."""

    def __init__(self, store: Store):
        self.store, self.lock, self.cache = store, threading.Lock(), {}

    def get(self, study: str) -> tuple[Evidence, list[dict]]:
        rows = self.store.trials(study, self.store.current_keys(study))
        stamp = (len(rows), max((r["finished_at"] for r in rows), default=0.0))
        with self.lock:
            hit = self.cache.get(study)
            if hit and hit[0] == stamp:
                return hit[1], rows
        ev = analyze(self.store, study)
        with self.lock:
            self.cache[study] = (stamp, ev, {})
        return ev, rows

    def figures(self, study: str) -> dict[str, bytes]:
        ev, _ = self.get(study)
        with self.lock:
            figs = self.cache[study][2]
        if not figs:
            figs.update(report.figures(report.build(ev, recommend(ev))))
        return figs


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(HERE / "templates"),
                                                         report.TEMPLATES]),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    report.add_filters(env)
    env.globals.update(version=__version__, FILTERS=FILTERS, SORTS=SORTS, urlencode=urlencode)
    return env


def _constraints(params) -> tuple[Constraints, dict[str, str]]:
    """Constraints from the form's query parameters; a value that is not a number is reported, not guessed."""
    values, errors = {}, {}
    for f in fields(Constraints):
        raw = params.get(f.name, "").strip()
        if f.name == "changes_often":
            values[f.name] = raw in ("1", "on", "true")
        elif raw:
            try:
                values[f.name] = float(raw.replace(",", ""))
                if values[f.name] < 0 or values[f.name] != values[f.name]:
                    raise ValueError
            except ValueError:
                errors[f.name] = f"'{raw}' is not a non-negative number"
    return Constraints(**values), errors


def create_app(store: Store, *, api_keys: set[str] | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The UI over ``store``. ``api_keys`` (None: no auth, loopback only) are the bearer keys of ``serve``;
    ``allowed_hosts`` are the Host header values accepted (DNS-rebinding guard)."""
    app = FastAPI(title="tunebench ui", docs_url=None, redoc_url=None, openapi_url=None)
    env, evidence = _env(), _Evidence(store)
    tokens = {session_token(k): k for k in api_keys or ()}
    hosts = [h.lower() for h in allowed_hosts or ["127.0.0.1", "localhost", "[::1]"]]

    def page(request: Request, template: str, status: int = 200, **ctx) -> HTMLResponse:
        html = env.get_template(template).render(request=request, store=store.display, **ctx)
        return HTMLResponse(html, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if "*" not in hosts and name not in hosts:
            return Response("unknown Host header (start tunebench ui with --allowed-host NAME)", status_code=400)
        if api_keys is not None and not request.url.path.startswith(("/static/", "/login", "/health")):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            cookie = request.cookies.get(COOKIE, "")
            ok = (scheme.lower() == "bearer" and any(hmac.compare_digest(token, k) for k in api_keys)) or \
                any(hmac.compare_digest(cookie, t) for t in tokens)
            if not ok:
                return page(request, "login.html.j2", 401, next=str(request.url.path), error=None)
        response = await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})
        return response

    @app.exception_handler(TunebenchError)
    async def _known(request: Request, exc: TunebenchError):
        return page(request, "error.html.j2", 404, message=str(exc))

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/"):
        return page(request, "login.html.j2", next=next, error=None)

    @app.post("/login")
    async def login(request: Request):
        body = await request.body()
        form = parse_qs(body[:4096].decode("utf-8", "replace")) if len(body) <= 4096 else {}
        key, target = (form.get("key") or [""])[0], (form.get("next") or ["/"])[0]
        match = next((k for k in api_keys or () if hmac.compare_digest(key, k)), None)
        if api_keys is not None and match is None:
            return page(request, "login.html.j2", 401, next=target, error="unknown key")
        target = target if target.startswith("/") and not target.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        if match is not None:
            response.set_cookie(COOKIE, session_token(match), httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    def studies_view() -> list[dict]:
        out = []
        for s in store.studies():
            try:
                keys = store.current_keys(s["name"])
            except TunebenchError:
                continue
            running = [c for c in store.claims(s["name"]) if c["key"] in keys and not c["expired"]]
            failed = [f for f in store.failures(s["name"]) if f["key"] in keys]
            done = len(store.done_keys(s["name"]) & keys)
            entry = {**s, "planned": len(keys), "done": done, "running": len(running), "failed": len(failed),
                     "status": "running" if running else "failed" if failed else
                     "finished" if done == len(keys) else "incomplete", "best": None, "verdict": None}
            if done:
                ev, _ = evidence.get(s["name"])
                rec = recommend(ev)
                entry.update(best=ev.best.label if ev.best else None, verdict=rec["verdict"],
                             recommended=rec.get("recommended"), metric=ev.metric)
            out.append(entry)
        return out

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        return page(request, "studies.html.j2", studies=studies_view())

    @app.get("/fragments/studies", response_class=HTMLResponse)
    def studies_fragment(request: Request):
        return page(request, "_studies_table.html.j2", studies=studies_view())

    def study_context(name: str, params) -> dict[str, Any]:
        ev, rows = evidence.get(name)
        constraints, errors = _constraints(params)
        rec = recommend(ev, constraints)
        doc = report.build(ev, rec)
        return {"name": name, "a": doc["analysis"], "rec": rec, "rows": rows, "errors": errors,
                "kinds": report.perturbation_kinds(doc),
                "form": {f.name: params.get(f.name, "") for f in fields(Constraints)},
                "cur": doc["analysis"]["cost_model"].get("currency", "$"), "titles": report.FIGURES}

    @app.get("/study/{name}", response_class=HTMLResponse)
    def study(request: Request, name: str):
        ctx = study_context(name, request.query_params)
        return page(request, "study.html.j2", **ctx, figures=list(evidence.figures(name)))

    @app.get("/study/{name}/verdict", response_class=HTMLResponse)
    def verdict(request: Request, name: str):
        return page(request, "_verdict.html.j2", **study_context(name, request.query_params))

    @app.get("/study/{name}/figure/{kind}.png")
    def figure(name: str, kind: str):
        figs = evidence.figures(name)
        if kind not in figs:
            return Response(status_code=404)
        return Response(figs[kind], media_type="image/png")

    @app.get("/study/{name}/items", response_class=HTMLResponse)
    def items(request: Request, name: str):
        p = request.query_params
        query = Query(trials=p.getlist("trial"), filter=p.get("filter", "all"), true=p.get("true", ""),
                      pred=p.get("pred", ""), q=p.get("q", "")[:200], sort=p.get("sort", "index"),
                      baseline=p.get("baseline", ""), diff=p.get("diff") in ("1", "on"),
                      page=_int(p.get("page"), 1), per_page=_int(p.get("per_page"), 50))
        _, rows = evidence.get(name)
        result = explore(store, rows, query)
        state = {k: v for k, v in asdict(query).items() if k not in ("trials", "page") and v not in ("", False)}
        state_items = [("trial", t["key"][:10]) for t in result.trials] + list(state.items())
        return page(request, "explorer.html.j2", name=name, query=query, result=result, rows=rows,
                    state=state_items)

    @app.get("/study/{name}/trial/{key}", response_class=HTMLResponse)
    def trial(request: Request, name: str, key: str):
        rows = store.trials(name)
        hits = [r for r in rows if r["key"].startswith(key)]
        if len(hits) != 1:
            raise _NotFound(f"study '{name}' has no trial {key!r}" if not hits else f"{key!r} names several trials")
        row = hits[0]
        short = row["key"][:8]
        where = "" if store.location == "tunebench-runs" else f" --store {shlex.quote(store.display)}"
        commands = {"serve": f"tunebench serve {shlex.quote(name)} --trial {short}{where}",
                    "export": f"tunebench export {shlex.quote(name)} --trial {short} --format hf{where}"}
        judge = row["metrics"].get("judge")
        return page(request, "trial.html.j2", name=name, row=row, commands=commands,
                    latency=row["cost"].get("latency_ms_samples") or [],
                    warnings=trust_warnings(judge) if isinstance(judge, dict) else [],
                    pairwise=[{k: v for k, v in c.items() if k != "items_detail"} for c in store.pairwise(name)
                              if row["key"] in (c["a"], c["b"])])

    @app.get("/prompts", response_class=HTMLResponse)
    def prompts(request: Request):
        return page(request, "prompts.html.j2", summary=PromptRegistry(store).summary())

    @app.get("/prompts/{name:path}", response_class=HTMLResponse)
    def prompt(request: Request, name: str, a: str = "", b: str = ""):
        reg = PromptRegistry(store)
        versions = reg.versions(name)
        if not versions:
            raise _NotFound(f"no prompt named '{name}'")
        by = {str(v.version): v for v in versions}
        va, vb = by.get(a) or (versions[-2] if len(versions) > 1 else versions[0]), by.get(b) or versions[-1]
        diff = list(difflib.unified_diff(va.template.splitlines(), vb.template.splitlines(), f"{name}@{va.version}",
                                         f"{name}@{vb.version}", lineterm=""))
        return page(request, "prompt.html.j2", name=name, versions=versions, va=va, vb=vb, diff=diff,
                    uses=reg.uses(name))

    return app


class _NotFound(TunebenchError):
    """A page for something the store does not have."""


def _int(raw: str | None, default: int) -> int:
    try:
        return int(raw) if raw else default
    except ValueError:
        return default
