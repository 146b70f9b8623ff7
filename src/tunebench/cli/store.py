"""``tunebench store``: moving trials between stores (``copy``) and what runs hold now (``status``)."""

from __future__ import annotations

from datetime import datetime
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..config import DEFAULT_STORE
from ..errors import TunebenchError
from ..progress import Reporter
from ..store import Store
from ..store.copy import copy_store
from .common import JsonOpt, err, fail, out, print_json, setup_logging

store_app = typer.Typer(help="Stores: copy a study's trials between stores (SQLite directory, PostgreSQL), see the "
                        "claims of running drivers and failed trials.", no_args_is_help=True)


class _Bar(Reporter):
    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def start(self, label, total):
        self.task = self.progress.add_task(label, total=total)

    def advance(self, n=1):
        self.progress.advance(self.task, n)


@store_app.command("copy")
def copy_cmd(src: str = typer.Argument(..., help="Source store: a directory or postgresql://user@host/db."),
             dst: str = typer.Argument(..., help="Destination store (created when it is a new directory)."),
             study: Optional[List[str]] = typer.Option(None, "--study", help="Only this study (repeatable; default: "
                                                       "every study of SRC)."),
             artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Artifact root of DST (a shared path "
                                                     "or s3://...; a new PostgreSQL store needs one)."),
             as_json: bool = JsonOpt) -> None:
    """Copy trials (rows, per-item results, artifacts) and the prompt registry from SRC to DST. Trials DST already
    has are skipped, so copying again is safe."""
    setup_logging(False)
    try:
        source = Store(src, create=False)
        target = Store(dst, artifacts=artifacts)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                      transient=True) as progress:
            result = copy_store(source, target, study or None, reporter=_Bar(progress))
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json({"from": source.display, "to": target.display, **result.to_dict()})
        return
    for name, c in result.studies.items():
        out.print(f"{name}: {c['copied']} trial(s) copied, {c['skipped']} already in {target.display}",
                  highlight=False)
    out.print(f"prompt registry: {result.prompts_added} version(s) added", highlight=False)
    if result.renumbered:
        out.print(f"[yellow]note:[/] {', '.join(result.renumbered)} are numbered differently in {target.display} "
                  "(it had versions of its own): `prompt: NAME@N` there may name another text; use NAME@#HASH",
                  highlight=False)


@store_app.command("status")
def status_cmd(store: Optional[str] = typer.Option(None, "--store", help=f"The store (default ./{DEFAULT_STORE})."),
               study: Optional[str] = typer.Option(None, "--study", help="Only this study."),
               as_json: bool = JsonOpt) -> None:
    """Trials running now (claims: owner, heartbeat, expiry) and trials whose last attempt failed."""
    setup_logging(False)
    try:
        st = Store(store or DEFAULT_STORE, create=False)
        claims = st.claims(study)
        names = [study] if study else [s["name"] for s in st.studies()]
        failures = [f for n in names for f in st.failures(n)]
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json({"store": st.display, "claims": claims, "failures": failures})
        return
    table = Table(title=f"running in {st.display}", title_justify="left")
    for col in ("study", "trial", "owner", "heartbeat", "state"):
        table.add_column(col)
    for c in claims:
        table.add_row(c["study"], c["key"][:8], c["owner"], _when(c["heartbeat"]),
                      "[red]expired[/]" if c["expired"] else "live")
    out.print(table if claims else f"no trial is running in {st.display}")
    for f in failures:
        out.print(f"[red]failed[/] {f['study']} {f['label']} ({f['key'][:8]}, {_when(f['at'])}): {f['reason']}",
                  highlight=False)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
