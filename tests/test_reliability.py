"""One regression test per class of hostile input that once gave a traceback, a hang, a crash or a silent wrong
load: each now gives the documented error (exit 2, naming the file, line or field) or works as written."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.config import read_study
from tunebench.data import read_table
from tunebench.errors import ConfigError, DataError
from tunebench.prompts import PromptTemplate
from tunebench.runner import load_study

from .conftest import deadline, toy_rows, write_csv

runner = CliRunner()


def validate_text(tmp_path: Path, text: str, name: str = "study.yaml") -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return validate_path(path)


def validate_path(path: Path | str) -> tuple[int, str]:
    with deadline(60):
        result = runner.invoke(app, ["validate", str(path)])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(text) < 20_000, f"an error of {len(text)} characters"
    return result.exit_code, " ".join(text.split())


@pytest.fixture()
def files(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(40, 1))
    write_csv(tmp_path / "test.csv", toy_rows(10, 2))
    return tmp_path


def study_dict(**over) -> dict:
    study = {"name": "rel", "task": {"data": {"train": "train.csv", "test": "test.csv"}, "text": "text",
                                     "label": "label"},
             "model": {"path": "never-loaded"}, "strategies": [{"zero_shot": {}}]}
    study.update(over)
    return study


def study_yaml(**over) -> str:
    return yaml.safe_dump(study_dict(**over))


# ---- wrong YAML types -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, expected", [
    ({"task": {"data": "train.csv", "text": "text", "label": "label", "labels": True}}, "task.labels"),
    ({"strategies": 5}, "strategies"),
    ({"seeds": "abc"}, "seeds"),
    ({"task": {"data": {"train": 5}, "text": "text", "label": "label"}}, "task.data.train"),
    ({"strategies": [{"zero_shot": 5}]}, "strategies"),
    ({"training": [1, 2]}, "training"),
])
def test_wrong_yaml_types_name_the_field(files, patch, expected):
    code, text = validate_text(files, study_yaml(**patch))
    assert code == 2, text
    assert expected in text and "study.yaml" in text


# ---- YAML resource attacks -------------------------------------------------------------------------------------
def billion_laughs(fan: int = 9, depth: int = 9) -> str:
    lines = ["a0: &a0 [lol]"]
    for d in range(1, depth + 1):
        lines.append(f"a{d}: &a{d} [{', '.join([f'*a{d - 1}'] * fan)}]")
    return "\n".join(lines) + f"\nname: *a{depth}\n"


def test_alias_bomb_is_refused_quickly_with_a_short_message(files):
    code, text = validate_text(files, billion_laughs())
    assert code == 2
    assert "aliases" in text and "line" in text
    assert len(text) < 1000


def test_a_smaller_alias_bomb_that_expands_does_not_echo_megabytes(files):
    code, text = validate_text(files, billion_laughs(fan=6, depth=6))  # 55k values: under the bound
    assert code == 2
    assert len(text) < 6000


def test_deep_nesting_is_refused_with_its_line(files):
    code, text = validate_text(files, "name: " + "[" * 2000 + "]" * 2000 + "\n")
    assert code == 2
    assert "nested more than" in text and "line 1" in text
    code, text = validate_text(files, "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 300)))
    assert code == 2 and "nested more than" in text


@pytest.mark.parametrize("value", ["!!float abc", "!!int 1.5.3", "!!timestamp notatime", "!!bool maybe"])
def test_bad_explicit_tags_name_the_line(files, value):
    code, text = validate_text(files, study_yaml() + f"seeds: {value}\n")
    assert code == 2
    assert "cannot read the value" in text and "line" in text


def test_unsafe_tags_are_refused(files):
    code, text = validate_text(files, study_yaml() + "seeds: !!python/object/apply:os.system ['true']\n")
    assert code == 2 and "line" in text


def test_recursive_alias_is_refused(files):
    code, text = validate_text(files, study_yaml() + "training: &t {x: *t}\n")
    assert code == 2 and "cycle" in text


# ---- paths ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    ("", "the path is empty"),
    ({}, "give the data files"),
    (None, "give the data files"),
    ("x" * 300 + ".csv", "the limit is 255"),
    ("/".join(["d" * 200] * 25) + "/t.csv", "the limit is 4,096"),
    ("tr\x00ain.csv", "NUL"),
])
def test_bad_data_paths_name_the_field(files, data, expected):
    code, text = validate_text(files, study_yaml(task={"data": data, "text": "text", "label": "label"}))
    assert code == 2, text
    assert expected in text and "task.data" in text


def test_long_study_and_store_paths(files):
    code, text = validate_path(files / ("s" * 300 + ".yaml"))
    assert code == 2 and "the limit is 255" in text
    code, text = validate_text(files, study_yaml(store="x" * 5000))
    assert code == 2 and "store" in text and "4,096" in text


@pytest.mark.parametrize("template_file, expected", [
    ("/dev/zero", "not a regular file"),
    ("bad\x00name.jinja", "NUL"),
    ("missing.jinja", "file not found"),
    (".", "is a directory"),
    ("y" * 400, "the limit is 255"),
])
def test_template_files_that_are_not_files(files, template_file, expected):
    text = study_yaml(strategies=[{"zero_shot": {"template_file": template_file}}])
    code, out = validate_text(files, text)
    assert code == 2, out
    assert expected in out and "template_file" in out and "line" in out


def test_a_fifo_template_file_does_not_block(files):
    os.mkfifo(files / "pipe.jinja")
    code, out = validate_text(files, study_yaml(strategies=[{"zero_shot": {"template_file": "pipe.jinja"}}]))
    assert code == 2 and "not a regular file" in out


def test_a_huge_template_file_is_refused_by_size(files):
    (files / "big.jinja").write_bytes(b"x" * (2 << 20))
    code, out = validate_text(files, study_yaml(strategies=[{"zero_shot": {"template_file": "big.jinja"}}]))
    assert code == 2 and "the limit is 1,048,576" in out


# ---- data -------------------------------------------------------------------------------------------------------
def test_deeply_nested_jsonl_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": ' + "[" * 10_000 + "]" * 10_000 + ', "label": "b"}\n')
    with pytest.raises(DataError, match="line 2: JSON nested too deeply"):
        read_table(path)


@pytest.mark.parametrize("name", ["train[1].csv", "a*.csv", "t?.csv", ".hidden.csv", "__dunder.csv", "{a,b}.csv"])
def test_a_data_path_is_read_literally_never_as_a_pattern(tmp_path, name):
    write_csv(tmp_path / name, [("the literal file", "pos"), ("its second row", "neg")])
    for decoy in ("train1.csv", "ab.csv", "t1.csv", "a.csv", "b.csv"):  # what a glob would also match
        write_csv(tmp_path / decoy, [("WRONG FILE", "x"), ("WRONG FILE", "y")])
    cols, _ = read_table(tmp_path / name)
    assert cols["text"] == ["the literal file", "its second row"]


def test_a_glob_path_that_matches_nothing_literally_is_not_found(tmp_path):
    write_csv(tmp_path / "train1.csv", toy_rows(10, 1))
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "train[1].csv")


def test_a_data_file_that_is_a_device_or_fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    with deadline(20):
        with pytest.raises(DataError, match="not a regular file"):
            read_table(tmp_path / "pipe.csv")
        with pytest.raises(DataError, match="not a regular file"):
            read_table("/dev/zero", "csv")


def test_data_size_limit(tmp_path, monkeypatch):
    write_csv(tmp_path / "train.csv", toy_rows(200, 1))
    monkeypatch.setenv("TUNEBENCH_MAX_DATA_MB", "0.001")
    with pytest.raises(DataError, match="over the limit.*TUNEBENCH_MAX_DATA_MB"):
        read_table(tmp_path / "train.csv")


# ---- numbers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, expected", [
    ({"seeds": [-1]}, "seeds"),
    ({"seeds": [2**63]}, "seeds"),
    ({"seeds": [2**64]}, "seeds"),
    ({"task": {"data": "train.csv", "text": "text", "label": "label", "split": {"seed": -1}}}, "task.split.seed"),
    ({"train_sizes": [2**40]}, "train_sizes"),
    ({"costs": {"volume_per_day": float("inf")}}, "costs.volume_per_day"),
    ({"costs": {"horizon_days": float("nan")}}, "costs.horizon_days"),
    ({"strategies": [{"lora": {"lr": float("inf")}}]}, "lr"),
    ({"strategies": [{"full": {"epochs": 2**40}}]}, "epochs"),
    ({"strategies": [{"lora": {"r": 2**63}}]}, "r:"),
    ({"strategies": [{"few_shot": {"temperature": float("nan")}}]}, "temperature"),
])
def test_numbers_out_of_range_name_the_field(files, patch, expected):
    code, text = validate_text(files, study_yaml(**patch))
    assert code == 2, text
    assert expected in text


def test_the_largest_valid_seed_is_accepted(files):
    code, text = validate_text(files, study_yaml(seeds=[0, 2**32 - 1]))
    assert code == 0, text


def test_recommend_json_never_prints_infinity():
    from tunebench.cli.common import finite

    assert finite({"a": float("inf"), "b": [1.0, float("nan")], "c": "x"}) == {"a": None, "b": [1.0, None], "c": "x"}


def test_flags_refuse_infinite_amounts():
    from tunebench.config.costs import parse_flag_amount
    from tunebench.errors import TunebenchError

    for text in ("inf", "nan", "1e400", "-5", "infw"):
        with pytest.raises(TunebenchError, match="--volume"):
            parse_flag_amount("--volume", text, "volume", "50k")


# ---- templates --------------------------------------------------------------------------------------------------
HOSTILE_TEMPLATES = {
    "constant folding": "{{ label ~ (7 ** (10 ** 8)) }}",
    "include": "{% include '/etc/passwd' %}",
    "codec lookup": "{{ 'x'.encode('no-such-codec') }}",
    "division by zero": "{{ 1 / 0 }}",
    "recursive macro": "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "range overflow": "{{ range(10 ** 9)|list }}",
    "huge string": "{{ 'x' * 10 ** 8 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "exponential macro": "{% macro m(n) %}{% if n %}{{ m(n-1) }}{{ m(n-1) }}{% endif %}{% endmacro %}{{ m(40) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "filter width": "{{ 'x'|center(10 ** 9) }}",
    "lipsum": "{{ lipsum(n=10 ** 6) }}",
    "internals": "{{ label.__class__.__mro__ }}",
    # values built from a big string: refused before they are built (estimated), not after
    "list of big strings": "{% set b = 'x' * 1000000 %}{{ [b] * 300 }}",
    "replace empty": "{% set b = 'x' * 1000000 %}{{ ('x' * 300)|replace('', b) }}",
    "percent tuple": "{% set b = 'x' * 1000000 %}{{ ('%s' * 300) % ((b,) * 300) }}",
    "generator join": "{% set b = 'x' * 1000000 %}{{ [b, b, b, b, b, b, b, b, b, b, b]|select|join }}",
    "format fields": "{% set b = 'x' * 1000000 %}{{ ('{0}' * 300).format(b) }}",
    "literal list": "{% set b = 'x' * 1000000 %}{% set l = [" + ", ".join(["b"] * 300) + "] %}{{ l }}",
    # time: uncounted before (a recursive loop's own calls; expensive slices)
    "recursive loop": "{% for i in [0] recursive %}{% if loop.depth < 3 %}{{ loop(range(99000)) }}{% endif %}"
                      "{% endfor %}",
    "slices": "{% set b = 'x' * 1000000 %}{% for i in range(100000) %}{% set c = b[::-1] %}{% endfor %}",
    "lipsum words": "{{ lipsum(10000, False, 9999, 10000) }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_templates_are_bounded_errors(name):
    with deadline(20):
        tpl = PromptTemplate(HOSTILE_TEMPLATES[name], "strategies[0].few_shot: template")
        with pytest.raises(ConfigError, match=r"strategies\[0\]\.few_shot: template"):
            tpl.render({"label": "pos", "input": "a text"})


@pytest.mark.parametrize("template, expected", [
    ("{{ input|truncate(20000) }}", "good"),
    ("{{ '%d tokens'|format(32768) }}", "32768 tokens"),
    ("{{ 'Order 12345: %s' % input }}", "Order 12345: good"),
    ("{{ 'Year 20240: {}'.format(input) }}", "Year 20240: good"),
    ("{{ input|center(20) }}|", "good        |"),
    ("{% for l in label_names recursive %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }} {% else %}none"
     "{% endfor %}", "1/2/2 2/2/1"),
    ("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}", "a=1"),
    ("{% macro m(x) %}[{{ x ~ caller() }}]{% endmacro %}{% call m(input) %}!{% endcall %}", "[good!]"),
])
def test_templates_with_big_numbers_and_jinja_features_render(template, expected):
    out = PromptTemplate(template).render({"input": "good", "label_names": ["neg", "pos"]})
    assert out == expected


def test_ordinary_templates_still_render():
    text = ("{{ instruction }}|{% for l in label_names %}{{ loop.index }}={{ l }} {% endfor %}|{{ 'a' ~ input }}|"
            "{{ '%s-%d' % ('x', 2) }}|{{ '{}!'.format(input) }}|{{ input|upper|truncate(9) }}|{{ 2 ** 10 }}")
    out = PromptTemplate(text).render({"instruction": "Classify.", "label_names": ["neg", "pos"], "input": "good"})
    assert out == "Classify.|1=neg 2=pos |agood|x-2|good!|GOOD|1024"


@pytest.mark.parametrize("template, expected", [
    ("{{ 1 / 0 }} {{ input }}", "ZeroDivisionError"),
    ("{{ input }} {{ no_such_variable }}", "no_such_variable"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}{{ input }}", "recursion"),
])
def test_templates_are_rendered_on_one_example_at_validate_time(files, template, expected):
    code, text = validate_text(files, study_yaml(model={"backend": "causal", "path": "never-loaded"},
                                                 strategies=[{"few_shot": {"template": template}}]))
    assert code == 2, text
    assert "strategies[0].few_shot" in text and expected in text and "first training example" in text


# ---- renamed keys -----------------------------------------------------------------------------------------------
def test_old_templates_key_still_works_with_a_warning(files, caplog):
    old = study_dict(strategies=[{"zero_shot": {"templates": ["This text is {label}.", "{ label } ({description})"]}}])
    new = study_dict(strategies=[{"zero_shot": {"label_templates": ["This text is {{ label }}.",
                                                                    "{{ label }} ({{ description }})"]}}])
    for name, study in (("old.yaml", old), ("new.yaml", new)):
        (files / name).write_text(yaml.safe_dump(study), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        cfg_old, base = load_study(files / "old.yaml")
    assert any("'templates' is deprecated; write 'label_templates'" in r.getMessage() for r in caplog.records)
    cfg_new, _ = load_study(files / "new.yaml")
    from tunebench.runner import Study

    keys_old = [t.key for t in Study(cfg_old, base_dir=base, store=None).plan()]
    keys_new = [t.key for t in Study(cfg_new, base_dir=base, store=None).plan()]
    assert keys_old == keys_new and len(keys_old) == 2  # the same trials: results stored either way are shared
    code, text = validate_path(files / "old.yaml")
    assert code == 0 and "deprecated" in text


def test_old_and_new_key_together_is_an_error(files):
    code, text = validate_text(files, study_yaml(strategies=[{"zero_shot": {"templates": ["{label}"],
                                                                            "label_templates": ["{{ label }}"]}}]))
    assert code == 2 and "label_templates" in text


def test_read_study_error_lists_are_bounded(files):
    many = {f"unknown_{i}": i for i in range(200)}
    with pytest.raises(ConfigError) as info:
        (files / "many.yaml").write_text(study_yaml(**many), encoding="utf-8")
        read_study(files / "many.yaml")
    assert "more error(s)" in str(info.value) and len(str(info.value)) < 5000


@pytest.mark.parametrize("argv", [["show", "x", "--store", "a" * 5000], ["ls", "--store", "/tmp/" + "b" * 300],
                                  ["store", "status", "--store", "c" * 5000]])
def test_long_store_paths_on_the_command_line(argv):
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2
    assert "results store (--store or store:)" in " ".join(result.output.split())


def test_merge_keys_keep_their_line_numbers(files):
    text = "defaults: &d {seed: 0, dev: 0.1}\n" + study_yaml()
    text = text.replace("  label: label\n", "  label: label\n  split:\n    <<: *d\n    seed: -5\n", 1)
    path = files / "merge.yaml"
    path.write_text(text, encoding="utf-8")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "seed: -5" in ln)
    code, out = validate_path(path)
    assert code == 2 and f"merge.yaml line {line}: task.split.seed" in out


def test_long_numbers_and_deep_alias_chains(files):
    code, out = validate_text(files, study_yaml() + "seeds: [" + "1:" * 100_000 + "1]\n")
    assert code == 2 and "numbers in a study are at most 100 characters" in out
    chain = "x0: &a0 " + "[" * 50 + "]" * 50 + "\n" + "".join(
        f"x{i}: &a{i} " + "[" * 50 + f"*a{i - 1}" + "]" * 50 + "\n" for i in range(1, 30))
    code, out = validate_text(files, study_yaml() + chain)
    assert code == 2 and "once its aliases" in out


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-5", "0", "lots"])
def test_a_bad_data_size_limit_is_a_clean_error(tmp_path, monkeypatch, value):
    write_csv(tmp_path / "train.csv", toy_rows(10, 1))
    monkeypatch.setenv("TUNEBENCH_MAX_DATA_MB", value)
    with pytest.raises(DataError, match="TUNEBENCH_MAX_DATA_MB: expected a positive number"):
        read_table(tmp_path / "train.csv")


def test_a_pattern_path_is_parsed_through_one_stable_link(tmp_path):
    from tunebench.data import _literal

    write_csv(tmp_path / "tr[1].csv", toy_rows(10, 1))
    with _literal(tmp_path / "tr[1].csv") as first, _literal(tmp_path / "tr[1].csv") as second:
        assert first == second and Path(first).resolve() == (tmp_path / "tr[1].csv").resolve()
    with _literal(tmp_path / "plain.csv") as plain:  # plain paths (non-ASCII included) are read directly
        assert plain == str((tmp_path / "plain.csv").resolve())
    with _literal(tmp_path / "données.csv") as accented:
        assert accented.endswith("données.csv")
