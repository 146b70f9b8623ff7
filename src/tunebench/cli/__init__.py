"""The ``tunebench`` command line: Typer + Rich. Progress and messages go to stderr, ``--json`` to stdout.

The commands parse options and render; the work is the library's. One module per command group: ``run``
(run, demo, validate), ``results`` (show, ls, strategies), ``decide`` (recommend, report), ``judge`` (judge --pair),
``serve``, ``export``
``track`` (MLflow), ``prompts`` and ``store`` (sub-apps); ``common`` holds the consoles, shared options and helpers.
"""

from __future__ import annotations

import sys
import tempfile
import traceback

import typer
from rich.markup import escape

from ..config.files import clip
from ..errors import TunebenchError
from . import decide, export, judge, prompts, results, run, serve, store, track, ui
from .common import EXIT_INTERNAL, EXIT_INTERRUPTED, err

app = typer.Typer(help="Prompt engineering or fine-tuning? Run the adaptation ladder on your own data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# registered here, in the order `tunebench --help` lists them
app.command("run")(run.run)
app.command("demo")(run.demo)
app.command("show")(results.show)
app.command("report")(decide.report_cmd)
app.command("recommend")(decide.recommend_cmd)
app.command("judge")(judge.judge)
app.command("serve")(serve.serve)
app.command("ui")(ui.ui)
app.command("validate")(run.validate)
app.command("ls")(results.list_studies)
app.command("strategies")(results.strategies)
app.command("export")(export.export_cmd)
app.command("track")(track.track)
app.add_typer(prompts.prompts_app, name="prompts")
app.add_typer(store.store_app, name="store")


def main() -> None:
    """The console entry point: the app, with a last boundary under every command. A user error that escaped a
    command is printed as one (no traceback); anything else is a bug, reported in one line with the file where
    its traceback was written."""
    try:
        app(prog_name="tunebench")
    except TunebenchError as exc:
        err.print(f"[bold red]error:[/] {escape(clip(str(exc), 4000))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the last boundary: never a traceback on the terminal
        with tempfile.NamedTemporaryFile("w", prefix="tunebench-crash-", suffix=".txt", delete=False) as fh:
            traceback.print_exc(file=fh)
        err.print(f"[bold red]internal error:[/] {exc.__class__.__name__}: {escape(clip(str(exc), 300))}\n"
                  f"This is a bug in tunebench, not in your input; the traceback is in {fh.name}. Please report it "
                  "with that file.", highlight=False)
        sys.exit(EXIT_INTERNAL)
