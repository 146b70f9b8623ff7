"""``tunebench prompts``: the prompt registry (list, show, diff, log, export, import)."""

from __future__ import annotations

import difflib
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from ..config import DEFAULT_STORE
from ..errors import TunebenchError
from ..store.prompt_files import PromptFile, export_prompts, import_prompts, open_registry
from .common import JsonOpt, fail, json_default, out, print_json, setup_logging

prompts_app = typer.Typer(help="The prompt registry: every template trials used, versioned by content, with the "
                          "trials and scores of each version.", no_args_is_help=True)
RegistryStoreOpt = typer.Option(None, "--store", help=f"Results store: a directory or postgresql://... (default: ./{DEFAULT_STORE}).")


def _registry(store: Optional[str], create: bool = False):
    return open_registry(store or Path(DEFAULT_STORE), create=create)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _score(use: dict) -> str:
    return "-" if use["score"] is None else f"{use['score']:.3f} {use['metric']}"


def _uses_table(uses: list[dict], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("study", "trial", "strategy", "seed", "train n", "test", "dev"):
        table.add_column(col, overflow="fold", justify="right" if col in ("seed", "train n") else "left")
    for u in uses:
        dev = ", ".join(f"{k[4:]} {v:.3f}" for k, v in u["dev"].items() if isinstance(v, (int, float))) or "-"
        table.add_row(u["study"], u["key"][:8], u["label"], str(u["seed"]), str(u["train_size"] or "-"), _score(u),
                      dev)
    return table


@prompts_app.command("list")
def prompts_list(store: Optional[str] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """Every registered name: latest version, number of versions, kinds, trials that used it, best test score."""
    setup_logging(False)
    try:
        reg = _registry(store)
        rows = reg.summary()
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json({"store": reg.store.display, "prompts": rows}, default=json_default)
        return
    if not rows:
        out.print(f"no prompts registered in {reg.store.display} yet: trials register the templates they use, "
                  "`tunebench prompts import FILE` adds one", highlight=False)
        return
    table = Table(title=f"prompts in {reg.store.display}", title_justify="left")
    for col in ("name", "latest", "versions", "kinds", "trials", "best (test)"):
        table.add_column(col, overflow="fold", justify="right" if col in ("latest", "versions", "trials") else "left")
    for r in rows:
        best = r["best"]
        shown = "-" if best is None else f"{_score(best)} (@{best['version']}, {best['label']})"
        table.add_row(r["name"], str(r["latest"]), str(r["versions"]), ", ".join(r["kinds"]), str(r["trials"]), shown)
    out.print(table)


@prompts_app.command("show")
def prompts_show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION, NAME@latest or NAME@#HASH."),
                 store: Optional[str] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """One version: its exact template text, hash, date, source and the trials that used it."""
    setup_logging(False)
    try:
        reg = _registry(store)
        pv = reg.get(ref)
        uses = reg.uses(pv.name, pv.version)
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json({**pv.to_dict(), "trials": uses}, default=json_default)
        return
    out.rule(f"[bold]{pv.ref}[/] #{pv.short} ({pv.kind})")
    out.print(f"created {_when(pv.created)}; source: {pv.source or '-'}; sha256 {pv.hash}", highlight=False)
    out.print(pv.template, markup=False, highlight=False)
    out.rule()
    if uses:
        out.print(_uses_table(uses, f"trials that used {pv.ref}"))
    else:
        out.print(f"no stored trial used {pv.ref}", highlight=False)


@prompts_app.command("diff")
def prompts_diff(a: str = typer.Argument(..., help="A reference, e.g. support-intent@1."),
                 b: str = typer.Argument(..., help="Another, e.g. support-intent@2 or other@3 (a bare number is a "
                                         "version of A's name)."),
                 context: int = typer.Option(3, "--context", "-U", min=0, help="Unchanged lines shown around changes."),
                 store: Optional[str] = RegistryStoreOpt) -> None:
    """Unified diff of two versions' template text."""
    setup_logging(False)
    try:
        reg = _registry(store)
        first = reg.get(a)
        second = reg.get(f"{first.name}@{b}" if b.isdigit() else b)
    except TunebenchError as exc:
        fail(exc)
    if first.hash == second.hash:
        out.print(f"{first.ref} and {second.ref} are identical (#{first.short})", highlight=False)
        return
    lines = list(difflib.unified_diff(first.template.splitlines(), second.template.splitlines(),
                                      f"{first.ref} #{first.short}", f"{second.ref} #{second.short}", n=context,
                                      lineterm=""))
    if not lines:
        out.print(f"{first.ref} and {second.ref} differ only in line endings or a final newline", highlight=False)
        return
    styles = {"+++": "bold", "---": "bold", "@@": "cyan", "+": "green", "-": "red"}
    for line in lines:
        style = next((v for k, v in styles.items() if line.startswith(k)), "")
        out.print(Text(line, style=style), soft_wrap=True)


@prompts_app.command("log")
def prompts_log(name: str = typer.Argument(..., help="A registered name."), store: Optional[str] = RegistryStoreOpt,
                as_json: bool = JsonOpt) -> None:
    """History of a name, newest first: each version's hash, date and source, with the trials that used it, their
    test score and, where they selected on dev, their dev score."""
    setup_logging(False)
    try:
        reg = _registry(store)
        reg.get(name.partition("@")[0])  # an unknown name fails with the known ones
        versions = reg.versions(name.partition("@")[0])
        uses = reg.uses(versions[0].name)
    except TunebenchError as exc:
        fail(exc)
    by_version: dict[int, list[dict]] = {}
    for u in uses:
        by_version.setdefault(u["version"], []).append(u)
    if as_json:
        print_json({"name": versions[0].name, "versions": [{**v.to_dict(), "trials": by_version.get(v.version, [])}
                                                           for v in reversed(versions)]}, default=json_default)
        return
    for v in reversed(versions):
        out.print(f"[bold yellow]{v.ref}[/] #{v.short}  {_when(v.created)}  {v.kind}  {v.source or ''}",
                  highlight=False)
        if v.version in by_version:
            out.print(_uses_table(by_version[v.version]))
        else:
            out.print("  no stored trial used this version")


def _print_written(f: PromptFile) -> None:
    if f.is_template:
        pv = f.version
        out.print(f"[green]✓[/] {pv.ref} #{pv.short} → {f.path}{' (unchanged)' if f.unchanged else ''}",
                  highlight=False)


@prompts_app.command("export")
def prompts_export(ref: Optional[str] = typer.Argument(None, help="NAME or NAME@VERSION (default version: latest)."),
                   out_dir: Path = typer.Option(Path("."), "--out", help="Directory to write into (a name with / "
                                                "becomes folders)."),
                   all_: bool = typer.Option(False, "--all", help="Export the latest version of every name."),
                   force: bool = typer.Option(False, "--force", help="Replace existing files with different content."),
                   store: Optional[str] = RegistryStoreOpt) -> None:
    """Write NAME@V.jinja (the exact template text) and NAME@V.yaml (name, version, hash, kind, source) for review
    in version control; `tunebench prompts import` reads them back."""
    setup_logging(False)
    try:
        if (ref is None) == (not all_):
            raise TunebenchError("say what to export: NAME[@VERSION] or --all (one of them)")
        reg = _registry(store)
        chosen = [reg.get(n) for n in reg.names()] if all_ else [reg.get(ref)]
        if not chosen:
            out.print("no prompts are registered in this store yet (trials register the templates they use)")
            return
        export_prompts(chosen, out_dir, force=force, written=_print_written)
    except TunebenchError as exc:
        fail(exc)


@prompts_app.command("import")
def prompts_import(files: list[Path] = typer.Argument(..., help="Template files (e.g. NAME@V.jinja from export)."),
                   name: Optional[str] = typer.Option(None, "--name", help="Register under this name (default: the "
                                                      "sidecar NAME@V.yaml's name, else the file name before '@')."),
                   kind: Optional[str] = typer.Option(None, "--kind", help="prompt, label, instruction or rubric (a "
                                                      "judge's; default: "
                                                      "the sidecar's, "
                                                      "else prompt)."),
                   store: Optional[str] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """Register the text of template files: new text becomes a new version, text already there gives its version."""
    setup_logging(False)
    try:
        reg = _registry(store, create=True)
        results = import_prompts(reg, files, name=name, kind=kind)
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json({"store": reg.store.display, "imported": results})
        return
    for r in results:
        what = "new version" if r["new"] else "already registered"
        if r["edited"]:
            what += ", edited since it was exported"
        out.print(f"[green]✓[/] {r['file']} → [bold]{r['ref']}[/] #{r['hash'][:12]} ({what})", highlight=False)
