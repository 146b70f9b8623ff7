"""Fuzzing the input boundary with Hypothesis: study files, data files and templates.

Each target draws hostile inputs (wrong types, huge and non-finite numbers, odd paths, YAML tags and aliases,
malformed rows, templates built from a grammar of Jinja pieces) and checks the one promise the README makes:
a valid result or a ``TunebenchError`` that names where, in bounded time and with a bounded message; never
another exception, a hang or a crash.

CI runs a fixed, derandomised budget (``TUNEBENCH_FUZZ_EXAMPLES``, default 300 per target); for a long local
run: ``TUNEBENCH_FUZZ_EXAMPLES=5000 TUNEBENCH_FUZZ_RANDOM=1 pytest tests/test_fuzz_config.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunebench.config import TaskConfig
from tunebench.data import load_task
from tunebench.errors import TunebenchError
from tunebench.prompts import PromptTemplate
from tunebench.runner import Study, load_study
from tunebench.sandbox import MAX_TEXT

from .conftest import deadline, toy_rows, write_csv

EXAMPLES = int(os.environ.get("TUNEBENCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TUNEBENCH_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much],
                database=None, print_blob=True)
MAX_MESSAGE = 20_000
RAN: dict[str, int] = {}


def check_error(exc: TunebenchError, *names: str) -> None:
    msg = str(exc)
    assert msg.strip(), "an empty error message"
    assert len(msg) < MAX_MESSAGE, f"an error of {len(msg):,} characters"
    assert "Traceback" not in msg
    assert any(n in msg for n in names), f"the error names none of {names}: {msg[:500]}"


# ---- study files -------------------------------------------------------------------------------------------------
no_surrogates = st.characters(blacklist_categories=("Cs",))
hostile_text = st.one_of(
    st.text(no_surrogates, max_size=30),
    st.sampled_from(["", " ", "all", "train[1].csv", "a*.csv", "../../etc/passwd", "/dev/zero", "x" * 300,
                     "{{ label }}", "{% for %}", "{{ 1/0 }}", "\x00", "~", "postgresql://u@h/db", "s3://b/p",
                     "causal", "openai", "encoder", "default", "classification", "generation", "label", "text"]),
)
hostile_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 1e300, -0.0]),
)
scalars = st.one_of(st.none(), st.booleans(), hostile_number, hostile_text)
yaml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)), max_leaves=12)

STRATEGIES = ["zero_shot", "few_shot", "chain_of_thought", "prompt_search", "linear_probe", "lora", "full",
              "soft_prompt", "gradual_unfreeze", "hybrid", "no_such_strategy"]
PARAMS = ["lr", "epochs", "batch_size", "r", "alpha", "shots", "template", "template_file", "label_templates",
          "templates", "max_length", "temperature", "top_p", "max_new_tokens", "stop", "virtual_tokens", "predict",
          "tune", "prompt", "tune_params", "prompt_params", "search", "models", "prompt", "selection", "dropout",
          "warmup_ratio", "early_stopping", "metric", "weight_decay", "budget", "trials", "unknown_key"]
PATHS = [("name",), ("task",), ("task", "type"), ("task", "data"), ("task", "data", "train"), ("task", "data", "dev"),
         ("task", "data", "test"), ("task", "text"), ("task", "label"), ("task", "labels"), ("task", "target"),
         ("task", "split"), ("task", "split", "seed"), ("task", "split", "dev"), ("task", "instruction"),
         ("task", "text_template"), ("task", "format"), ("task", "drop_leakage"), ("task", "groups"), ("model",), ("model", "backend"),
         ("model", "path"), ("model", "precision"), ("models",), ("strategies",), ("seeds",), ("train_sizes",),
         ("store",), ("artifacts",), ("training",), ("training", "lr"), ("training", "epochs"), ("costs",),
         ("costs", "volume_per_day"), ("costs", "api"), ("consistency",), ("consistency", "max_items"),
         ("consistency", "counterfactual"), ("consistency", "counterfactual", "pairs_file"),
         ("consistency", "counterfactual", "pairs"),
         ("execution",), ("execution", "executor"), ("cv",), ("unknown",)]


def set_path(doc: dict, path: tuple, value, delete: bool) -> None:
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@st.composite
def study_documents(draw) -> str:
    doc = {"name": "fuzz", "task": {"data": {"train": "train.csv", "test": "test.csv"}, "text": "text",
                                    "label": "label"},
           "model": {"backend": draw(st.sampled_from(["encoder", "causal"])), "path": "never-loaded"},
           "strategies": [{draw(st.sampled_from(STRATEGIES[:-1])): {}}]}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["path", "param", "strategy"]))
        if kind == "path":
            set_path(doc, draw(st.sampled_from(PATHS)), draw(yaml_values), draw(st.booleans()))
        elif kind == "param":
            entry = doc["strategies"][0] if isinstance(doc.get("strategies"), list) and doc["strategies"] else None
            if isinstance(entry, dict) and entry and isinstance(next(iter(entry.values())), dict):
                next(iter(entry.values()))[draw(st.sampled_from(PARAMS))] = draw(yaml_values)
        else:
            doc["strategies"] = [{draw(st.sampled_from(STRATEGIES)): draw(st.one_of(
                st.dictionaries(st.sampled_from(PARAMS), yaml_values, max_size=3), yaml_values))}]
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    if draw(st.integers(0, 4)) == 0:  # raw-text damage: YAML syntax, tags, anchors and aliases where they land
        pos = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(["&a ", "*a", "!!float ", "!!python/object:os.system ", "[", "{", "}", ": ",
                                      "\t", "- ", "'", '"', "\n  x: *a\n", "%YAML 1.1\n", "? ", "!!binary ",
                                      "&b [*b]", "\ufeff", "\x85"]))
        text = text[:pos] + piece + text[pos:]
    return text


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-study")
    write_csv(d / "train.csv", toy_rows(24, 1))
    write_csv(d / "test.csv", toy_rows(8, 2))
    (d / "t.jinja").write_text("Text: {{ input }}\nAnswer:", encoding="utf-8")
    return d


@FUZZ
@given(text=study_documents())
def test_fuzz_study_files(study_dir, text):
    RAN["study"] = RAN.get("study", 0) + 1
    path = study_dir / "study.yaml"
    path.write_text(text, encoding="utf-8")
    with deadline(60):
        try:
            cfg, base = load_study(path)
            Study(cfg, base_dir=base, store=None).plan()
        except TunebenchError as exc:
            check_error(exc, "study.yaml", str(study_dir), "strategies[", "training", "task.")


# ---- data files --------------------------------------------------------------------------------------------------
cell = st.one_of(st.text(no_surrogates, max_size=20),
                 st.sampled_from(["", '"', '""', ",", "\t", "\n", "\r\n", "pos", "neg", "\x00", "NaN", "null"]))


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl"]))
    if draw(st.integers(0, 5)) == 0:
        return fmt, draw(st.binary(max_size=200))
    header = draw(st.sampled_from([["text", "label"], ["label", "text"], ["text"], ["text", "label", "x"],
                                   ["", "label"], ["text", "text"]]))
    width = len(header)
    good_row = st.tuples(cell, st.sampled_from(["pos", "neg"])).map(list)
    rows = draw(st.lists(st.one_of(good_row, st.lists(cell, min_size=width, max_size=width),
                                   st.lists(cell, max_size=4)), max_size=8))
    if fmt == "jsonl":
        values = st.one_of(cell, hostile_number, st.none(), st.lists(cell, max_size=3))
        lines = [json.dumps(dict(zip(header, r)) if draw(st.booleans()) else draw(values)) for r in rows]
        if draw(st.integers(0, 6)) == 0:
            lines.append("[" * draw(st.integers(1, 5000)))
        return fmt, "\n".join(lines).encode("utf-8")
    delim = "\t" if fmt == "tsv" else ","
    body = "\n".join(delim.join(r) for r in [header, *rows])
    return fmt, body.encode("utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-data")
    write_csv(d / "test.csv", toy_rows(8, 2))
    return d


@FUZZ
@given(file=data_files(), labels=st.sampled_from([None, ["pos", "neg"]]))
def test_fuzz_data_files(data_dir, file, labels):
    RAN["data"] = RAN.get("data", 0) + 1
    fmt, content = file
    path = data_dir / f"train.{fmt}"
    path.write_bytes(content)
    task = TaskConfig(data={"train": path.name, "test": "test.csv"}, text="text", label="label", labels=labels)
    with deadline(60):
        try:
            data = load_task(task, data_dir)
        except TunebenchError as exc:
            check_error(exc, "train.", "test.csv")
        else:
            assert len(data.train) >= 1 and len(data.test) >= 1


# ---- templates ---------------------------------------------------------------------------------------------------
small_int = st.one_of(st.integers(-3, 12), st.sampled_from([10**3, 10**5, 10**6, 10**9, 10**18]))
expr = st.deferred(lambda: st.one_of(
    st.sampled_from(["input", "label", "instruction", "label_names", "demonstrations", "labels", "missing",
                     "'x'", "''", "[1, 2]", "{}", "none", "loop", "range(3)", "lipsum(2)", "namespace(a=1)"]),
    small_int.map(str),
    st.tuples(expr, st.sampled_from(["~", "*", "**", "+", "-", "/", "//", "%", " and ", " in "]), expr).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"),
    st.tuples(expr, st.sampled_from(["upper", "length", "join", "list", "center", "indent", "truncate", "replace",
                                     "first", "sum", "int", "string", "tojson", "wordwrap", "batch", "format"]),
              st.lists(small_int.map(str), max_size=2)).map(
        lambda t: f"({t[0]}|{t[1]}{'(' + ', '.join(t[2]) + ')' if t[2] else ''})"),
    st.tuples(expr, st.sampled_from(["upper", "split", "replace", "center", "ljust", "format", "join", "count",
                                     "__class__", "mro", "encode"]), st.lists(expr, max_size=2)).map(
        lambda t: f"{t[0]}.{t[1]}({', '.join(t[2])})"),
    st.tuples(expr, expr).map(lambda t: f"{t[0]}[{t[1]}]"),
))
statement = st.deferred(lambda: st.one_of(
    expr.map(lambda e: "{{ " + e + " }}"),
    st.text(no_surrogates, max_size=12),
    st.tuples(expr, st.lists(statement, max_size=3)).map(
        lambda t: "{% for i in " + t[0] + " %}" + "".join(t[1]) + "{% endfor %}"),
    st.tuples(expr, st.lists(statement, max_size=3)).map(lambda t: "{% if " + t[0] + " %}" + "".join(t[1]) +
                                                         "{% endif %}"),
    st.tuples(expr, st.lists(statement, max_size=2)).map(
        lambda t: "{% macro m(n) %}" + "".join(t[1]) + "{{ m(n) }}{% endmacro %}{{ m(" + t[0] + ") }}"),
    expr.map(lambda e: "{% set ns = namespace(s='ab') %}{% for i in range(" + e + ") %}{% set ns.s = ns.s ~ ns.s %}"
             "{% endfor %}{{ ns.s|length }}"),
    st.sampled_from(["{% include 'x' %}", "{% extends 'y' %}", "{% raw %}{{{% endraw %}", "{{", "{%", "}}",
                     "{# c #}", "{% set x = 1 %}{{ x }}", "{{ self }}", "{{ caller() }}"]),
))


@FUZZ
@given(parts=st.lists(statement, min_size=1, max_size=5))
def test_fuzz_templates(parts):
    RAN["templates"] = RAN.get("templates", 0) + 1
    source = "".join(parts)
    variables = {"input": "a text", "label": "pos", "instruction": "Classify.", "label_names": ["neg", "pos"],
                 "labels": [{"name": "neg", "description": ""}], "demonstrations": [{"input": "x", "output": "pos"}]}
    with deadline(30):
        try:
            out = PromptTemplate(source, "strategies[0].few_shot: template").render(variables)
        except TunebenchError as exc:
            check_error(exc, "strategies[0].few_shot: template")
        else:
            assert isinstance(out, str) and len(out) <= MAX_TEXT


# ---- command-line flags ------------------------------------------------------------------------------------------
COMMANDS = [["show"], ["ls"], ["report"], ["recommend"], ["store", "status"], ["store", "copy"], ["prompts", "list"],
            ["prompts", "show"], ["prompts", "diff"], ["prompts", "log"], ["prompts", "export"], ["prompts", "import"],
            ["export"], ["validate"], ["strategies"]]
FLAGS = ["--store", "--metric", "--volume", "--horizon", "--latency-p95", "--min-accuracy", "--budget", "--json",
         "--trial", "--format", "--out", "--api-price", "--concurrency", "--serve-per-hour", "--train-per-hour",
         "--study", "--artifacts", "--all", "--force", "--name", "--ids", "--prompts", "--max-group-gap", "-v"]
arg_text = st.one_of(hostile_text.filter(lambda s: "\x00" not in s), st.just("fuzz"),
                     st.sampled_from(["inf", "-inf", "nan", "1e400", "-1", "0", "50k", "90d", "100ms", "$5",
                                      "x=1/2", "x=inf/0", "fuzz", "fuzz@1", "fuzz@#zz", "a" * 5000, "/" * 3]))


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A store holding one small finished study ("fuzz": zero-shot and a linear probe on the tiny encoder)."""
    d = tmp_path_factory.mktemp("fuzz-cli")
    write_csv(d / "train.csv", toy_rows(24, 1))
    write_csv(d / "test.csv", toy_rows(8, 2))
    study = {"name": "fuzz", "task": {"data": {"train": "train.csv", "test": "test.csv"}, "text": "text",
                                      "label": "label"},
             "model": {"path": str(tiny_model_dir), "precision": "fp32"}, "store": "runs",
             "strategies": ["zero_shot", {"linear_probe": {"epochs": 1}}]}
    (d / "study.yaml").write_text(yaml.safe_dump(study), encoding="utf-8")
    cfg, base = load_study(d / "study.yaml")
    Study(cfg, base_dir=base).run()
    (d / "cwd").mkdir()
    return d / "runs"


@FUZZ
@st.composite
def cli_args(draw) -> list[str]:
    """A study name (usually the real one), then flags with hostile values, sometimes a stray word."""
    args = [draw(st.one_of(st.just("fuzz"), arg_text))] if draw(st.integers(0, 4)) else []
    for flag, value in draw(st.lists(st.tuples(st.sampled_from(FLAGS), arg_text), max_size=3)):
        args += [flag] if flag in ("--json", "--all", "--force", "--ids", "--prompts", "-v") else [flag, value]
    if draw(st.integers(0, 5)) == 0:
        args.append(draw(arg_text))
    return args


@FUZZ
@given(command=st.sampled_from(COMMANDS), args=cli_args(), own_store=st.booleans())
def test_fuzz_cli_flags(cli_store, command, args, own_store):
    """Any flags and values to the commands that read (not ``run``/``serve``): a result or a clean error."""
    from typer.testing import CliRunner

    from tunebench.cli import app

    RAN["cli"] = RAN.get("cli", 0) + 1
    here = os.getcwd()
    os.chdir(cli_store.parent / "cwd")  # whatever a command writes (stores, exports, reports) stays in there
    try:
        with deadline(60):
            store = ["--store", str(cli_store)] if own_store else []
            result = CliRunner().invoke(app, [*command, *args, *store])
    finally:
        os.chdir(here)
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and "internal error" not in out
    assert result.exit_code in (0, 1, 2), (result.exit_code, out[-500:])


def test_fuzz_budget_was_spent():
    """The fuzz targets above ran their whole budget (this runs after them, in file order)."""
    ran = {k: RAN.get(k, 0) for k in ("study", "data", "templates", "cli")}
    print(f"fuzz examples run: {ran} (budget {EXAMPLES} per target), failures: 0")
    if any(v == 0 for v in ran.values()):
        pytest.skip("run with the fuzz targets (a -k selection left some out)")
    assert all(v >= min(EXAMPLES, 50) for v in ran.values()), ran
