"""The prompt registry: every template a trial used, versioned by content under a name, in the results store.

A version is the exact template text: its id is the sha256 of the text (12 hex characters shown), its number
is 1 + the highest number under the name. Registering the same text under the same name again returns the
existing version, so versions only grow when the content changes. ``prompt_uses`` links each trial to the
versions it used; that is how ``tunebench prompts log`` shows the scores of each version.

Names: ``[A-Za-z0-9_.-/]+``. Templates are registered automatically when a trial is stored
(:func:`record_trial`, in the trial's transaction) under

- the name a study referenced (``prompt: support-intent@3``),
- ``builtin.<task_type>`` / ``builtin.<task_type>.cot`` for tunebench's built-in templates
  (``builtin.label`` for the default encoder label prompt ``{{ label }}``),
- ``<study>.<strategy>`` for a template written in the study (or produced by a search), and
  ``<study>.<strategy>.label`` for encoder zero-shot label templates.

References: ``NAME`` or ``NAME@latest`` (the highest version), ``NAME@3``, ``NAME@#1a2b3c`` (a hash prefix).

Example:
    >>> reg = PromptRegistry(Store("tunebench-runs"))  # doctest: +SKIP
    >>> reg.register("support-intent", "Classify: {{ input }}\\nAnswer:").ref
    'support-intent@1'
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..config.metrics import headline_metrics
from ..errors import ConfigError, StoreError
from ..prompts import check_name, default_template, parse_ref
from ..version import __version__
from . import db

if TYPE_CHECKING:
    from .results import Store

log = logging.getLogger(__name__)

KINDS = ("prompt", "label", "instruction", "rubric")
SHORT = 12
DEFAULT_LABEL_TEMPLATE = "{{ label }}"


@dataclass(frozen=True)
class PromptVersion:
    """One registered version of a named template."""

    name: str
    version: int
    hash: str
    kind: str
    template: str
    created: float
    source: str | None = None

    @property
    def ref(self) -> str:
        """``name@version``: what a study's ``prompt:`` takes."""
        return f"{self.name}@{self.version}"

    @property
    def short(self) -> str:
        """The first 12 hex characters of the content hash."""
        return self.hash[:SHORT]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref}


def content_hash(template: str) -> str:
    """sha256 (hex) of the exact template text: one changed character is a new version."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _version(row) -> PromptVersion:
    return PromptVersion(*tuple(row))


_COLS = "name, version, hash, kind, template, created, source"


def register_in(con: Connection, name: str, template: str, kind: str = "prompt", source: str | None = None,
                created: float | None = None) -> PromptVersion:
    """Register ``template`` under ``name`` inside the caller's transaction (see :meth:`PromptRegistry.register`)."""
    check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"prompt kind {kind!r}: one of {', '.join(KINDS)}")
    digest = content_hash(template)
    row = con.execute(text(f"SELECT {_COLS} FROM prompts WHERE name = :n AND hash = :h"),
                      {"n": name, "h": digest}).first()
    if row is not None:
        return _version(row)
    version = con.execute(text("SELECT COALESCE(MAX(version), 0) + 1 FROM prompts WHERE name = :n"),
                          {"n": name}).scalar()
    pv = PromptVersion(name, int(version), digest, kind, template, created if created is not None else time.time(),
                       source)
    con.execute(text(f"INSERT INTO prompts({_COLS}) VALUES (:name, :version, :hash, :kind, :template, :created, "
                     ":source)"), asdict(pv))
    log.info("registered prompt %s (#%s, %s)", pv.ref, pv.short, source or "no source")
    return pv


def _builtin_names() -> dict[str, str]:
    out = {}
    for task_type in ("classification", "generation"):
        out[default_template(task_type)] = f"builtin.{task_type}"
        out[default_template(task_type, reasoning=True)] = f"builtin.{task_type}.cot"
    return out


def templates_of(row: dict) -> list[tuple[str, str, str, str]]:
    """``(name, template, kind, source)`` of every template a stored trial used: its own (below) and its judge's
    rubric (kind ``rubric``: under the name the study referenced, ``builtin.judge`` or ``<study>.judge``)."""
    out = _own_templates(row)
    judge = (row.get("metrics") or {}).get("judge")
    rubric = judge.get("rubric") if isinstance(judge, dict) else None
    if isinstance(rubric, dict) and isinstance(rubric.get("template"), str) and rubric.get("name"):
        source = f"tunebench {__version__}" if rubric["name"] == "builtin.judge" else \
            f"study {row['study']}: judge"
        out.append((rubric["name"], rubric["template"], "rubric", source))
    return out


def _own_templates(row: dict) -> list[tuple[str, str, str, str]]:
    """``(name, template, kind, source)`` of the templates of a stored trial's predictor.

    A causal or remote predictor's prompt template (from ``record.prompt``) is kind ``prompt``; an encoder
    zero-shot trial's label templates are kind ``label``. The task instruction is not registered: it is a task
    field the template shows (``{{ instruction }}``), stored with the study config, not a template.
    """
    params = row.get("params") or {}
    study, strategy = row["study"], row["strategy"]
    where = f"study {study}: {row.get('label', strategy)}"
    info = (row.get("record") or {}).get("prompt")
    if info and isinstance(info.get("template"), str):
        text = info["template"]
        # a hybrid's own `prompt` names its prompting strategy; a registry reference sits in its prompt_params
        own = (params.get("prompt_params") or {}) if "prompt_params" in params else params
        ref = own.get("prompt")
        if ref and own.get("template") != text:  # a prompt search chose another template: not the reference's
            ref = None
        builtin = _builtin_names().get(text)
        out = []
        if ref:
            out.append((parse_ref(ref)[0], text, "prompt", where))
        elif builtin:
            out.append((builtin, text, "prompt", f"tunebench {__version__}"))
        else:
            out.append((f"{study}.{strategy}", text, "prompt", where))
        task_instruction = (((row.get("record") or {}).get("config") or {}).get("task") or {}).get("instruction")
        if info.get("instruction") and info["instruction"] != task_instruction:  # searched or proposed
            out.append((f"{study}.{strategy}.instruction", info["instruction"], "instruction", where))
        return out
    if info and isinstance(info.get("label_template"), str):  # an encoder prompt search's chosen label prompt
        return [(f"{study}.{strategy}.label", info["label_template"], "label", where)]
    if info is None and params.get("label_templates"):  # encoder zero-shot: the label prompts were embedded
        out = []
        for t in params["label_templates"]:
            if t == DEFAULT_LABEL_TEMPLATE:
                    out.append(("builtin.label", t, "label", f"tunebench {__version__}"))
            else:
                out.append((f"{study}.{strategy}.label", t, "label", where))
        return out
    return []


def record_trial(con: Connection, row: dict, created: float | None = None) -> list[PromptVersion]:
    """Register the templates of a trial being stored and link the trial to their versions (caller's transaction)."""
    used = []
    for name, template, kind, source in templates_of(row):
        pv = register_in(con, name, template, kind, source, created)
        con.execute(text("INSERT INTO prompt_uses(trial_key, name, version) VALUES (:k, :n, :v) "
                         "ON CONFLICT DO NOTHING"), {"k": row["key"], "n": pv.name, "v": pv.version})
        used.append(pv)
    return used


def backfill(store: Store) -> int:
    """Register the templates of trials stored before the registry existed; returns how many trials were linked.

    Only trials that used a template and have no ``prompt_uses`` row are read, so a second call is cheap. Their
    versions are numbered in the order the trials finished, dated when the trial finished.
    """
    def go(con: Connection) -> int:
        rows = con.execute(text(
            "SELECT key, study, strategy, label, params, record, finished_at FROM trials t "
            "WHERE NOT EXISTS (SELECT 1 FROM prompt_uses u WHERE u.trial_key = t.key) ORDER BY finished_at")).mappings()
        linked = 0
        for r in list(rows):
            d = {**dict(r), "params": json.loads(r["params"]), "record": json.loads(r["record"])}
            if templates_of(d) and record_trial(con, d, created=r["finished_at"]):
                linked += 1
        return linked

    n = db.write(store.engine, go)
    if n:
        log.info("prompt registry: linked %d earlier trial(s) to their templates", n)
    return n


def score_of(metrics: dict) -> tuple[str | None, float | None]:
    """The headline test metric of a trial (accuracy, or the first generation metric it has) and its value."""
    keys = headline_metrics(metrics)
    return (keys[0], metrics[keys[0]]) if keys else (None, None)


class PromptRegistry:
    """Named, versioned templates in a results store.

    Example:
        >>> reg = PromptRegistry(store)  # doctest: +SKIP
        >>> reg.register("support-intent", text).version, reg.get("support-intent@latest").hash[:12]
    """

    def __init__(self, store: Store):
        self.store = store

    def register(self, name: str, template: str, kind: str = "prompt", source: str | None = None) -> PromptVersion:
        """Register ``template`` under ``name``: the existing version when the text is already there, else a new
        version (the highest + 1; the first is 1)."""
        try:  # two writers numbering one name at once: the loser's transaction is retried (see db.write)
            return db.write(self.store.engine, lambda con: register_in(con, name, template, kind, source))
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.store.display}: cannot register prompt {name!r}: {exc}") from None

    def names(self) -> list[str]:
        return [r["name"] for r in db.read(self.store.engine, "SELECT DISTINCT name FROM prompts ORDER BY name")]

    def versions(self, name: str) -> list[PromptVersion]:
        """Every version under ``name``, oldest first (empty when the name is unknown)."""
        rows = db.read(self.store.engine, f"SELECT {_COLS} FROM prompts WHERE name = :n ORDER BY version", n=name)
        return [PromptVersion(**r) for r in rows]

    def get(self, ref: str) -> PromptVersion:
        """The version a reference names: ``NAME``, ``NAME@latest``, ``NAME@3`` or ``NAME@#1a2b3c``."""
        name, selector = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise StoreError(f"no prompt named '{name}' in {self.store.display} (known: {known}); "
                             "`tunebench prompts list` shows them, `tunebench prompts import FILE` adds one")
        listed = ", ".join(f"{v.version} (#{v.short})" for v in versions)
        if selector == "latest":
            return versions[-1]
        if selector.startswith("#"):
            hits = [v for v in versions if v.hash.startswith(selector[1:].lower())]
            if len(hits) == 1:
                return hits[0]
            what = "no version" if not hits else f"{len(hits)} versions"
            raise StoreError(f"prompt '{name}': {what} with a hash starting {selector[1:]} (versions: {listed})")
        for v in versions:
            if v.version == int(selector):
                return v
        raise StoreError(f"prompt '{name}' has no version {selector} (versions: {listed})")

    def uses(self, name: str, version: int | None = None) -> list[dict]:
        """The trials that used ``name`` (one version or all): study, trial key, label, seed, train size, the
        headline test metric and its value, and the dev scores where the trial selected on dev."""
        sql = ("SELECT u.version, t.key, t.study, t.strategy, t.label, t.seed, t.train_size, t.metrics, "
               "t.finished_at FROM prompt_uses u JOIN trials t ON t.key = u.trial_key WHERE u.name = :n")
        args: dict[str, Any] = {"n": name}
        if version is not None:
            sql += " AND u.version = :v"
            args["v"] = version
        rows = db.read(self.store.engine, sql + " ORDER BY u.version, t.finished_at", **args)
        out = []
        for r in rows:
            metrics = json.loads(r["metrics"])
            metric, score = score_of(metrics)
            out.append({"version": r["version"], "key": r["key"], "study": r["study"], "strategy": r["strategy"],
                        "label": r["label"], "seed": r["seed"], "train_size": r["train_size"], "metric": metric,
                        "score": score, "dev": {k: v for k, v in metrics.items() if k.startswith("dev_")},
                        "finished_at": r["finished_at"]})
        return out

    def summary(self) -> list[dict]:
        """One entry per name: latest version, number of versions, kinds, trials that used it, best score."""
        rows = db.read(self.store.engine, "SELECT name, MAX(version) AS latest, COUNT(*) AS versions, "
                       "MAX(created) AS updated FROM prompts GROUP BY name ORDER BY name")
        kinds: dict[str, set[str]] = {}
        for k in db.read(self.store.engine, "SELECT DISTINCT name, kind FROM prompts"):
            kinds.setdefault(k["name"], set()).add(k["kind"])
        out = []
        for r in rows:
            uses = self.uses(r["name"])
            scored = [u for u in uses if u["score"] is not None]
            best = max(scored, key=lambda u: u["score"], default=None)
            out.append({"name": r["name"], "latest": r["latest"], "versions": r["versions"],
                        "kinds": sorted(kinds.get(r["name"], ())), "trials": len({u["key"] for u in uses}),
                        "updated": r["updated"],
                        "best": None if best is None else {k: best[k] for k in ("version", "key", "study", "label",
                                                                                 "metric", "score")}})
        return out
