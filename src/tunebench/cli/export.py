"""``tunebench export``: a stored trial as a PEFT adapter, merged weights or ONNX (the export package does it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import TunebenchError
from .common import (JsonOpt, StoreOpt, StudyArg, TrialOpt, VerboseOpt, fail, out, print_json, resolve_study,
                     setup_logging, spinner)


def _size(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def export_cmd(study: str = StudyArg, trial: Optional[str] = TrialOpt,
               best: bool = typer.Option(False, "--best", help="Export the top trial of the study's leaderboard."),
               fmt: str = typer.Option(..., "--format", help="hf: the adapter alone (PEFT) or head / prompt; merged: "
                                       "weights merged into the base model (plain transformers); onnx: encoder "
                                       "classifiers as ONNX fp32 + int8."),
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: "
                                                      "exports/STUDY-ID-FORMAT); must not exist or be empty."),
               force: bool = typer.Option(False, "--force", help="Replace an earlier tunebench export in --out."),
               per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="onnx: int8 weight "
                                                "scales per output channel (more accurate) or one per tensor."),
               store: Optional[str] = StoreOpt, as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Export a trial: its adapter (PEFT), its weights merged into the base model, or ONNX with int8 quantization;
    each export carries a model card (README.md) with the trial's task, metrics and config."""
    setup_logging(verbose)
    from ..export import (  # heavy: exporting loads torch, peft and onnx
        prepare_export,
        run_export,
    )

    try:
        name, root = resolve_study(study, store)
        plan = prepare_export(root, name, trial=trial, best=best, fmt=fmt, out_dir=out_dir, force=force)
        row = plan.row
        with spinner(f"loading trial {row['key'][:8]} ({row['label']})") as status:
            result = run_export(plan, per_channel=per_channel, status=status)
    except TunebenchError as exc:
        fail(exc)

    total = sum(f["bytes"] for f in result.files)
    if as_json:
        print_json({"study": plan.study, "trial": row["key"], "label": row["label"], "format": plan.fmt,
                    "path": str(result.path), "files": result.files, "bytes": total})
        return
    out.print(f"[green]✓[/] exported trial [bold]{row['key'][:8]}[/] ({row['label']}) of study '{plan.study}' as "
              f"[bold]{plan.fmt}[/] to {result.path}", highlight=False)
    table = Table(show_header=True, title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    for f in result.files:
        table.add_row(f["path"], _size(f["bytes"]))
    table.add_row("[bold]total[/]", f"[bold]{_size(total)}[/]")
    out.print(table)
    out.print(f"Model card: {result.path / 'README.md'} (how to load and predict)", highlight=False)
