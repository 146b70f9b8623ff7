"""Studies with causal models through the CLI: mixed encoder + causal ladders, generation, prompts, Accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_csv
from tests.test_causal import colour_rows
from tunebench.cli import app

runner = CliRunner()
PROMPT = "{{ instruction }}\nWord: {{ input }}\nColour:"


@pytest.fixture()
def colour_files(tmp_path) -> dict[str, str]:
    return {k: str(write_csv(tmp_path / f"{k}.csv", colour_rows(n, s)))
            for k, n, s in (("train", 64, 1), ("dev", 16, 2), ("test", 16, 3))}


def flat(result) -> str:
    """CLI output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def write_study(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def test_mixed_encoder_and_causal_study_runs_end_to_end(tmp_path, colour_files, tiny_model_dir, tiny_llama_dir):
    (tmp_path / "prompt.j2").write_text(PROMPT, encoding="utf-8")
    study = write_study(tmp_path, {
        "name": "mixed",
        "task": {"data": colour_files, "text": "text", "label": "label", "instruction": "Name the colour."},
        "models": [{"name": "bert", "backend": "encoder", "path": str(tiny_model_dir), "precision": "fp32"},
                   {"name": "llama", "backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32",
                    "retriever": str(tiny_model_dir)}],
        "training": {"epochs": 1, "batch_size": 16, "max_length": 64},
        "strategies": [{"zero_shot": {"template_file": "prompt.j2"}},
                       {"few_shot": {"shots": 1, "selection": "retrieved", "models": "llama"}},
                       {"chain_of_thought": {"max_new_tokens": 8}},
                       {"lora": {"r": 4}},
                       {"hybrid": {"tune": "lora", "prompt": "few_shot", "prompt_params": {"shots": 1}}}],
        "store": "runs",
    })
    result = runner.invoke(app, ["run", str(study), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    got = sorted((t["strategy"], t["model"]) for t in doc["trials"])
    assert got == sorted([("zero_shot", "bert"), ("zero_shot", "llama"), ("few_shot", "llama"),
                          ("chain_of_thought", "llama"), ("lora", "bert"), ("lora", "llama"), ("hybrid", "llama")])
    by = {(t["strategy"], t["model"]): t for t in doc["trials"]}
    assert by[("zero_shot", "llama")]["label"].endswith("@llama")
    assert by[("zero_shot", "llama")]["prompt"]["template"] == PROMPT  # read from the file
    assert "Word: " in by[("zero_shot", "llama")]["prompt"]["example"]
    assert by[("few_shot", "llama")]["prompt"]["demonstrations"] == "retrieved"
    cot = by[("chain_of_thought", "llama")]
    assert 0 < cot["cost"]["completion_tokens_mean"] <= 8 and "format_failure_rate" in cot["metrics"]
    for t in doc["trials"]:
        assert t["cost"]["prompt_tokens_mean"] > 0 and t["cost"]["prompt_tokens_p95"] >= t["cost"]["prompt_tokens_mean"]
    # prompts: larger than the encoder's plain inputs, and the few-shot hybrid's larger than zero-shot's
    assert by[("hybrid", "llama")]["cost"]["prompt_tokens_mean"] > by[("zero_shot", "llama")]["cost"]["prompt_tokens_mean"]
    assert by[("lora", "llama")]["history"] and by[("hybrid", "llama")]["history"]

    shown = runner.invoke(app, ["show", str(study), "--prompts"])
    assert shown.exit_code == 0, shown.output
    assert "Word: {{ input }}" in shown.stdout and "Name the colour." in shown.stdout
    assert "chain_of_thought" in shown.stdout and "Reasoning:" in shown.stdout
    board = runner.invoke(app, ["show", str(study)])
    assert "tokens/req" in board.stdout and "@bert" in board.stdout


def test_generation_study_reports_generation_metrics(tmp_path, tiny_llama_dir):
    rows = [(w, f"the {c}") for w, c in colour_rows(48, 4)]
    data = str(write_csv(tmp_path / "gen.jsonl.csv", rows, header=("word", "phrase")))
    study = write_study(tmp_path, {
        "name": "gen",
        "task": {"type": "generation", "data": data, "text": "word", "target": "phrase"},
        "model": {"name": "llm", "backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
        "strategies": [{"zero_shot": {"max_new_tokens": 4}}, {"full": {"epochs": 1, "max_new_tokens": 4}},
                       {"zero_shot": {"max_new_tokens": 4, "temperature": 1.5}}],
        "consistency": {"perturbations": ["case", "typo"], "max_items": 8, "samples": 3},
        "store": "runs",
    })
    result = runner.invoke(app, ["run", str(study), "--json"])
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 3
    for t in trials:
        assert set(t["metrics"]) >= {"exact_match", "token_f1", "rouge_l", "bleu", "chrf", "perplexity"}
        assert 0 < t["cost"]["completion_tokens_mean"] <= 4
    full = next(t for t in trials if t["strategy"] == "full")
    assert "dev_loss" in full["metrics"]
    board = runner.invoke(app, ["show", str(study)])
    assert "exact_match" in board.stdout and "rouge_l" in board.stdout

    # the evidence for generation: intervals on ROUGE-L, flip rates on generated text, sample agreement
    res = runner.invoke(app, ["report", str(study), "--metric", "rouge_l", "--json", "--api-price",
                              "llm=1/2"])
    assert res.exit_code == 0, res.output
    analysis = json.loads(Path(json.loads(res.stdout)["json"]).read_text())["analysis"]
    assert analysis["metric"] == "rouge_l" and analysis["task_type"] == "generation"
    by = {s["label"]: s for s in analysis["strategies"]}
    for s in by.values():
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
        assert set(s["consistency"]["perturbation"]) == {"case", "typo"}
        assert s["cost"]["basis"] == "api tokens" and s["confusion_matrix"] is None
    sampled = next(s for label, s in by.items() if "temperature" in label)
    assert 0 <= sampled["consistency"]["sample_agreement"] <= 1
    greedy = next(s for label, s in by.items() if label.startswith("zero_shot") and "temperature" not in label)
    assert greedy["consistency"]["sample_agreement"] is None  # greedy: nothing to sample
    bad = runner.invoke(app, ["recommend", str(study), "--api-price", "gpt=1/2"])
    assert bad.exit_code == 2 and "no model named 'gpt'" in bad.output and "llm" in bad.output
    rec = runner.invoke(app, ["recommend", str(study), "--metric", "bleu", "--json"])
    assert rec.exit_code == 0, rec.output
    assert json.loads(rec.stdout)["metric"] == "bleu"


def test_bad_causal_configs_fail_before_any_trial(tmp_path, colour_files, tiny_llama_dir):
    base = {"name": "bad", "task": {"data": colour_files, "text": "text", "label": "label"},
            "model": {"backend": "causal", "path": str(tiny_llama_dir)}}
    study = write_study(tmp_path, {**base, "strategies": [{"zero_shot": {"template_file": "missing.j2"}}]})
    line = 1 + study.read_text(encoding="utf-8").splitlines().index(
        next(x for x in study.read_text(encoding="utf-8").splitlines() if "template_file" in x))
    result = runner.invoke(app, ["run", str(study)])
    assert result.exit_code == 2 and "missing.j2" in flat(result) and f"line {line}:" in flat(result)
    study = write_study(tmp_path, {**base, "strategies": [{"few_shot": {"template": "{{ input "}}]})
    result = runner.invoke(app, ["run", str(study)])
    assert result.exit_code == 2 and "invalid Jinja2" in flat(result)
    study = write_study(tmp_path, {**base, "model": {"backend": "causal"}, "strategies": ["zero_shot"]})
    result = runner.invoke(app, ["validate", str(study)])
    assert result.exit_code == 2 and "causal backend needs 'path'" in flat(result)
    enc = {**base, "model": {"backend": "encoder", "path": "default"}}
    study = write_study(tmp_path, {**enc, "strategies": [{"chain_of_thought": {"models": ["default"]}}]})
    result = runner.invoke(app, ["validate", str(study)])
    assert result.exit_code == 2 and "runs on causal or openai models" in flat(result)


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="the accelerate launcher is not installed")
def test_training_runs_unchanged_under_accelerate_launch(tmp_path, colour_files, tiny_llama_dir):
    """The single-process Accelerate path on CPU: `accelerate launch -m tunebench run` stores the trial."""
    study = write_study(tmp_path, {
        "name": "launched", "task": {"data": colour_files, "text": "text", "label": "label"},
        "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
        "strategies": [{"lora": {"epochs": 1, "max_length": 48}}], "store": "runs"})
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "tunebench", "run", str(study), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    (trial,) = doc["trials"]
    assert trial["strategy"] == "lora" and trial["history"][0]["epoch"] == 1
    assert (tmp_path / "runs" / trial["artifact"] / "weights.safetensors").is_file()
