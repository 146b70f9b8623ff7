"""``tunebench judge``: the study's judge compares two strategies' stored answers, each item in both orders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.markup import escape

from ..analysis.pairwise import compare_trials
from ..errors import TunebenchError
from ..store.results import Store
from .common import (JsonOpt, StoreOpt, StudyArg, VerboseOpt, err, fail, json_default, out, print_json,
                     resolve_study, setup_logging)
from .results import print_pairwise


def judge(study: str = StudyArg, store: Optional[str] = StoreOpt,
          pair: Tuple[str, str] = typer.Option(..., "--pair", help="The two strategies (labels, as `show` lists "
                                               "them) or trial ids to compare: --pair A B."),
          again: bool = typer.Option(False, "--again", help="Ask the judge again instead of reading the stored "
                                     "comparison."),
          verbose: bool = VerboseOpt,
          as_json: bool = JsonOpt) -> None:
    """Compare two strategies' answers with the study's judge (needs metrics[0].judge.pairwise: true): each test
    item is asked in both orders, and a verdict that changes with the order counts as a tie. The result is stored
    and shown by `show` and the report; the judge's own cost is kept apart."""
    setup_logging(verbose)
    try:
        name, root = resolve_study(study, store)
        config = None
        if Path(study).suffix in (".yaml", ".yml"):
            from ..runner import load_study  # heavy: the runner loads torch

            config = load_study(Path(study))[0]
        result = compare_trials(Store(root, create=False), name, pair[0], pair[1], config=config, again=again)
    except TunebenchError as exc:
        fail(exc, study)
    if as_json:
        print_json({k: v for k, v in result.items() if k != "rubric"}, default=json_default)
        return
    if result["cached"]:
        err.print("stored comparison (--again asks the judge again)", highlight=False)
    print_pairwise([result], out)
    share = result["first_shown_share"]
    out.print(escape(f"{result['compared']} of {result['items']} items compared in both orders; "
                     f"{result['missing']} missing (a judge call failed twice: not counted, never a loss); the judge "
                     "chose the answer shown first in "
                     + ("-" if share is None else f"{100 * share:.1f}%") + " of its decided calls"), highlight=False)
