"""``copy_store``: a study's trials (rows, per-item results, test truth, artifacts) and the prompt registry moved
from one store to another, for example from a laptop's SQLite directory to a team's PostgreSQL.

The copy is a writer like any driver: each trial is claimed in the destination before it is written, so a run
going on there at the same time is never doubled, and a trial the destination already has is skipped (a second
copy is a no-op). Prompt versions are registered in the source's order; a name whose numbers differ in the
destination (it had versions of its own) is reported, since ``prompt: NAME@N`` there names another text.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import NULL_REPORTER, Reporter
from . import db
from .prompts import PromptRegistry, register_in
from .results import Store, new_owner

log = logging.getLogger(__name__)


@dataclass
class CopyResult:
    """What a copy did, per study: trials copied and skipped, prompt versions added, names renumbered."""

    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    prompts_added: int = 0
    renumbered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"studies": self.studies, "prompts_added": self.prompts_added, "renumbered": self.renumbered}


def copy_store(src: Store, dst: Store, studies: list[str] | None = None,
               reporter: Reporter = NULL_REPORTER) -> CopyResult:
    """Copy ``studies`` (default: every study of ``src``) into ``dst``."""
    names = studies or [s["name"] for s in src.studies()]
    for name in names:
        src.study_config(name)  # an unknown name fails here, before anything is written
    dst.require_artifacts()
    result = CopyResult()
    _copy_prompts(src, dst, result)
    owner = new_owner()
    for name in names:
        result.studies[name] = _copy_study(src, dst, name, owner, reporter)
    return result


def _copy_prompts(src: Store, dst: Store, result: CopyResult) -> None:
    reg, target = PromptRegistry(src), PromptRegistry(dst)
    for name in reg.names():
        before = {v.hash: v.version for v in target.versions(name)}
        for v in reg.versions(name):
            if v.hash in before:
                if before[v.hash] != v.version and name not in result.renumbered:
                    result.renumbered.append(name)
                continue
            got = db.write(dst.engine, lambda con, v=v: register_in(con, v.name, v.template, v.kind, v.source,
                                                                     v.created))
            result.prompts_added += 1
            if got.version != v.version and name not in result.renumbered:
                result.renumbered.append(name)
    if result.renumbered:
        log.warning("prompt names numbered differently in %s: %s", dst.display, ", ".join(result.renumbered))


def _copy_study(src: Store, dst: Store, name: str, owner: str, reporter: Reporter) -> dict[str, int]:
    doc = src.study_config(name)
    mine = next((s for s in src.studies() if s["name"] == name), {})
    theirs = next((s for s in dst.studies() if s["name"] == name), None)
    if theirs is None or theirs["updated_at"] < mine.get("updated_at", 0):  # the newer plan wins
        dst.save_study(name, doc["config"], mine.get("source"), doc["keys"], updated_at=mine.get("updated_at"))
    rows = src.trials(name)
    done = dst.done_keys(name)
    counts = {"copied": 0, "skipped": 0}
    reporter.start(f"copying {name}", len(rows))
    for row in rows:
        reporter.advance()
        if row["key"] in done or not dst.claim(name, row["key"], owner, ttl=600):
            counts["skipped"] += 1
            continue
        try:
            staged = _stage_artifact(src, dst, row, owner)
            fp = (row["record"].get("fingerprints") or {}).get("test")
            truth = src.test_set(fp) if fp else None
            items = src.items([row["key"]]).get(row["key"])
            copied = dst.add_trial({k: v for k, v in row.items() if k not in ("artifact", "finished_at")}, staged,
                                   items, (fp, truth) if truth is not None else None, owner=owner,
                                   finished_at=row["finished_at"])
        finally:
            dst.release(row["key"], owner)
        counts["copied" if copied else "skipped"] += 1
    reporter.stop()
    have = {c["key"] for c in dst.pairwise(name)}
    for c in src.pairwise(name):  # the judge's pairwise comparisons go with the trials they compare
        if c["key"] not in have:
            dst.add_pairwise(name, c["key"], c["a"], c["b"],
                             {k: v for k, v in c.items() if k not in ("key", "a", "b", "at")})
    log.info("study %s: %d trial(s) copied, %d already there", name, counts["copied"], counts["skipped"])
    return counts


def _stage_artifact(src: Store, dst: Store, row: dict, owner: str) -> str | None:
    if src.artifact_location(row) is None:
        return None
    local = src.artifact_path(row)
    staged = dst.staging(row["key"], owner)
    if dst.artifacts.is_local:
        shutil.copytree(local, staged)
    else:
        dst.artifacts.upload(Path(local), staged)
    return staged
