"""Task data: loading through Hugging Face ``datasets``, stratified splits and the checks run before training."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import LabelSpec, TaskConfig
from .config.files import check_path, clip, read_limited
from .errors import DataError
from .textfmt import render

log = logging.getLogger(__name__)

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
IMBALANCE_RATIO = 10.0


@dataclass
class Split:
    """One split: texts (fields already joined), integer label ids, and where each row came from."""

    name: str
    texts: list[str]
    labels: np.ndarray
    lines: list[str] = field(default_factory=list)
    fields: list[dict[str, str]] = field(default_factory=list)
    targets: list[str] | None = None  # generation tasks: the expected outputs (labels are then all 0)
    groups: dict[str, list[str]] = field(default_factory=dict)  # task.groups: column -> each row's group
    human: list[tuple[float | None, str]] | None = None  # task.human_score: (rating or None, rated text) per row
    soft: np.ndarray | None = None  # (n, n_labels) target distributions (a distill teacher's), beside ``labels``

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Split:
        idx = [int(i) for i in idx]
        pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
        return Split(self.name, pick(self.texts), self.labels[idx], pick(self.lines), pick(self.fields),
                     pick(self.targets) if self.targets is not None else None,
                     {c: pick(v) for c, v in self.groups.items()}, pick(self.human) if self.human else self.human,
                     self.soft[idx] if self.soft is not None else None)

    def records(self) -> list[dict[str, str]]:
        """Each example as prompt variables: its input fields plus ``input`` (the fields joined)."""
        if not self.fields:
            return [{"input": t} for t in self.texts]
        return [{**f, "input": t} for f, t in zip(self.fields, self.texts)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        ys = self.targets if self.targets is not None else self.labels.tolist()
        for t, y in zip(self.texts, ys):
            h.update(t.encode("utf-8") + b"\x1f" + str(y).encode() + b"\x1e")
        return h.hexdigest()[:16]


@dataclass
class TaskData:
    """A checked task: label names and the three splits. Build it with :func:`load_task`."""

    config: TaskConfig  # what was asked for (fields, type, instruction); this object holds what was loaded
    labels: list[LabelSpec]
    train: Split
    dev: Split
    test: Split
    warnings: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    unlabelled: Split | None = None  # task.data.unlabelled: inputs; ``labels`` -1 where the file gives no gold label

    @property
    def type(self) -> str:
        """classification or generation."""
        return self.config.type

    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def fingerprints(self) -> dict[str, str]:
        return {s.name: s.fingerprint() for s in (self.train, self.dev, self.test)}


def _format_of(path: Path, override: str | None) -> str:
    if override:
        return override
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .csv, .tsv, .jsonl, .parquet or set task.format")
    return fmt


def _check_text_file(path: Path, fmt: str) -> list[int] | None:
    """UTF-8, and a consistent number of fields per CSV/TSV row or one JSON object per JSONL line: errors name
    the line. Returns the line on which each example starts (quoted fields may span lines, blank lines skip)."""
    data = read_limited(path, "data file", max_data_bytes(), DataError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; it needs a header row and at least one example")
    if fmt in ("csv", "tsv"):
        delim = "\t" if fmt == "tsv" else ","
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, quoting=quoting, strict=True)
        starts: list[int] = []
        try:
            header = next(reader)
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if not row:
                    continue
                starts.append(start)
                if len(row) != len(header):
                    raise DataError(f"{path} line {reader.line_num}: {len(row)} fields, but the header has "
                                    f"{len(header)} ({delim!r}-separated); quote fields that contain {delim!r}")
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: malformed {fmt.upper()}: {exc}") from None
        if not starts:
            raise DataError(f"{path}: only a header row, no examples")
        return starts
    if fmt == "jsonl":
        starts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            starts.append(n)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            except RecursionError:
                raise DataError(f"{path} line {n}: JSON nested too deeply; each line must be one flat JSON object "
                                "of named fields") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object with named fields, got {type(row).__name__}")
        return starts
    return None


def read_table(path: str | Path, fmt: str | None = None) -> tuple[dict[str, list], list[str]]:
    """Read a data file through ``datasets``; returns its columns and a human location for each row."""
    import datasets

    path = check_path(path, "data file", DataError)
    try:
        st = path.stat()
    except OSError as exc:
        reason = "data file not found" if isinstance(exc, FileNotFoundError) else f"cannot read it ({exc.strerror})"
        raise DataError(f"{path}: {reason}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a directory, device or FIFO); give a data file")
    if st.st_size == 0:
        raise DataError(f"{path}: file is empty; it needs a header row and at least one example")
    if st.st_size > max_data_bytes():
        raise DataError(f"{path}: {st.st_size:,} bytes, over the limit of {max_data_bytes():,}; sample the file or "
                        f"raise the limit with {MAX_DATA_ENV}=MEGABYTES")
    fmt = _format_of(path, fmt)
    starts = _check_text_file(path, fmt) if fmt != "parquet" else None
    kwargs: dict = {}
    builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
    if fmt == "tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    if fmt in ("csv", "tsv"):
        kwargs.update(keep_default_na=False, na_filter=False)
    datasets.disable_progress_bars()
    try:
        with _literal(path) as literal:
            ds = datasets.load_dataset(builder, data_files=literal, split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc.__cause__ or exc
        first = (str(cause).splitlines() or [cause.__class__.__name__])[0]
        raise DataError(f"{path}: could not be read as {fmt.upper()}: {clip(first, 300)}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no examples")
    if starts is not None and len(starts) == len(ds):
        return ds.to_dict(), [f"line {n}" for n in starts]
    return ds.to_dict(), [f"row {i + 1}" for i in range(len(ds))]


MAX_DATA_ENV = "TUNEBENCH_MAX_DATA_MB"
_PATTERN_CHARS = re.compile(r"[*?\[\]{}!]|::|://")  # what datasets/fsspec read as a glob, a chain or a URL


def max_data_bytes() -> int:
    """The largest data file read (default 2 GiB; ``$TUNEBENCH_MAX_DATA_MB`` changes it)."""
    text = os.environ.get(MAX_DATA_ENV, "2048")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not 0 < mb <= 1 << 30:  # also refuses nan and inf
        raise DataError(f"{MAX_DATA_ENV}: expected a positive number of megabytes (at most 2^30), got {clip(text, 40)}")
    return int(mb * (1 << 20))


@contextmanager
def _literal(path: Path) -> Iterator[str]:
    """A path ``datasets`` reads as exactly this file. It treats data_files as glob patterns (``train[1].csv``
    would match ``train1.csv``, ``a*.csv`` every match) and skips hidden files, so a path with pattern characters
    or a hidden part is read through a symlink with a plain name in a temporary folder."""
    path = path.resolve()
    if not _PATTERN_CHARS.search(str(path)) and not any(p.startswith((".", "__")) for p in path.parts[1:]):
        yield str(path)
        return
    st = path.stat()  # one stable link per file version: datasets caches what it parsed under the link's name
    digest = hashlib.sha256(f"{path}\0{st.st_mtime_ns}\0{st.st_size}".encode()).hexdigest()[:20]
    folder = Path(tempfile.gettempdir()) / "tunebench-data-links" / digest
    suffix = path.suffix if path.suffix.isascii() and path.suffix[1:].isalnum() else ""
    link = folder / f"data{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == str(path)):
        tmp = folder / f".{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, link)  # atomic: two loads at once never see a half-made link
    yield str(link)


MISSING_GROUP = "(missing)"


def _load_split(name: str, path: Path, task: TaskConfig, value_to_id: dict[str, int] | None,
                groups: bool = False) -> tuple[Split, list]:
    """One file as a split; ``groups``: this file holds the test rows, so the ``task.groups`` columns are read."""
    cols, lines = read_table(path, task.format)
    out_field = task.label if task.type == "classification" else task.target
    needed = list(task.text) + [out_field]
    missing = [c for c in needed if c not in cols]
    if missing:
        which = "task.label" if task.type == "classification" else "task.target"
        raise DataError(f"{path}: column(s) {missing} not found; the file has {sorted(cols)}. "
                        f"Fix task.text / {which} in the study or rename the column")
    group_cols = list(task.groups) if groups else []
    missing = [c for c in group_cols if c not in cols]
    if missing:
        raise DataError(f"{path}: group column(s) {missing} not found; the file has {sorted(cols)}. "
                        "Fix task.groups in the study or add the column to the file that holds the test rows")
    by_group = {c: [MISSING_GROUP if v is None or str(v).strip() == "" else str(v).strip() for v in cols[c]]
                for c in group_cols}
    texts, fields = [], []
    for i in range(len(lines)):
        row = {f: "" if cols[f][i] is None else str(cols[f][i]) for f in task.text}
        t = render(task.text_template, row) if task.text_template else row[task.text[0]]
        if not t.strip():
            raise DataError(f"{path} {lines[i]}: empty text in field {'/'.join(task.text)}; "
                            "remove the row or fill in the text")
        texts.append(t)
        fields.append(row)
    raw = []
    for i, v in enumerate(cols[out_field]):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            raise DataError(f"{path} {lines[i]}: empty {'label' if task.type == 'classification' else 'target'} "
                            f"in field '{out_field}'")
        raw.append(str(v) if task.type == "generation" else str(v).strip())
    if task.type == "generation":
        human = _human(path, task, cols, lines) if groups and task.human_score else None
        return Split(name, texts, np.zeros(len(texts), dtype=np.int64), lines, fields, raw, by_group, human), raw
    ids = []
    if value_to_id is not None:
        for i, v in enumerate(raw):
            if v not in value_to_id:
                raise DataError(f"{path} {lines[i]}: label '{v}' in field '{task.label}' is not one of "
                                f"{sorted(value_to_id)}; add it to task.labels or fix the row")
            ids.append(value_to_id[v])
    return Split(name, texts, np.asarray(ids, dtype=np.int64), lines, fields, groups=by_group), raw


def _human(path: Path, task: TaskConfig, cols: dict[str, list], lines: list[str]) -> list[tuple[float | None, str]]:
    """``task.human_score`` of each test row (None where blank) and the text it rates (``task.human_rated``, default
    the target)."""
    rated_col = task.human_rated or task.target
    missing = [c for c in (task.human_score, rated_col) if c not in cols]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has {sorted(cols)}. Fix task.human_score / "
                        "task.human_rated in the study or add the column to the file that holds the test rows")
    out: list[tuple[float | None, str]] = []
    for i, (v, rated) in enumerate(zip(cols[task.human_score], cols[rated_col])):
        if v is None or str(v).strip() == "":
            out.append((None, ""))
            continue
        try:
            score = float(v)
        except (TypeError, ValueError):
            score = float("nan")
        if not np.isfinite(score):
            raise DataError(f"{path} {lines[i]}: human score {clip(str(v), 40)!r} in column '{task.human_score}' is "
                            "not a number; give a rating on the judge's scale or leave the cell empty")
        if rated is None or str(rated).strip() == "":
            raise DataError(f"{path} {lines[i]}: a human score but no rated text in column '{rated_col}'")
        out.append((score, str(rated)))
    return out


UNLABELLED = -1  # the label id of an unlabelled input


def _load_unlabelled(path: Path, task: TaskConfig, value_to_id: dict[str, int] | None, held: set[str],
                     checks: dict, warnings: list[str]) -> Split:
    """``task.data.unlabelled``: the text fields are required; a label column is optional and kept only where its
    value is a known label (for auditing a teacher; id -1 elsewhere). Exact duplicates and inputs also in dev or
    test are dropped (labelling test inputs would leak them into training), each with a warning."""
    cols, lines = read_table(path, task.format)
    missing = [c for c in task.text if c not in cols]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has {sorted(cols)}. "
                        "Unlabelled data needs the task.text field(s); fix task.text or rename the column")
    texts, fields = [], []
    for i in range(len(lines)):
        row = {f: "" if cols[f][i] is None else str(cols[f][i]) for f in task.text}
        t = render(task.text_template, row) if task.text_template else row[task.text[0]]
        if not t.strip():
            raise DataError(f"{path} {lines[i]}: empty text in field {'/'.join(task.text)}; "
                            "remove the row or fill in the text")
        texts.append(t)
        fields.append(row)
    gold = np.full(len(texts), UNLABELLED, dtype=np.int64)
    if task.type == "classification" and task.label in cols and value_to_id:
        for i, v in enumerate(cols[task.label]):
            gold[i] = value_to_id.get("" if v is None else str(v).strip(), UNLABELLED)
    split = Split("unlabelled", texts, gold, lines, fields)
    seen: set[str] = set()
    keep, dup, leak = [], 0, 0
    for i, t in enumerate(texts):
        if t in held:
            leak += 1
        elif t in seen:
            dup += 1
        else:
            seen.add(t)
            keep.append(i)
    checks.update(duplicates_unlabelled=dup, overlap_unlabelled_dropped=leak)
    if dup:
        warnings.append(f"unlabelled: {dup} exact duplicate text(s) dropped (each input is labelled once)")
    if leak:
        warnings.append(f"unlabelled: {leak} text(s) also in dev or test dropped (labelling them would leak "
                        "held-out inputs into training)")
    if not keep:
        raise DataError(f"{path}: no unlabelled input left after dropping duplicates and dev/test inputs; "
                        "give inputs that are not in dev or test")
    split = split.subset(keep)
    split.name = "unlabelled"
    checks["n_unlabelled"] = len(split)
    checks["n_unlabelled_gold"] = int((split.labels >= 0).sum())
    return split


def _resolve_path(p: str, base: Path) -> Path:
    """``p`` relative to the study file's folder, else to the working directory (the first that exists)."""
    where = f"task.data ({clip(p, 80)})"
    cand = check_path((base / p) if not Path(p).is_absolute() else Path(p), where, DataError)
    if os.path.lexists(cand) or Path(p).is_absolute():
        return cand
    cwd = check_path(Path.cwd() / p, where, DataError)
    return cwd if os.path.lexists(cwd) else cand


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation whose every prefix holds the classes in about their overall proportions.

    Prefixes are nested, so the learning-curve subsets of one seed grow by adding examples.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        keys[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def stratified_split(labels: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, taken) with ``frac`` of each class taken; a class with one example stays kept."""
    rng = np.random.default_rng(seed)
    kept, taken = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(frac * len(idx))) if len(idx) > 1 else 0
        k = min(k, len(idx) - 1)
        taken.extend(idx[:k])
        kept.extend(idx[k:])
    return np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(taken, dtype=np.int64))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint folds covering every index; each class is dealt round-robin, so per class the folds' counts
    differ by at most one (and fold sizes too: each class starts where the previous one stopped)."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(int(i))
        start = (start + len(idx)) % k
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def concat(a: Split, b: Split, name: str) -> Split:
    """The rows of ``a`` then ``b`` as one split (e.g. train + dev pooled for cross-validation)."""
    both = lambda x, y: x + y if x and y else []  # noqa: E731  (per-row lists only where both have them)
    targets = a.targets + b.targets if a.targets is not None and b.targets is not None else None
    return Split(name, a.texts + b.texts, np.concatenate([a.labels, b.labels]), both(a.lines, b.lines),
                 both(a.fields, b.fields), targets, {c: a.groups[c] + b.groups[c] for c in a.groups if c in b.groups},
                 a.human + b.human if a.human is not None and b.human is not None else None)


def load_task(task: TaskConfig, base_dir: str | Path = ".") -> TaskData:
    """Load, split and check the task's data. Raises :class:`DataError` with file and line on bad input.

    Example:
        >>> data = load_task(cfg.task, base_dir)  # doctest: +SKIP
        >>> len(data.train), data.label_names
    """
    base = Path(base_dir)
    paths = {k: _resolve_path(v, base) for k, v in task.data.model_dump().items() if v}
    declared = task.labels
    value_to_id = {lab.value: i for i, lab in enumerate(declared)} if declared else None
    train, raw_train = _load_split("train", paths["train"], task, value_to_id, groups="test" not in paths)
    generation = task.type == "generation"
    if generation:
        declared = []
    elif declared is None:
        values = sorted(set(raw_train), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        declared = [LabelSpec(value=v, name=v) for v in values]
        value_to_id = {v: i for i, v in enumerate(values)}
        train.labels = np.asarray([value_to_id[v] for v in raw_train], dtype=np.int64)
    names = [lab.name for lab in declared]
    present = set(train.labels.tolist())
    if len(present) < 2 and not generation:
        only = names[next(iter(present))] if present else "none"
        raise DataError(f"{paths['train']}: field '{task.label}' has a single label ({only}); "
                        "classification needs at least two classes in train")
    warnings: list[str] = []
    absent = [names[i] for i in range(len(names)) if i not in present]
    if absent:
        warnings.append(f"{paths['train']}: declared label(s) {absent} have no training example")

    splits = {"train": train}
    for name in ("dev", "test"):
        if name in paths:
            split, _ = _load_split(name, paths[name], task, value_to_id, groups=name == "test")
            unknown = [] if generation else sorted({int(y) for y in split.labels} - present)
            if unknown:
                i = next(j for j, y in enumerate(split.labels) if int(y) in unknown)
                raise DataError(f"{paths[name]} {split.lines[i]}: label '{names[int(split.labels[i])]}' never occurs "
                                f"in train ({paths['train']}); add training examples for it or drop those rows")
            splits[name] = split
    for name in ("test", "dev"):  # carve test first so dev comes from what is left
        if name not in splits:
            frac = getattr(task.split, name)
            kept, taken = stratified_split(splits["train"].labels, frac, task.split.seed + (1 if name == "dev" else 0))
            if len(taken) == 0:
                raise DataError(f"{paths['train']}: too few examples to carve a {name} split; give a {name} file")
            src = splits["train"]
            splits[name] = src.subset(taken)
            splits[name].name = name
            splits["train"] = src.subset(kept)

    checks: dict = {}
    for name, split in splits.items():
        dup = len(split) - len(set(split.texts))
        checks[f"duplicates_{name}"] = dup
        if dup:
            warnings.append(f"{name}: {dup} exact duplicate text(s) within the split")
    train_texts = set(splits["train"].texts)
    for name in ("dev", "test"):
        overlap = sum(t in train_texts for t in splits[name].texts)
        checks[f"overlap_train_{name}"] = overlap
        if overlap:
            hint = "dropped from train (drop_leakage)" if task.drop_leakage else "set task.drop_leakage: true to drop them from train"
            warnings.append(f"{overlap} {name} text(s) also appear in train (leakage); {hint}")
    if task.drop_leakage:
        held = set(splits["dev"].texts) | set(splits["test"].texts)
        keep = [i for i, t in enumerate(splits["train"].texts) if t not in held]
        checks["leakage_dropped"] = len(splits["train"]) - len(keep)
        splits["train"] = splits["train"].subset(keep)
        left = set(splits["train"].labels.tolist())
        if (len(left) < 2 and not generation) or not len(splits["train"]):
            raise DataError(f"{paths['train']}: after drop_leakage removed {checks['leakage_dropped']} rows also found "
                            f"in dev/test, train has {len(splits['train'])} rows and {len(left)} class(es); "
                            "give separate, non-overlapping files or set drop_leakage: false")
        lost = sorted(present - left)
        if lost:
            warnings.append(f"drop_leakage removed every training example of {[names[i] for i in lost]}")
    for col, values in splits["test"].groups.items():
        sizes = Counter(values)
        checks[f"groups_{col}"] = len(sizes)
        if len(sizes) < 2:
            warnings.append(f"test: group column '{col}' has a single value ({next(iter(sizes))!r}); "
                            "there is no gap between groups to measure")
    counts = Counter(splits["train"].labels.tolist())
    ratio = max(counts.values()) / max(1, min(counts.values()))
    if not generation:
        checks["imbalance_ratio"] = round(ratio, 2)
    if ratio > IMBALANCE_RATIO and not generation:
        warnings.append(f"train: heavy class imbalance (largest/smallest class = {ratio:.1f}); "
                        "prefer macro-F1 over accuracy")
    checks.update({f"n_{k}": len(v) for k, v in splits.items()})
    unlabelled = None
    if "unlabelled" in paths:
        held = set(splits["dev"].texts) | set(splits["test"].texts)
        unlabelled = _load_unlabelled(paths["unlabelled"], task, value_to_id, held, checks, warnings)
    for w in warnings:
        log.warning(w)
    return TaskData(task, declared, splits["train"], splits["dev"], splits["test"], warnings, checks, unlabelled)
