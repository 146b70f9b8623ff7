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


def read_banking(path: Path) -> tuple[list[str], list[str]]:
    """BANKING77's CSV (``text,category``): texts and intent names."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def per_class(labels, idx, n: int, rng):
    """``n`` of ``idx`` per class (all of a smaller class), drawn by ``rng``, sorted."""
    import numpy as np

    out = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        out.extend(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    return np.sort(np.asarray(out, dtype=np.int64))


def write_rows(path: Path, texts: list[str], cats: list[str] | None, idx) -> str:
    """Rows ``idx`` of a BANKING77-shaped table as a ``text,category`` CSV (``cats`` None: the text column only)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"] if cats is None else ["text", "category"])
        w.writerows([texts[i]] if cats is None else [texts[i], cats[i]] for i in idx)
    return str(path)


def banking77_split(seed: int):
    """BANKING77 from ../shared with its stratified, seeded 80/20 split, for the benchmarks that hold the 20% out as
    their test set: ``(texts, intents, names, y, rest, test)`` (``rest``/``test``: row indices); None (a SKIP line
    printed) when the data is absent. Silences transformers' progress bars, as every benchmark run does."""
    import numpy as np
    import transformers

    from tunebench.data import stratified_split

    src = DATA.resolve() / "banking77" / "train.csv"
    if not src.is_file():
        print(f"SKIP: BANKING77 not found at {src}; nothing to benchmark.")
        return None
    transformers.utils.logging.disable_progress_bar()
    texts, cats = read_banking(src)
    names = sorted(set(cats))
    y = np.asarray([names.index(c) for c in cats])
    rest, test = stratified_split(y, 0.2, seed)
    return texts, cats, names, y, rest, test
