"""The study's own counterfactual pairs (``consistency.counterfactual``): a CSV file with the columns ``original``
and ``replacement``, or pairs written in the study. Every term has one partner; each pair swaps both ways.

Example:
    >>> checked_pairs([("row 1", "Paris", "Lagos"), ("row 2", "lagos", "paris")])  # the same pair both ways: once
    [('Paris', 'Lagos')]
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError
from .files import MiB, clip, read_text_limited

PAIRS_MAX_BYTES = 1 * MiB
COLUMNS = ("original", "replacement")


def checked_pairs(rows: Iterable[tuple[str, object, object]]) -> list[tuple[str, str]]:
    """``(where, original, replacement)`` rows as distinct pairs (terms stripped); a ``ValueError`` naming ``where``
    for an empty term, a term swapped with itself, a term on two lines, or a term given two partners."""
    partner: dict[str, tuple[str, str]] = {}  # lower-case term -> (its partner as written, where it was paired)
    out: list[tuple[str, str]] = []
    for where, a, b in rows:
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"{where}: give two terms as text")
        a, b = a.strip(), b.strip()
        for column, term in zip(COLUMNS, (a, b)):
            if not term:
                raise ValueError(f"{where}: the {column} is empty; give both terms")
            if any(c in term for c in "\r\n"):
                raise ValueError(f"{where}: the {column} {clip(term, 60)} spans lines; a term is one line")
        if a.lower() == b.lower():
            raise ValueError(f"{where}: {clip(a, 60)} is swapped with itself")
        known = partner.get(a.lower())
        if known is not None and known[0].lower() == b.lower():
            continue  # the same pair again (either way round): swaps both ways already
        for term in (a, b):
            if term.lower() in partner:
                other, first = partner[term.lower()]
                raise ValueError(f"{where}: {clip(term, 60)} is already swapped with {clip(other, 60)} ({first}); "
                                 "a term has one partner")
        partner[a.lower()], partner[b.lower()] = (b, where), (a, where)
        out.append((a, b))
    return out


def read_pairs_file(path: Path, where: str) -> list[tuple[str, str]]:
    """The pairs in the CSV file ``path`` (UTF-8, a header row naming ``original`` and ``replacement``; other
    columns are ignored). Every error is a :class:`ConfigError` that names ``where``, the file and its line."""
    text = read_text_limited(path, where, PAIRS_MAX_BYTES).removeprefix("\ufeff")
    name = clip(str(path), 200)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[str, str, str]] = []
    cols: tuple[int, int] | None = None
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue  # a blank line
            if cols is None:
                header = [c.strip().lower() for c in cells]
                missing = [c for c in COLUMNS if c not in header]
                if missing:
                    raise ConfigError(f"{where}: {name} line {line}: the header has no column "
                                      f"{' or '.join(missing)} (it has {clip(', '.join(cells), 100)}); the first "
                                      "line is original,replacement")
                cols = (header.index(COLUMNS[0]), header.index(COLUMNS[1]))
                continue
            if len(cells) <= max(cols):
                raise ConfigError(f"{where}: {name} line {line}: {len(cells)} column(s); a row has the "
                                  f"{COLUMNS[0]} and the {COLUMNS[1]}")
            rows.append((f"{name} line {line}", cells[cols[0]], cells[cols[1]]))
    except csv.Error as exc:
        raise ConfigError(f"{where}: {name} line {reader.line_num}: not valid CSV ({exc})") from None
    if cols is None:
        raise ConfigError(f"{where}: {name} is empty; give a header original,replacement and one pair a line")
    if not rows:
        raise ConfigError(f"{where}: {name} has no pairs under its header; give one pair a line")
    try:
        return checked_pairs(rows)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
