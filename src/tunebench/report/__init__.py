"""``tunebench report``: one self-contained HTML file (plots embedded, no network), Markdown and JSON.

Built from the store alone: the analysis (:mod:`tunebench.analysis`) and the recommendation
(:mod:`tunebench.recommend`), rendered through a Jinja2 template with autoescaping (prompts and labels are user
text).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time

from pathlib import Path

import jinja2

from ..version import __version__
from ..analysis.evidence import Evidence
from ..errors import StoreError

log = logging.getLogger(__name__)

FIGURES = {
    "leaderboard": "Leaderboard with 95% intervals",
    "learning_curves": "Learning curves",
    "distill_curves": "Distillation: student quality against teacher labels bought",
    "pareto": "Quality versus cost",
    "latency": "Latency distribution",
    "confusion": "Confusion matrices",
    "groups": "Results by group",
    "break_even": "Cost over the horizon by request volume",
    "cascade": "Cascade curves on test",
}


def _clean(o):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def build(evidence: Evidence, recommendation: dict) -> dict:
    """The report's document: analysis, recommendation and provenance (what ``report.json`` holds)."""
    return _clean({"tunebench": __version__, "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "analysis": evidence.to_dict(), "recommendation": recommendation})


def figures(doc: dict) -> dict[str, bytes]:
    """PNG bytes per figure; a figure the data cannot support (one train size, no labels) is left out."""
    from . import plots  # heavy: matplotlib loads only when figures are drawn

    a = doc["analysis"]
    out = {"leaderboard": plots.leaderboard(a), "pareto": plots.pareto(a), "break_even": plots.break_even(a)}
    if any(len(pts) > 1 for pts in a["curves"].values()):
        out["learning_curves"] = plots.learning_curves(a)
    if a.get("distill_curves"):
        out["distill_curves"] = plots.distill_curves(a)
    if any(s["latency_ms_samples"] for s in a["strategies"]):
        out["latency"] = plots.latency(a)
    cm = plots.confusion(a)
    if cm is not None:
        out["confusion"] = cm
    curves = plots.cascade(a)
    if curves is not None:
        out["cascade"] = curves
    by_group = plots.groups(a)
    if by_group is not None:
        out["groups"] = by_group
    return {k: out[k] for k in FIGURES if k in out}


TEMPLATES = jinja2.PackageLoader("tunebench", "report/templates")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=TEMPLATES, autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return add_filters(env)


def add_filters(env: jinja2.Environment) -> jinja2.Environment:
    """The number formats the report's templates use (the UI renders the same partials)."""
    env.filters["f3"] = lambda v: "–" if v is None else f"{v:.3f}"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["money"] = _money
    env.filters["num"] = lambda v: "–" if v is None else f"{v:,.0f}"
    env.filters["ci"] = lambda v: "–" if not v else f"[{v[0]:.3f}, {v[1]:.3f}]"
    env.filters["pts"] = points
    env.filters["prange"] = p_range
    return env


def points(v: float | None) -> str:
    """A change of a share in signed percentage points (``+2.5 pts``)."""
    return "–" if v is None else f"{100 * v:+.1f} pts"


def p_range(ps: tuple[float | None, float | None]) -> str:
    """A p-value, or the range of several (one per seed)."""
    lo, hi = ps
    if lo is None or hi is None:
        return "–"
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}–{hi:.3g}"


def _money(v, cur: str = "$") -> str:
    if v is None:
        return "–"
    if v != 0 and abs(v) < 0.01:
        return f"{cur}{v:.2g}"
    return f"{cur}{v:,.2f}"


def write(evidence: Evidence, recommendation: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``report.json`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{out}: cannot create the report directory: {exc}") from None
    doc = build(evidence, recommendation)
    figs = figures(doc)
    env = _env()
    context = {"doc": doc, "a": doc["analysis"], "rec": recommendation, "titles": FIGURES,
               "cur": doc["analysis"]["cost_model"].get("currency", "$"), "kinds": perturbation_kinds(doc)}
    html = env.get_template("report.html.j2").render(
        **context, figures={k: base64.b64encode(v).decode("ascii") for k, v in figs.items()})
    md = env.get_template("report.md.j2").render(**context, figures=figs)
    paths = {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}
    for kind, text in (("html", html), ("md", md), ("json", json.dumps(doc, indent=1))):
        tmp = paths[kind].with_suffix(paths[kind].suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(paths[kind])
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    for name, data in figs.items():  # the Markdown links these; the HTML embeds them
        (figdir / f"{name}.png").write_bytes(data)
    log.info("report for %s written to %s", evidence.study, out)
    return paths


def perturbation_kinds(doc: dict) -> list[str]:
    kinds: list[str] = []
    for s in doc["analysis"]["strategies"]:
        for k in s["consistency"]["perturbation"]:
            if k not in kinds:
                kinds.append(k)
    return kinds
