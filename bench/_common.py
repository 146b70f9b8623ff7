"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """SST-2 TSV (header ``sentence<TAB>label``, no quoting)."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        si, li = header.index("sentence"), header.index("label")
        for row in reader:
            if row:
                texts.append(row[si])
                labels.append(int(row[li]))
    return texts, labels


def task_config(kind: str = "classification"):
    """A ``TaskConfig`` for a ``TaskData`` built in memory (no files: its data field is never read)."""
    from tunebench.config import TaskConfig

    return TaskConfig.model_construct(type=kind, instruction=None, text=["text"], label="label", target=None)
