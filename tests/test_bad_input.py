"""Bad input gives a clear error that names the file, line or field and what to do, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app

from .conftest import toy_rows, write_csv

runner = CliRunner()


def study_file(tmp_path: Path, data: dict, **task) -> Path:
    study = {"name": "bad", "task": {"data": data, "text": "text", "label": "label", **task},
             "model": {"path": "never-loaded"}, "strategies": [{"zero_shot": {}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def validate(path: Path):
    result = runner.invoke(app, ["validate", str(path)])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(text.split())


@pytest.fixture()
def good(tmp_path):
    return {"train": str(write_csv(tmp_path / "train.csv", toy_rows(40, 1))),
            "test": str(write_csv(tmp_path / "test.csv", toy_rows(10, 2)))}


def test_valid_study_passes(tmp_path, good):
    code, text = validate(study_file(tmp_path, good))
    assert code == 0, text
    assert "valid" in text


def test_missing_file(tmp_path, good):
    code, text = validate(study_file(tmp_path, {**good, "dev": str(tmp_path / "nope.csv")}))
    assert code == 2
    assert "nope.csv" in text and "not found" in text


def test_malformed_csv_names_the_line(tmp_path, good):
    bad = tmp_path / "train.csv"
    bad.write_text('text,label\n"fine row",pos\nthis row, has, too many,neg\n"ok",neg\n', encoding="utf-8")
    code, text = validate(study_file(tmp_path, {**good, "train": str(bad)}))
    assert code == 2
    assert "train.csv line 3" in text and "fields" in text


def test_unterminated_quote(tmp_path, good):
    bad = tmp_path / "train.csv"
    bad.write_text('text,label\n"never closed,pos\nother,neg\n', encoding="utf-8")
    code, text = validate(study_file(tmp_path, {**good, "train": str(bad)}))
    assert code == 2 and "train.csv" in text


def test_missing_column_lists_the_columns(tmp_path, good):
    code, text = validate(study_file(tmp_path, good, text="sentence"))
    assert code == 2
    assert "['sentence']" in text and "not found" in text and "'text'" in text


def test_unknown_label_in_test(tmp_path, good):
    test = write_csv(tmp_path / "test.csv", toy_rows(6, 2) + [("a brand new kind of row", "neutral")])
    code, text = validate(study_file(tmp_path, {**good, "test": str(test)}))
    assert code == 2
    assert "test.csv line 8" in text and "neutral" in text


def test_label_not_declared(tmp_path, good):
    code, text = validate(study_file(tmp_path, good, labels={"pos": "positive"}))
    assert code == 2
    assert "train.csv line" in text and "'neg'" in text and "task.labels" in text


def test_empty_file(tmp_path, good):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    code, text = validate(study_file(tmp_path, {**good, "train": str(empty)}))
    assert code == 2 and "empty.csv" in text and "empty" in text


def test_header_only_file(tmp_path, good):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n", encoding="utf-8")
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2 and "header.csv" in text and "no examples" in text


def test_non_utf8_names_the_line(tmp_path, good):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,pos\ncaf\xe9 au lait,neg\n".encode("latin-1"))
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2
    assert "latin1.csv line 3" in text and "UTF-8" in text


def test_single_label(tmp_path, good):
    path = write_csv(tmp_path / "one.csv", [(f"text number {i}", "pos") for i in range(10)])
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2
    assert "one.csv" in text and "single label" in text


def test_empty_text_row(tmp_path, good):
    path = write_csv(tmp_path / "blank.csv", toy_rows(5, 1) + [("   ", "pos")])
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2 and "blank.csv line 7" in text and "empty text" in text


def test_bad_yaml_names_line_and_field(tmp_path, good):
    path = study_file(tmp_path, good)
    study = yaml.safe_load(path.read_text())
    study["strategies"] = [{"zero_shot": {}}, {"lora": {"rank": 8}}]
    study["seeds"] = "zero"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    code, text = validate(path)
    assert code == 2 and "study.yaml line" in text and "seeds" in text
    study["seeds"] = [0]
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    code, text = validate(path)
    assert code == 2 and "unknown parameter 'rank'" in text and "strategies[1].lora" in text
    assert "line" in text


def test_unknown_strategy(tmp_path, good):
    path = study_file(tmp_path, good)
    study = yaml.safe_load(path.read_text())
    study["strategies"] = [{"telepathy": {}}]
    path.write_text(yaml.safe_dump(study))
    code, text = validate(path)
    assert code == 2 and "unknown strategy 'telepathy'" in text and "lora" in text


def test_warnings_for_duplicates_and_leakage(tmp_path):
    rows = toy_rows(40, 1)
    train = write_csv(tmp_path / "train.csv", rows + rows[:3])
    test = write_csv(tmp_path / "test.csv", rows[:2] + toy_rows(10, 2))
    dev = write_csv(tmp_path / "dev.csv", toy_rows(10, 3))
    from tunebench.config import TaskConfig
    from tunebench.data import load_task

    cfg = TaskConfig(data={"train": str(train), "dev": str(dev), "test": str(test)}, text="text", label="label")
    data = load_task(cfg)
    assert data.checks["duplicates_train"] == 3
    assert data.checks["overlap_train_test"] == 2
    assert any("leakage" in w for w in data.warnings)
    cleaned = load_task(cfg.model_copy(update={"drop_leakage": True}))
    assert cleaned.checks["leakage_dropped"] >= 2
    assert not set(cleaned.train.texts) & set(cleaned.test.texts)
    assert len(cleaned.test) == len(data.test)  # the test split is never changed


def test_imbalance_warning(tmp_path):
    rows = [(f"good thing {i}", "pos") for i in range(60)] + [(f"bad thing {i}", "neg") for i in range(4)]
    train = write_csv(tmp_path / "train.csv", rows)
    from tunebench.config import TaskConfig
    from tunebench.data import load_task

    data = load_task(TaskConfig(data=str(train), text="text", label="label"))
    assert data.checks["imbalance_ratio"] > 10
    assert any("imbalance" in w for w in data.warnings)


def test_run_on_bad_data_leaves_no_traceback(tmp_path, good):
    path = study_file(tmp_path, {**good, "train": str(tmp_path / "missing.csv")})
    result = runner.invoke(app, ["run", str(path), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "missing.csv" in result.output and "Traceback" not in result.output


def test_bad_jsonl_names_the_line(tmp_path, good):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "broken", "label": \n', encoding="utf-8")
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2 and "train.jsonl line 2" in text and "JSON" in text


def test_jsonl_and_parquet_are_read(tmp_path):
    import pandas as pd

    from tunebench.config import TaskConfig
    from tunebench.data import load_task

    rows = toy_rows(30, 4)
    df = pd.DataFrame(rows, columns=["text", "label"])
    df.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "train.parquet")
    for name in ("train.jsonl", "train.parquet"):
        data = load_task(TaskConfig(data=str(tmp_path / name), text="text", label="label"))
        assert len(data.train) + len(data.dev) + len(data.test) == 30
        assert data.label_names == ["neg", "pos"]


def test_multi_field_text_template(tmp_path):
    from tunebench.config import TaskConfig
    from tunebench.data import load_task

    path = write_csv(tmp_path / "two.csv", [(f"title {i}", f"body {i}", "pos" if i % 2 else "neg") for i in range(20)],
                     header=("title", "body", "label"))
    data = load_task(TaskConfig(data=str(path), text=["title", "body"], text_template="{title}: {body}",
                                label="label"))
    assert all(t.startswith("title ") and ": body " in t for t in data.train.texts)


def test_line_numbers_follow_multiline_fields_and_blank_lines(tmp_path, good):
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"two\nlines",pos\n\nfine,neg\n"",pos\n', encoding="utf-8")
    code, text = validate(study_file(tmp_path, {**good, "train": str(path)}))
    assert code == 2 and "multi.csv line 6" in text and "empty text" in text


@pytest.mark.parametrize("patch, expected", [
    ({"seeds": []}, "seeds"),
    ({"train_sizes": []}, "train_sizes"),
    ({"model": {"path": "x", "device": "gpu"}}, "model.device"),
])
def test_study_fields_are_checked(tmp_path, good, patch, expected):
    path = study_file(tmp_path, good)
    study = {**yaml.safe_load(path.read_text()), **patch}
    path.write_text(yaml.safe_dump(study))
    code, text = validate(path)
    assert code == 2 and expected in text


def test_drop_leakage_that_empties_a_class(tmp_path):
    rows = toy_rows(20, 1)
    train = write_csv(tmp_path / "train.csv", rows)
    path = study_file(tmp_path, {"train": str(train), "dev": str(train), "test": str(train)}, drop_leakage=True)
    code, text = validate(path)
    assert code == 2 and "drop_leakage" in text and "train.csv" in text


@pytest.mark.parametrize("strategy, expected", [
    ({"lora": {"target_modules": ["no_such_module"]}}, "cannot prepare the model"),
    ({"soft_prompt": {"max_length": 60}}, "exceeds the model's 64 positions"),
])
def test_strategy_mistakes_fail_before_any_trial(tmp_path, good, tiny_model_dir, strategy, expected):
    path = study_file(tmp_path, good)
    study = yaml.safe_load(path.read_text())
    study["model"] = {"path": str(tiny_model_dir), "precision": "fp32"}
    study["strategies"] = [{"zero_shot": {}}, strategy]
    path.write_text(yaml.safe_dump(study))
    result = runner.invoke(app, ["run", str(path), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output
    from tunebench.store import Store

    assert Store(tmp_path / "runs").trials("bad") == []  # nothing ran
