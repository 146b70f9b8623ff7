"""The results store: SQLite, one row per finished trial, written in one transaction when the trial ends.

A trial's artifact directory is moved into place before its row is committed, so a process killed at any
moment leaves either a complete trial (row + artifact) or nothing that counts; a rerun redoes the rest.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from pathlib import Path

from ..errors import StoreError
from .prompts import record_trial

log = logging.getLogger(__name__)

DB_NAME = "tunebench.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    strategy TEXT NOT NULL,
    family TEXT NOT NULL,
    label TEXT NOT NULL,
    params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    train_size INTEGER NOT NULL,
    train_size_spec TEXT NOT NULL,
    metrics TEXT NOT NULL,
    cost TEXT NOT NULL,
    history TEXT NOT NULL,
    record TEXT NOT NULL,
    artifact TEXT,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS trials_study ON trials(study);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS test_sets (
    fingerprint TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    source TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    template TEXT NOT NULL,
    created REAL NOT NULL,
    source TEXT,
    UNIQUE(name, version),
    UNIQUE(name, hash)
);
CREATE TABLE IF NOT EXISTS prompt_uses (
    trial_key TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY(trial_key, name, version)
);
CREATE INDEX IF NOT EXISTS prompt_uses_name ON prompt_uses(name, version);
"""
_JSON_COLS = ("params", "metrics", "cost", "history", "record")


class Store:
    """Results of every study under one directory (default ``./tunebench-runs``).

    Example:
        >>> store = Store("tunebench-runs")  # doctest: +SKIP
        >>> [t["strategy"] for t in store.trials("sst2-ladder")]
    """

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        if not self.db_path.exists() and not create:
            raise StoreError(f"{self.root}: no results store here (no {DB_NAME}); run a study first or pass --store")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "artifacts").mkdir(exist_ok=True)
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.root}: cannot open the results store: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db_path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.row_factory = sqlite3.Row
        return con

    def artifact_dir(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def staging_dir(self, key: str) -> Path:
        path = self.root / "artifacts" / f".{key}.partial"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def save_study(self, name: str, config: dict, source: str | None, keys: list[str]) -> None:
        """Record a study's current config and the keys of its current plan (``show`` lists only those)."""
        doc = {"config": config, "keys": keys}
        with self._connect() as con:
            con.execute("INSERT INTO studies(name, config, source, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET config=excluded.config, source=excluded.source, "
                        "updated_at=excluded.updated_at", (name, json.dumps(doc), source, time.time()))

    def current_keys(self, name: str) -> set[str]:
        """Trial keys of the study's latest plan: trials of an earlier config stay stored but are not current."""
        return set(self.study_config(name)["keys"])

    def done_keys(self, study: str) -> set[str]:
        with self._connect() as con:
            return {r[0] for r in con.execute("SELECT key FROM trials WHERE study = ?", (study,))}

    def add_trial(self, row: dict, staged: Path | None, items: dict | None = None,
                  test_set: tuple[str, dict] | None = None) -> None:
        """Move the staged artifact into place, then commit the row (the commit is what makes it count).

        ``items`` holds the trial's per-test-item predictions and scores (what paired statistics need);
        ``test_set`` is ``(fingerprint, truth)``: the test labels or references, stored once per test split.
        Row, items, test set and the registry entries of the templates the trial used (see
        :mod:`tunebench.prompt_registry`) are written in one transaction."""
        final = None
        if staged is not None:
            final = self.artifact_dir(row["key"])
            shutil.rmtree(final, ignore_errors=True)  # leftover of a run killed between move and commit
            staged.rename(final)
        values = {**row, **{c: json.dumps(row[c]) for c in _JSON_COLS},
                  "artifact": str(final.relative_to(self.root)) if final else None, "finished_at": time.time()}
        cols = ["key", "study", "strategy", "family", "label", "params", "seed", "train_size", "train_size_spec",
                "metrics", "cost", "history", "record", "artifact", "finished_at"]
        with self._connect() as con:
            if items is not None:
                con.execute("INSERT OR REPLACE INTO items(key, data) VALUES (?, ?)", (row["key"], json.dumps(items)))
            if test_set is not None:
                con.execute("INSERT OR IGNORE INTO test_sets(fingerprint, data) VALUES (?, ?)",
                            (test_set[0], json.dumps(test_set[1])))
            con.execute(f"INSERT OR IGNORE INTO trials({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [values[c] for c in cols])
            record_trial(con, row)

    def items(self, keys: list[str]) -> dict[str, dict]:
        """Per-item predictions and scores of these trials (trials stored before tunebench kept them have none)."""
        out = {}
        with self._connect() as con:
            for k in keys:
                row = con.execute("SELECT data FROM items WHERE key = ?", (k,)).fetchone()
                if row is not None:
                    out[k] = json.loads(row[0])
        return out

    def test_set(self, fingerprint: str) -> dict | None:
        """The stored truth of a test split (labels or reference texts), by its data fingerprint."""
        with self._connect() as con:
            row = con.execute("SELECT data FROM test_sets WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return None if row is None else json.loads(row[0])

    def trials(self, study: str, keys: set[str] | None = None) -> list[dict]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM trials WHERE study = ? ORDER BY finished_at", (study,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for c in _JSON_COLS:
                d[c] = json.loads(d[c])
            if keys is None or d["key"] in keys:
                out.append(d)
        return out

    def studies(self) -> list[dict]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT s.name, s.source, s.updated_at, COUNT(t.key) AS trials FROM studies s "
                "LEFT JOIN trials t ON t.study = s.name GROUP BY s.name ORDER BY s.updated_at DESC").fetchall()
        return [dict(r) for r in rows]

    def study_config(self, name: str) -> dict:
        with self._connect() as con:
            row = con.execute("SELECT config FROM studies WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(s["name"] for s in self.studies()) or "none yet"
            raise StoreError(f"{self.root}: no study named '{name}' (known: {known})")
        return json.loads(row[0])
