"""The results store: one row per finished trial, on SQLite (embedded default) or PostgreSQL (a team store).

A trial is *claimed* before it runs (a ``claims`` row: owner, host, pid, heartbeat, expiry), so several drivers
on one store split the pending trials between them. Its artifact is written to a staging location of its own,
then committed: in one transaction the claim is checked, the artifact moved into place, the row, per-item results
and test truth written and the claim dropped. A driver killed at any moment leaves either a complete trial (row +
artifact) or nothing that counts; its claims expire when its heartbeat stops, and the next driver runs the trial.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..config.files import check_path
from ..errors import StoreError
from . import db
from .locations import ArtifactRoot, is_url, local_copy
from .prompts import record_trial

log = logging.getLogger(__name__)

DB_NAME = "tunebench.db"
_JSON_COLS = ("params", "metrics", "cost", "history", "record")
_COLS = ["key", "study", "strategy", "family", "label", "params", "seed", "train_size", "train_size_spec",
         "metrics", "cost", "history", "record", "artifact", "finished_at"]


def host_name() -> str:
    """This machine's name in claims (``TUNEBENCH_HOSTNAME`` overrides it where containers share a hostname)."""
    return os.environ.get("TUNEBENCH_HOSTNAME") or socket.gethostname()


def new_owner() -> str:
    """A driver's identity in claims: host, pid and a random part (a reused pid is another owner)."""
    return f"{host_name()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Store:
    """Results of every study in one store: a directory (SQLite + artifacts, default ``./tunebench-runs``) or a
    PostgreSQL URL (``postgresql://user@host:5432/db``) with artifacts at ``artifacts`` (a shared path or an
    fsspec URL, remembered by the store once given).

    Example:
        >>> store = Store("tunebench-runs")  # doctest: +SKIP
        >>> [t["strategy"] for t in store.trials("sst2-ladder")]
    """

    def __init__(self, location: str | Path, *, create: bool = True, artifacts: str | Path | None = None):
        self.location = str(location)
        self.is_postgres = db.is_postgres(self.location)
        if self.is_postgres:
            self.root = Path(os.environ.get("TUNEBENCH_LOCAL_DIR", "tunebench-runs"))  # reports and such, locally
            self.display = db.redact(self.location)
            self.db_path = None
            self.engine = self._open(lambda: db.postgres_engine(self.location), create)
        else:
            self.root = check_path(Path(location).expanduser(), "results store (--store or store:)", StoreError)
            self.display = str(self.root)
            self.db_path = check_path(self.root / DB_NAME, "results store (--store or store:)", StoreError)
            if not self.db_path.exists() and not create:
                raise StoreError(f"{self.root}: no results store here (no {DB_NAME}); run a study first or pass "
                                 "--store")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.root}: cannot open the results store: {exc}") from None
            self.engine = self._open(lambda: db.sqlite_engine(str(self.db_path)), create)
        self.artifacts = self._artifact_root(artifacts)

    def _open(self, make, create: bool):  # noqa: ARG002 (a missing SQLite file is refused before)
        try:
            engine = make()
            db.create_schema(engine)  # also adds tables newer than an existing store (claims, failures, meta)
            return engine
        except SQLAlchemyError as exc:
            hint = " (is the server running and the database created?)" if self.is_postgres else ""
            raise StoreError(f"{self.display}: cannot open the results store{hint}: {_reason(exc)}") from None

    def __repr__(self) -> str:
        return f"Store({self.display!r})"

    def _artifact_root(self, artifacts: str | Path | None) -> ArtifactRoot | None:
        recorded = self.meta("artifacts")
        if artifacts is not None:
            loc = str(artifacts) if is_url(str(artifacts)) else str(
                check_path(Path(artifacts).expanduser(), "artifacts (--artifacts or artifacts:)", StoreError).resolve())
            if recorded is None and self.is_postgres:
                self.set_meta("artifacts", loc)
            return ArtifactRoot(loc)
        if recorded is not None:
            return ArtifactRoot(recorded)
        return None if self.is_postgres else ArtifactRoot(self.root / "artifacts")

    # -- small helpers ----------------------------------------------------------------------------------------
    def _read(self, sql: str, **params: Any) -> list[Any]:
        try:
            return db.read(self.engine, sql, **params)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.display}: cannot read the results store: {_reason(exc)}") from None

    def _write(self, fn, what: str):
        try:
            return db.write(self.engine, fn)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.display}: cannot {what}: {_reason(exc)}") from None

    def meta(self, name: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE name = :name", name=name)
        return rows[0]["value"] if rows else None

    def set_meta(self, name: str, value: str) -> None:
        self._write(lambda con: con.execute(text(
            "INSERT INTO meta(name, value) VALUES (:n, :v) ON CONFLICT(name) DO UPDATE SET value = excluded.value"),
            {"n": name, "v": value}), "record the store's settings")

    # -- artifacts --------------------------------------------------------------------------------------------
    def require_artifacts(self) -> ArtifactRoot:
        if self.artifacts is None:
            raise StoreError(f"{self.display}: this store has no artifact location yet; set `artifacts:` in the "
                             "study (a path every worker and reader shares, or a URL such as s3://bucket/prefix) "
                             "or pass --artifacts")
        return self.artifacts

    def artifact_dir(self, key: str) -> Path:
        return Path(self.require_artifacts().final(key))

    def staging(self, key: str, owner: str) -> str:
        """A fresh staging location for ``key``, private to ``owner``."""
        return self.require_artifacts().staging(key, owner)

    def artifact_location(self, row: dict) -> str | None:
        """Where a stored trial's artifact is (a path or a URL), or None when it has none."""
        art = row.get("artifact")
        if not art:
            return None
        return art if is_url(art) or Path(art).is_absolute() else str(self.root / art)

    def artifact_path(self, row: dict) -> Path:
        """A local directory with the trial's artifact (downloaded first when the root is a URL)."""
        loc = self.artifact_location(row)
        if loc is None:
            raise StoreError(f"trial {row['key'][:8]} ({row['label']}) has no saved artifact")
        return local_copy(loc)

    def _stored_artifact(self, final: str) -> str:
        """What the row records: relative to the store directory where it is under it (old stores, moved
        directories keep working), else the absolute path or URL."""
        if not is_url(final) and not self.is_postgres:
            try:
                return str(Path(final).resolve().relative_to(self.root.resolve()))
            except ValueError:
                pass
        return final

    # -- studies ----------------------------------------------------------------------------------------------
    def save_study(self, name: str, config: dict, source: str | None, keys: list[str],
                   updated_at: float | None = None) -> None:
        """Record a study's current config and the keys of its current plan (``show`` lists only those)."""
        doc = {"name": name, "config": json.dumps({"config": config, "keys": keys}), "source": source,
               "at": updated_at if updated_at is not None else time.time()}
        self._write(lambda con: con.execute(text(
            "INSERT INTO studies(name, config, source, updated_at) VALUES (:name, :config, :source, :at) "
            "ON CONFLICT(name) DO UPDATE SET config=excluded.config, source=excluded.source, "
            "updated_at=excluded.updated_at"), doc), "record the study")

    def relabel(self, study: str, labels: dict[str, str]) -> int:
        """Give stored trials the display label their current plan gives them (``{key: label}``), where it
        changed: labels are derived from the config, and a newer version may show the same trial differently
        (two configs that once shared a label would otherwise still be grouped as one). Only the label column
        changes; the number of trials relabelled."""
        stored = {r["key"]: r["label"] for r in self._read("SELECT key, label FROM trials WHERE study = :s", s=study)}
        changed = {k: v for k, v in labels.items() if k in stored and stored[k] != v}
        if changed:
            self._write(lambda con: [con.execute(text("UPDATE trials SET label = :l WHERE key = :k AND study = :s"),
                                                 {"l": v, "k": k, "s": study}) for k, v in changed.items()],
                        "relabel trials")
        return len(changed)

    def current_keys(self, name: str) -> set[str]:
        """Trial keys of the study's latest plan: trials of an earlier config stay stored but are not current."""
        return set(self.study_config(name)["keys"])

    def done_keys(self, study: str) -> set[str]:
        return {r["key"] for r in self._read("SELECT key FROM trials WHERE study = :s", s=study)}

    def studies(self) -> list[dict]:
        rows = self._read(
            "SELECT s.name, s.source, s.updated_at, COUNT(t.key) AS trials FROM studies s "
            "LEFT JOIN trials t ON t.study = s.name GROUP BY s.name, s.source, s.updated_at "
            "ORDER BY s.updated_at DESC")
        return [dict(r) for r in rows]

    def study_config(self, name: str) -> dict:
        rows = self._read("SELECT config FROM studies WHERE name = :n", n=name)
        if not rows:
            known = ", ".join(s["name"] for s in self.studies()) or "none yet"
            raise StoreError(f"{self.display}: no study named '{name}' (known: {known})")
        return json.loads(rows[0]["config"])

    # -- claims -----------------------------------------------------------------------------------------------
    def claim(self, study: str, key: str, owner: str, ttl: float, take_from: str | None = None) -> bool:
        """Claim ``key`` for ``owner`` unless it is finished or another owner's claim has not expired (a claim of
        ``take_from``, an owner known to be dead, is taken over at once). Leftover staging of an earlier owner of
        the key is removed: only the claim holder touches a key's artifacts."""
        now = time.time()
        host, pid = owner.rsplit(":", 2)[0], int(owner.rsplit(":", 2)[1])

        def go(con: Connection) -> bool:
            got = con.execute(text(
                "INSERT INTO claims(key, study, owner, host, pid, claimed_at, heartbeat, expires) "
                "VALUES (:key, :study, :owner, :host, :pid, :now, :now, :exp) ON CONFLICT(key) DO UPDATE SET "
                "owner=excluded.owner, host=excluded.host, pid=excluded.pid, claimed_at=excluded.claimed_at, "
                "heartbeat=excluded.heartbeat, expires=excluded.expires "
                "WHERE claims.expires < :now OR claims.owner = :owner OR claims.owner = :dead RETURNING owner"),
                {"key": key, "study": study, "owner": owner, "host": host, "pid": pid, "now": now,
                 "exp": now + ttl, "dead": take_from or ""}).first()
            if got is None:
                return False
            if con.execute(text("SELECT 1 FROM trials WHERE key = :k"), {"k": key}).first() is not None:
                con.execute(text("DELETE FROM claims WHERE key = :k AND owner = :o"), {"k": key, "o": owner})
                return False  # finished by another driver just before
            return True

        got = self._write(go, "claim a trial")
        if got and self.artifacts is not None:
            self.artifacts.clear_staging(key)
        return got

    def renew(self, owner: str, ttl: float) -> int:
        """Push back the expiry of every claim ``owner`` holds (the heartbeat); returns how many it holds."""
        now = time.time()
        return self._write(lambda con: con.execute(text(
            "UPDATE claims SET heartbeat = :now, expires = :exp WHERE owner = :o"),
            {"now": now, "exp": now + ttl, "o": owner}).rowcount, "renew claims")

    def release(self, key: str, owner: str) -> None:
        self._write(lambda con: con.execute(text("DELETE FROM claims WHERE key = :k AND owner = :o"),
                                            {"k": key, "o": owner}), "release a claim")

    def claims(self, study: str | None = None) -> list[dict]:
        """Live and expired claims (``expired`` set on those past their expiry)."""
        rows = self._read("SELECT * FROM claims" + (" WHERE study = :s" if study else "") + " ORDER BY claimed_at",
                          s=study)
        now = time.time()
        return [{**dict(r), "expired": r["expires"] < now} for r in rows]

    def record_failure(self, study: str, key: str, label: str, reason: str, owner: str) -> None:
        """Remember why a trial failed (a rerun retries it) and drop ``owner``'s claim on it."""
        def go(con: Connection) -> None:
            con.execute(text("INSERT INTO failures(key, study, label, reason, owner, at) "
                             "VALUES (:k, :s, :l, :r, :o, :at) ON CONFLICT(key) DO UPDATE SET label=excluded.label, "
                             "reason=excluded.reason, owner=excluded.owner, at=excluded.at"),
                        {"k": key, "s": study, "l": label, "r": reason[:4000], "o": owner, "at": time.time()})
            con.execute(text("DELETE FROM claims WHERE key = :k AND owner = :o"), {"k": key, "o": owner})

        self._write(go, "record a failed trial")

    def failures(self, study: str, since: float | None = None) -> list[dict]:
        rows = self._read("SELECT * FROM failures WHERE study = :s AND at >= :since ORDER BY at", s=study,
                          since=since or 0.0)
        return [dict(r) for r in rows]

    # -- trials -----------------------------------------------------------------------------------------------
    def add_trial(self, row: dict, staged: str | Path | None, items: dict | None = None,
                  test_set: tuple[str, dict] | None = None, owner: str | None = None,
                  finished_at: float | None = None) -> bool:
        """Commit a finished trial: in one transaction, check ``owner`` still holds its claim, move the staged
        artifact into place, write the row, per-item results, test truth and the registry entries of the
        templates it used, and drop the claim. Returns False (and discards the staged artifact) when the trial was
        already stored or its claim was taken over after expiring: a trial is never committed twice.

        ``items`` holds the trial's per-test-item predictions and scores (what paired statistics need);
        ``test_set`` is ``(fingerprint, truth)``: the test labels or references, stored once per test split."""
        key = row["key"]
        root = self.require_artifacts() if staged is not None else self.artifacts

        def go(con: Connection) -> bool:
            if owner is not None:
                lock = " FOR UPDATE" if self.is_postgres else ""
                holder = con.execute(text(f"SELECT owner FROM claims WHERE key = :k{lock}"), {"k": key}).first()
                if holder is not None and holder[0] != owner:
                    log.warning("trial %s: its claim expired and was taken by %s; this result is dropped",
                                key[:8], holder[0])
                    return False
            if con.execute(text("SELECT 1 FROM trials WHERE key = :k"), {"k": key}).first() is not None:
                return False
            final = root.promote(str(staged), key) if staged is not None else None
            values = {**row, **{c: json.dumps(row[c]) for c in _JSON_COLS},
                      "artifact": self._stored_artifact(final) if final else None,
                      "finished_at": finished_at if finished_at is not None else time.time()}
            if items is not None:
                con.execute(text("INSERT INTO items(key, data) VALUES (:k, :d) ON CONFLICT(key) DO UPDATE SET "
                                 "data = excluded.data"), {"k": key, "d": json.dumps(items)})
            if test_set is not None:
                _put_test_set(con, test_set[0], test_set[1])
            con.execute(text(f"INSERT INTO trials({', '.join(_COLS)}) VALUES ({', '.join(':' + c for c in _COLS)})"),
                        {c: values[c] for c in _COLS})
            record_trial(con, row)
            con.execute(text("DELETE FROM claims WHERE key = :k"), {"k": key})
            con.execute(text("DELETE FROM failures WHERE key = :k"), {"k": key})
            return True

        stored = self._write(go, f"store trial {key[:8]}")
        if not stored and staged is not None and root is not None:
            root.remove(str(staged))
        return stored

    def items(self, keys: list[str]) -> dict[str, dict]:
        """Per-item predictions and scores of these trials (trials stored before tunebench kept them have none)."""
        out = {}
        for k in keys:
            rows = self._read("SELECT data FROM items WHERE key = :k", k=k)
            if rows:
                out[k] = json.loads(rows[0]["data"])
        return out

    def test_set(self, fingerprint: str) -> dict | None:
        """The stored truth of a test split (labels or reference texts, with ``groups`` where a study named
        ``task.groups``: column -> each item's group), by its data fingerprint."""
        rows = self._read("SELECT data FROM test_sets WHERE fingerprint = :f", f=fingerprint)
        return json.loads(rows[0]["data"]) if rows else None

    def add_test_groups(self, fingerprint: str, groups: dict[str, list[str]]) -> bool:
        """Record each test item's group (``{column: [group per item]}``) with a test split already stored, so
        ``task.groups`` added to a study that has run shows per-group results without rerunning a trial. True when
        something changed; a split not stored yet is left alone (its first trial stores it, groups included)."""
        def go(con: Connection) -> bool:
            row = con.execute(text("SELECT data FROM test_sets WHERE fingerprint = :f"), {"f": fingerprint}).first()
            if row is None:
                return False
            doc = json.loads(row[0])
            n = len(doc.get("labels") or doc.get("targets") or [])
            if any(len(v) != n for v in groups.values()):
                raise StoreError(f"test set {fingerprint[:8]}: {n} items stored, but the group columns have "
                                 f"{sorted({len(v) for v in groups.values()})}")
            merged = {**(doc.get("groups") or {}), **groups}
            if merged == doc.get("groups"):
                return False
            con.execute(text("UPDATE test_sets SET data = :d WHERE fingerprint = :f"),
                        {"f": fingerprint, "d": json.dumps({**doc, "groups": merged})})
            return True

        return self._write(go, "record the test items' groups")

    def trial(self, key: str) -> dict | None:
        """One stored trial row by its full key (None when it is not stored)."""
        rows = self._read("SELECT * FROM trials WHERE key = :k", k=key)
        return _decoded(rows[0]) if rows else None

    def trials(self, study: str, keys: set[str] | None = None) -> list[dict]:
        rows = self._read("SELECT * FROM trials WHERE study = :s ORDER BY finished_at, key", s=study)
        return [_decoded(r) for r in rows if keys is None or r["key"] in keys]

    # -- pairwise comparisons by a judge ----------------------------------------------------------------------------
    def add_pairwise(self, study: str, key: str, a: str, b: str, data: dict) -> None:
        """Store one judge comparison of trials ``a`` and ``b`` under ``key`` (the trials and the judge; asked
        again, it replaces the old one)."""
        self._write(lambda con: con.execute(text(
            "INSERT INTO pairwise(key, study, a, b, data, at) VALUES (:k, :s, :a, :b, :d, :at) ON CONFLICT(key) "
            "DO UPDATE SET data = excluded.data, at = excluded.at"),
            {"k": key, "s": study, "a": a, "b": b, "d": json.dumps(data), "at": time.time()}),
            "store a pairwise comparison")

    def pairwise(self, study: str, key: str | None = None) -> list[dict]:
        """The study's stored comparisons (one, by ``key``), oldest first: ``{key, a, b, at, **data}``."""
        rows = self._read("SELECT * FROM pairwise WHERE study = :s ORDER BY at", s=study)
        return [{**json.loads(r["data"]), "key": r["key"], "a": r["a"], "b": r["b"], "at": r["at"]} for r in rows
                if key is None or r["key"] == key]

    # -- experiment tracking ----------------------------------------------------------------------------------
    def tracked_runs(self, study: str, target: str) -> dict[str, str]:
        """``{trial key: run id}`` of the study's trials reported to ``target`` (a tracker, its URI and
        experiment: ``mlflow|http://host:5000|name``)."""
        rows = self._read("SELECT key, run_id FROM tracked WHERE study = :s AND target = :t", s=study, t=target)
        return {r["key"]: r["run_id"] for r in rows}

    def set_tracked_run(self, study: str, key: str, target: str, run_id: str, experiment_id: str | None) -> None:
        """Remember that trial ``key`` is run ``run_id`` at ``target`` (replacing a run deleted there)."""
        self._write(lambda con: con.execute(text(
            "INSERT INTO tracked(key, target, study, run_id, experiment_id, at) VALUES (:k, :t, :s, :r, :e, :at) "
            "ON CONFLICT(key, target) DO UPDATE SET run_id = excluded.run_id, experiment_id = excluded.experiment_id, "
            "at = excluded.at"),
            {"k": key, "t": target, "s": study, "r": run_id, "e": experiment_id, "at": time.time()}),
            "record a tracked run")


def _put_test_set(con: Connection, fingerprint: str, truth: dict) -> None:
    """Store a test split's truth. The same fingerprint means the same texts and labels; a newer truth may add
    inputs or group columns, and group columns stored before (by a study that named other ``task.groups``) are
    kept, so one study's groups never erase another's."""
    old = con.execute(text("SELECT data FROM test_sets WHERE fingerprint = :f"), {"f": fingerprint}).first()
    kept = (json.loads(old[0]).get("groups") or {}) if old is not None else {}
    if kept:
        truth = {**truth, "groups": {**kept, **(truth.get("groups") or {})}}
    con.execute(text("INSERT INTO test_sets(fingerprint, data) VALUES (:f, :d) ON CONFLICT(fingerprint) "
                     "DO UPDATE SET data = excluded.data"), {"f": fingerprint, "d": json.dumps(truth)})


def _decoded(row) -> dict:
    """A stored trial row as a dict, its JSON columns parsed."""
    d = dict(row)
    for c in _JSON_COLS:
        d[c] = json.loads(d[c])
    return d


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return db.redact(str(orig if orig is not None else exc).strip().splitlines()[0])
