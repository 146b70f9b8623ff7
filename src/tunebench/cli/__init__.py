"""The ``tunebench`` command line: Typer + Rich. Progress and messages go to stderr, ``--json`` to stdout.

The commands parse options and render; the work is the library's. One module per command group: ``run``
(run, demo, validate), ``results`` (show, ls, strategies), ``decide`` (recommend, report), ``serve``, ``export``
``prompts`` and ``store`` (sub-apps); ``common`` holds the consoles, shared options and helpers.
"""

from __future__ import annotations

import typer

from . import decide, export, prompts, results, run, serve, store, ui

app = typer.Typer(help="Prompt engineering or fine-tuning? Run the adaptation ladder on your own data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# registered here, in the order `tunebench --help` lists them
app.command("run")(run.run)
app.command("demo")(run.demo)
app.command("show")(results.show)
app.command("report")(decide.report_cmd)
app.command("recommend")(decide.recommend_cmd)
app.command("serve")(serve.serve)
app.command("ui")(ui.ui)
app.command("validate")(run.validate)
app.command("ls")(results.list_studies)
app.command("strategies")(results.strategies)
app.command("export")(export.export_cmd)
app.add_typer(prompts.prompts_app, name="prompts")
app.add_typer(store.store_app, name="store")


def main() -> None:  # pragma: no cover
    app()
