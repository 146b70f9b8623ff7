"""What the command modules share: the consoles, logging, error exit, common options, study-name resolution and
options built from the config models' fields (so a flag's help and default cannot drift from the model)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import DEFAULT_STORE
from ..config.files import clip
from ..config.metrics import DEFAULT_METRIC, metric_names
from ..errors import TunebenchError

err = Console(stderr=True)
out = Console()
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=140)
if not err.is_terminal:
    err = Console(stderr=True, width=140)

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USER_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130

StoreOpt = typer.Option(None, "--store", help=f"Results store: a directory or postgresql://user@host/db (default: the study's 'store', else ./{DEFAULT_STORE}).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document to stdout and nothing else.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log what the library does (to stderr).")
StudyArg = typer.Argument(..., help="Study name or study YAML.")
TrialOpt = typer.Option(None, "--trial", help="Trial id (or its first 6+ characters; `tunebench show --ids` lists "
                        "them).")

METRICS = metric_names()  # the --metric choices, in the metric table's order
DEFAULT_METRIC_HELP = f"{DEFAULT_METRIC['classification']}, or {DEFAULT_METRIC['generation']}"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    import datasets  # heavy: loads the datasets library
    import transformers  # heavy: loads transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for noisy in ("httpx", "urllib3", "filelock", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("tunebench.data").setLevel(logging.ERROR)  # the CLI prints data warnings itself
    # Python warnings (a library's FutureWarning or DeprecationWarning: the user can do nothing about them) go
    # through logging: shown with --verbose, silent otherwise. tunebench itself reports through logging.
    logging.captureWarnings(False)  # install afresh: something since an earlier call (a test harness, an embedding
    logging.captureWarnings(True)   # app) may have put its own warnings.showwarning back
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def fail(exc: TunebenchError, study: Path | str | None = None) -> None:
    """Print the error (no traceback) and exit with its code. With ``study`` (the study file a command read), an
    error about one of its entries found after loading (``strategies[1].few_shot: template: ...``, raised when
    the trials are planned) is prefixed with the file, like the errors found while reading it."""
    msg = str(exc)
    if study is not None and msg.startswith(("strategies[", "training:", "cv:")):
        msg = f"{study}: {msg}"
    err.print(f"[bold red]error:[/] {escape(clip(msg, 4000))}", highlight=False)
    raise typer.Exit(exc.exit_code)


def json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def finite(doc: Any) -> Any:
    """``doc`` with every inf or NaN float as None: JSON has no Infinity (``json.dumps`` would write it anyway)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    return doc


def print_json(doc: Any, default: Callable | None = None) -> None:
    """One JSON document on stdout (strict JSON: non-finite numbers are written as null)."""
    sys.stdout.write(json.dumps(finite(doc), default=default, allow_nan=False) + "\n")


def check_metric(metric: Optional[str]) -> None:
    if metric is not None and metric not in METRICS:
        raise TunebenchError(f"--metric: '{metric}' is not one of {', '.join(METRICS)}")


def resolve_study(study: str, store: Optional[Path]) -> tuple[str, Path]:
    """A study name or study YAML → (study name, store root): the YAML's store, else ``--store``, else the
    default store."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        from ..runner import load_study  # heavy: the runner loads torch

        cfg, base = load_study(path)
        return cfg.name, store or cfg.store_path(base)
    return study, store or Path(DEFAULT_STORE)


@contextmanager
def spinner(description: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr while a slow step runs; yields a function that changes its description."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield lambda msg: progress.update(task, description=msg)


# ---- options from config fields ----------------------------------------------------------------------------
_FROM_FIELD = object()


def field_info(model: type, name: str) -> tuple[str, Any, dict]:
    """(description, default, extras) of a pydantic model field or a dataclass field (``metadata['help']``)."""
    fields = getattr(model, "model_fields", None)
    if fields is not None:
        info = fields[name]  # its ge=/gt= bounds are checked where the model is built, with the model's message
        return info.description or "", info.get_default(call_default_factory=True), {}
    f = next(f for f in dataclasses.fields(model) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f.metadata.get("help", ""), default, {k: v for k, v in f.metadata.items() if k == "min"}


def field_option(model: type, name: str, *flags: str, help: str = "{help}.", default: Any = _FROM_FIELD,
                 bounds: bool = True, **kwargs: Any) -> Any:
    """A typer option whose help (and default, unless ``default`` is given) is the model field's.

    ``help`` is a template: ``{help}`` is the field's description without its final full stop, ``{default}``
    its default, ``{field}`` its name. With ``bounds``, a dataclass field's ``metadata['min']`` becomes the
    option's ``min``.
    """
    desc, field_default, extras = field_info(model, name)
    if bounds:
        kwargs = {**extras, **kwargs}
    text = help.format(help=desc.rstrip().rstrip("."), default=field_default, field=name)
    return typer.Option(field_default if default is _FROM_FIELD else default, *flags, help=text, **kwargs)
