"""The store's database: one schema on SQLite (embedded default) or PostgreSQL (a team store), through SQLAlchemy Core.

Every statement is plain SQL both dialects run (``INSERT ... ON CONFLICT``, ``RETURNING``); the few aggregates
that differ are done in Python by the callers. :func:`write` runs a function in a write transaction and retries it
when the database says to try again: a PostgreSQL serialisation failure or deadlock (transactions are
``SERIALIZABLE`` there), or a SQLite write lock held past the busy timeout. Writes on SQLite take the write lock
at ``BEGIN IMMEDIATE``, so two processes never both read and then fail to upgrade.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any, Callable, TypeVar

from sqlalchemy import (Column, Float, Index, Integer, MetaData, PrimaryKeyConstraint, Table, Text, UniqueConstraint,
                        create_engine, event, text)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

metadata = MetaData()
trials = Table(
    "trials", metadata,
    Column("key", Text, primary_key=True), Column("study", Text, nullable=False),
    Column("strategy", Text, nullable=False), Column("family", Text, nullable=False),
    Column("label", Text, nullable=False), Column("params", Text, nullable=False),
    Column("seed", Integer, nullable=False), Column("train_size", Integer, nullable=False),
    Column("train_size_spec", Text, nullable=False), Column("metrics", Text, nullable=False),
    Column("cost", Text, nullable=False), Column("history", Text, nullable=False),
    Column("record", Text, nullable=False), Column("artifact", Text), Column("finished_at", Float, nullable=False),
    Index("trials_study", "study"))
items = Table("items", metadata, Column("key", Text, primary_key=True), Column("data", Text, nullable=False))
test_sets = Table("test_sets", metadata, Column("fingerprint", Text, primary_key=True),
                  Column("data", Text, nullable=False))
studies = Table("studies", metadata, Column("name", Text, primary_key=True), Column("config", Text, nullable=False),
                Column("source", Text), Column("updated_at", Float, nullable=False))
prompts = Table(
    "prompts", metadata,
    Column("name", Text, nullable=False), Column("version", Integer, nullable=False),
    Column("hash", Text, nullable=False), Column("kind", Text, nullable=False), Column("template", Text, nullable=False),
    Column("created", Float, nullable=False), Column("source", Text),
    UniqueConstraint("name", "version"), UniqueConstraint("name", "hash"))
prompt_uses = Table(
    "prompt_uses", metadata,
    Column("trial_key", Text, nullable=False), Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False), PrimaryKeyConstraint("trial_key", "name", "version"),
    Index("prompt_uses_name", "name", "version"))
claims = Table(  # a trial some driver is running now; it counts until ``expires`` (renewed by the heartbeat)
    "claims", metadata,
    Column("key", Text, primary_key=True), Column("study", Text, nullable=False), Column("owner", Text, nullable=False),
    Column("host", Text, nullable=False), Column("pid", Integer, nullable=False),
    Column("claimed_at", Float, nullable=False), Column("heartbeat", Float, nullable=False),
    Column("expires", Float, nullable=False))
failures = Table(  # the last failure of a trial not (yet) finished: what `show` reports and a rerun retries
    "failures", metadata,
    Column("key", Text, primary_key=True), Column("study", Text, nullable=False), Column("label", Text, nullable=False),
    Column("reason", Text, nullable=False), Column("owner", Text, nullable=False), Column("at", Float, nullable=False))
tracked = Table(  # a trial reported to an experiment tracker: which run holds it there (reruns reuse it)
    "tracked", metadata,
    Column("key", Text, nullable=False), Column("target", Text, nullable=False), Column("study", Text, nullable=False),
    Column("run_id", Text, nullable=False), Column("experiment_id", Text), Column("at", Float, nullable=False),
    PrimaryKeyConstraint("key", "target"), Index("tracked_study", "study", "target"))
pairwise = Table(  # two trials' answers compared by a judge (`tunebench judge --pair`): computed once, kept here
    "pairwise", metadata,
    Column("key", Text, primary_key=True), Column("study", Text, nullable=False), Column("a", Text, nullable=False),
    Column("b", Text, nullable=False), Column("data", Text, nullable=False), Column("at", Float, nullable=False),
    Index("pairwise_study", "study"))
meta = Table("meta", metadata, Column("name", Text, primary_key=True), Column("value", Text, nullable=False))

_PG = re.compile(r"^postgres(ql)?(\+\w+)?://")


def is_postgres(location: str) -> bool:
    return bool(_PG.match(str(location)))


def pg_url(location: str) -> str:
    """``postgresql://...`` as SQLAlchemy's psycopg 3 URL (an explicit ``+driver`` is kept)."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", location)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def sqlite_engine(path: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_con, _record):  # pysqlite's own transaction handling off: we emit BEGIN ourselves
        dbapi_con.isolation_level = None
        dbapi_con.execute("PRAGMA journal_mode=WAL")
        dbapi_con.execute("PRAGMA synchronous=FULL")

    @event.listens_for(engine, "begin")
    def _begin(con):
        con.exec_driver_sql("BEGIN IMMEDIATE" if con.get_execution_options().get("tb_write") else "BEGIN")

    return engine


def postgres_engine(url: str) -> Engine:
    try:
        return create_engine(pg_url(url), pool_size=4, max_overflow=4, pool_pre_ping=True, pool_recycle=1800)
    except ModuleNotFoundError:
        raise StoreError(f"{redact(url)}: a PostgreSQL store needs psycopg: pip install 'tunebench[postgres]'") from None


def create_schema(engine: Engine) -> None:
    """Create missing tables and indexes (an existing store keeps its own; new tables such as ``claims`` are
    added). Two processes creating one schema at once on PostgreSQL: the loser's duplicate is ignored."""
    for attempt in range(5):
        try:
            metadata.create_all(engine, checkfirst=True)
            return
        except DBAPIError as exc:
            if attempt == 4 or not _retryable(exc, schema=True):
                raise
            time.sleep(0.1 * (attempt + 1))


def _retryable(exc: BaseException, schema: bool = False) -> bool:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    if state in ("40001", "40P01", "23505"):  # serialization_failure, deadlock_detected, unique_violation (a
        return True                              # concurrent writer inserted the same key: the retry sees it)
    if schema and state == "42P07":  # concurrent CREATE TABLE: duplicate_table
        return True
    return "database is locked" in str(orig or exc)


def write(engine: Engine, fn: Callable[[Connection], T], *, attempts: int = 8) -> T:
    """Run ``fn(con)`` in one write transaction; retry it from the start when the database asks to.

    ``fn`` must be safe to run again: everything it wrote in a failed attempt was rolled back."""
    for attempt in range(attempts):
        try:
            with engine.connect().execution_options(tb_write=True, **_write_isolation(engine)) as con:
                with con.begin():
                    return fn(con)
        except DBAPIError as exc:
            if attempt == attempts - 1 or not _retryable(exc):
                raise
            delay = min(2.0, 0.02 * 2 ** attempt) * (0.5 + random.random())
            log.debug("store write retried in %.2fs after %s", delay, exc.orig)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _write_isolation(engine: Engine) -> dict[str, Any]:
    return {"isolation_level": "SERIALIZABLE"} if engine.dialect.name == "postgresql" else {}


def read(engine: Engine, sql: str, **params: Any) -> list[Any]:
    """Rows of one read-only statement (each a mapping by column name)."""
    with engine.connect() as con:
        return list(con.execute(text(sql), params).mappings())
