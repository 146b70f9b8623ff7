"""`tunebench export`: adapters, merged weights and ONNX round-trip to the trial's own predictions; model cards;
output directories are never overwritten; unsupported combinations fail clearly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import toy_rows, write_csv
from tests.test_causal import colour_rows
from tunebench.analysis.selection import load_trial
from tunebench.cli import app as cli
from tunebench.errors import CapabilityError, TunebenchError
from tunebench.export import (MANIFEST, ExportError, OnnxClassifier, check_format, export_trial)

runner = CliRunner()
QUICK = {"epochs": 2, "batch_size": 16, "max_length": 32}
TEXTS = [t for t, _ in toy_rows(24, 9)]
WORDS = [w for w, _ in colour_rows(8, 7)]


def run_study(root, study: dict) -> None:
    path = root / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    result = runner.invoke(cli, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, tiny_llama_dir, tiny_gpt2_dir):
    """An encoder study (lora, full, soft_prompt, linear_probe, zero_shot) and a causal one (lora, soft_prompt,
    few_shot on Llama; full on GPT-2, whose embeddings are tied)."""
    root = tmp_path_factory.mktemp("export")
    files = {k: str(write_csv(root / f"{k}.csv", toy_rows(n, s))) for k, n, s in
             (("train", 64, 1), ("dev", 16, 2), ("test", 16, 3))}
    run_study(root, {"name": "enc", "task": {"data": files, "text": "text", "label": "label"},
                     "model": {"path": str(tiny_model_dir), "precision": "fp32"}, "training": QUICK,
                     "strategies": [{"lora": {"r": 4, "lr": 5e-3}}, {"full": {"lr": 1e-3}},
                                    {"soft_prompt": {"virtual_tokens": 4, "epochs": 1}}, "linear_probe", "zero_shot"],
                     "store": "runs"})
    colours = {k: str(write_csv(root / f"c{k}.csv", colour_rows(n, s))) for k, n, s in
               (("train", 32, 1), ("dev", 8, 2), ("test", 8, 3))}
    causal = {"task": {"data": colours, "text": "text", "label": "label", "instruction": "Name the colour."},
              "training": {"epochs": 1, "batch_size": 16, "max_length": 160}, "store": "runs"}
    run_study(root, {"name": "llm", **causal,
                     "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
                     "strategies": [{"lora": {"r": 4, "lr": 5e-3}}, {"soft_prompt": {"virtual_tokens": 4}},
                                    {"few_shot": {"shots": 1}}]})
    run_study(root, {"name": "gpt", **causal,
                     "model": {"backend": "causal", "path": str(tiny_gpt2_dir), "precision": "fp32"},
                     "strategies": [{"full": {"lr": 1e-3}}]})
    return root / "runs"


def trial_of(store, study: str, strategy: str):
    from tunebench.store import Store

    st = Store(store, create=False)
    rows = [r for r in st.trials(study, st.current_keys(study)) if r["strategy"] == strategy]
    assert len(rows) == 1, rows
    return load_trial(store, study, rows[0]["key"])


def snippet(path, which: int = 0) -> dict:
    """Run the card's ``which``-th Python block (plain transformers / peft / onnxruntime code); its namespace."""
    blocks = re.findall(r"```python\n(.*?)```", (path / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    ns: dict = {}
    exec(compile(blocks[which], "README.md", "exec"), ns)  # noqa: S102  (our own generated card)
    return ns


def test_merged_encoder_lora_loads_with_plain_transformers_and_predicts_the_same(store, tmp_path):
    loaded = trial_of(store, "enc", "lora")
    out = export_trial(loaded, tmp_path / "m", "merged").path
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "classifier_head.safetensors", "classifier.json", "README.md",
            MANIFEST, "tokenizer.json"} <= names
    assert not any(n.startswith("adapter_") for n in names) and not any(n.endswith((".bin", ".pt")) for n in names)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())  # merged: no LoRA layers left
    ns = snippet(out)  # AutoModel + mean pooling + head, as the card says
    expected = loaded.predictor.predict_scores(TEXTS)
    np.testing.assert_allclose(ns["predict_scores"](TEXTS).numpy(), expected, atol=1e-4, rtol=1e-4)
    assert ns["predict"](TEXTS) == [loaded.labels[i] for i in expected.argmax(1)]
    assert len(set(expected.argmax(1).tolist())) == 2  # the trial learned something: both labels predicted


def test_hf_adapters_reload_with_peft_on_the_base_and_give_the_same_logits(store, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModel

    for strategy in ("lora", "soft_prompt"):
        loaded = trial_of(store, "enc", strategy)
        out = export_trial(loaded, tmp_path / strategy, "hf").path
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()  # the adapter alone
        ns = snippet(out)
        np.testing.assert_allclose(ns["predict_scores"](TEXTS).numpy(), loaded.predictor.predict_scores(TEXTS),
                                   atol=1e-4, rtol=1e-4)
    # the adapter of the LoRA trial on the plain base model: same hidden states as the trial's encoder
    loaded = trial_of(store, "enc", "lora")
    base = AutoModel.from_pretrained(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    batch = loaded.backend.collate(loaded.backend.tokenize(TEXTS, 32))
    with torch.no_grad():
        ours = loaded.predictor.model.encoder(**batch).last_hidden_state
        theirs = peft_model(**batch).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_linear_probe_and_zero_shot_export_what_they_learned(store, tmp_path):
    probe = trial_of(store, "enc", "linear_probe")
    out = export_trial(probe, tmp_path / "probe", "hf").path
    assert (out / "classifier_head.safetensors").is_file() and not (out / "config.json").exists()
    assert json.loads((out / MANIFEST).read_text())["contents"] == "head"
    ns = snippet(out)
    np.testing.assert_allclose(ns["predict_scores"](TEXTS).numpy(), probe.predictor.predict_scores(TEXTS), atol=1e-4)

    zero = trial_of(store, "enc", "zero_shot")
    out = export_trial(zero, tmp_path / "zero", "hf").path
    assert (out / "anchors.safetensors").is_file()
    ns = snippet(out)
    np.testing.assert_allclose(ns["predict_scores"](TEXTS).numpy(), zero.predictor.predict_scores(TEXTS), atol=1e-4)


def test_onnx_fp32_matches_torch_and_int8_agrees_on_nearly_all_inputs(store, tmp_path):
    for strategy in ("full", "lora"):
        loaded = trial_of(store, "enc", strategy)
        result = export_trial(loaded, tmp_path / strategy, "onnx")
        out = result.path
        assert {"model.onnx", "model_int8.onnx", "classifier.json", "tokenizer.json", "README.md"} <= {
            p.name for p in out.iterdir()}
        torch_scores = loaded.predictor.predict_scores(TEXTS)
        fp32 = OnnxClassifier(out, quantized=False, batch_size=5).predict_scores(TEXTS)  # several padded batches
        np.testing.assert_allclose(fp32, torch_scores, atol=1e-4, rtol=1e-4)
        int8 = OnnxClassifier(out, threads=1, recheck_margin=0)  # int8 alone (serving rechecks near ties)
        # This tiny random model's logits spread over about 0.1, the size of int8's own rounding error, so int8 may
        # flip inputs near a tie (which ones varies with the run's floating-point order and onnxruntime's
        # version). A flip is a defect only where fp32's margin exceeds what int8's error can move: twice its
        # largest logit error. Most inputs must still agree and the error stay small.
        i8 = int8.predict_scores(TEXTS)
        error = float(np.abs(i8 - torch_scores).max())
        top2 = np.sort(torch_scores, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        agree = int8.predict(TEXTS) == torch_scores.argmax(1)
        assert error < 0.25 and agree.mean() >= 0.7, (error, agree)
        assert (margin[~agree] <= 2 * error).all(), (margin, agree, error)
        assert int8.predict_labels(TEXTS[:2]) == [loaded.labels[i] for i in int8.predict(TEXTS[:2])]
        check = result.manifest["onnx"]["check"]
        assert check["fp32_max_abs_logit_diff"] < 1e-4
        assert (out / "model_int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    ns = snippet(out, which=1)  # onnxruntime alone, as the card shows
    assert ns["predict"](TEXTS) == [loaded.labels[i] for i in OnnxClassifier(out, recheck_margin=0).predict(TEXTS)]
    card = (out / "README.md").read_text(encoding="utf-8")
    margin = json.loads((out / "classifier.json").read_text(encoding="utf-8"))["recheck_margin"]
    assert f"top-2 logit gap is below {margin:g}" in card


def test_merged_causal_lora_scores_like_the_predictor_through_the_exported_prompt(store, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = trial_of(store, "llm", "lora")
    out = export_trial(loaded, tmp_path / "m", "merged").path
    prompt = json.loads((out / "prompt.json").read_text(encoding="utf-8"))
    assert prompt["chat_template"] is True and prompt["mode"] == "score" and prompt["labels"] == loaded.labels
    assert prompt["variables"]["instruction"] == "Name the colour."
    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no PEFT
    assert not any("lora" in n for n, _ in model.named_parameters())
    ns = snippet(out)  # renders prompt.json with jinja2 + the chat template, scores each label
    expected = loaded.predictor.predict_scores(WORDS)
    got = np.asarray([ns["label_scores"](w) for w in WORDS])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert ns["predict"](WORDS) == [loaded.labels[i] for i in loaded.predictor.predict(WORDS)]

    hf = export_trial(loaded, tmp_path / "hf", "hf").path  # the adapter on the base: the same logits
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(loaded.model_config.path)
    adapter = PeftModel.from_pretrained(base, str(hf)).eval()
    ids = torch.tensor([loaded.backend.prompt_ids(loaded.predictor.prompts(WORDS[:1])[0])])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, loaded.predictor.model(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids).logits, loaded.predictor.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_merged_full_gpt2_keeps_tied_weights_and_the_tuned_logits(store, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = trial_of(store, "gpt", "full")
    out = export_trial(loaded, tmp_path / "g", "merged").path
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = torch.tensor([loaded.backend.prompt_ids(loaded.predictor.prompts(WORDS[:1])[0])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded.predictor.model(ids).logits)
    ns = snippet(out)  # no chat template on this tokenizer: plain prompt, answers after a space
    assert json.loads((out / "prompt.json").read_text())["answer_prefix"] == " "
    np.testing.assert_allclose(np.asarray([ns["label_scores"](w) for w in WORDS]),
                               loaded.predictor.predict_scores(WORDS), atol=1e-4, rtol=1e-4)


def test_prompt_only_trial_exports_its_prompt(store, tmp_path):
    loaded = trial_of(store, "llm", "few_shot")
    out = export_trial(loaded, tmp_path / "p", "hf").path
    prompt = json.loads((out / "prompt.json").read_text(encoding="utf-8"))
    demos = prompt["variables"]["demonstrations"]
    assert len(demos) == 4 and {d["output"] for d in demos} == set(loaded.labels)  # one per colour
    assert prompt["template"] == loaded.predictor.builder.template
    assert not (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    ns = snippet(out)  # the unchanged base model, prompted with the exported demonstrations
    assert ns["predict"](WORDS) == [loaded.labels[i] for i in loaded.predictor.predict(WORDS)]
    with pytest.raises(CapabilityError, match="nothing to merge.*--format hf"):
        export_trial(loaded, tmp_path / "p2", "merged")
    assert not (tmp_path / "p2").exists()


def test_model_card_and_manifest_carry_task_metrics_config_and_cost(store, tmp_path):
    loaded = trial_of(store, "enc", "lora")
    result = export_trial(loaded, tmp_path / "card", "merged")
    card = (result.path / "README.md").read_text(encoding="utf-8")
    row = loaded.row
    assert card.startswith("---\nlibrary_name: transformers")
    assert f"| trial | `{row['key']}` (seed 0, 64 training examples) |" in card
    assert "| study | `enc` |" in card and "| strategy | `lora` (weight_tuning) |" in card
    assert '"r": 4' in card and '"lr": 0.005' in card  # the trial's config
    assert f"| accuracy | {row['metrics']['accuracy']:.4f} | {row['metrics']['dev_accuracy']:.4f} |" in card
    assert "| pos |" in card and "| neg |" in card  # per-class table and the task's labels
    assert f"| train seconds | {row['cost']['train_seconds']:.3g} |" in card
    assert f"| trainable parameters | {row['cost']['trainable_params']:,} |" in card
    assert "transformers" in card and "exported with: tunebench" in card
    m = json.loads((result.path / MANIFEST).read_text(encoding="utf-8"))
    assert m["trial"] == row["key"] and m["format"] == "merged" and m["strategy"] == "lora"
    assert m["metrics"]["test"]["accuracy"] == row["metrics"]["accuracy"]
    assert m["metrics"]["dev"]["accuracy"] == row["metrics"]["dev_accuracy"]
    assert m["params"] == row["params"] and m["task"]["labels"][0]["name"] in ("neg", "pos")
    assert "latency_ms_samples" not in m["cost"] and m["cost"]["latency_ms_p50"] > 0
    listed = {f["path"] for f in m["files"]}
    assert "README.md" in listed and "model.safetensors" in listed


def test_never_overwrites_user_data_and_leaves_nothing_half_written(store, tmp_path, monkeypatch):
    loaded = trial_of(store, "enc", "linear_probe")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious", encoding="utf-8")
    for force in (False, True):  # --force replaces only an earlier export
        with pytest.raises(ExportError, match="not empty|not a tunebench export"):
            export_trial(loaded, mine, "hf", force=force)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_trial(loaded, empty, "hf")  # an existing empty directory is fine
    with pytest.raises(ExportError, match="--force"):
        export_trial(loaded, empty, "hf")
    (empty / "extra.txt").write_text("x", encoding="utf-8")
    again = export_trial(loaded, empty, "merged", force=True)  # replaces the earlier export as a whole
    assert again.manifest["format"] == "merged" and not (empty / "extra.txt").exists()
    assert first.manifest["format"] == "hf"

    import tunebench.export.writers as ex

    def broken(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_write_classifier_files", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_trial(loaded, tmp_path / "half", "merged")
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_unsupported_combinations_fail_clearly(store, tmp_path):
    cases = [("full", None, "encoder", "hf", "--format merged"),
             ("gradual_unfreeze", None, "causal", "hf", "--format merged"),
             ("soft_prompt", None, "encoder", "merged", "--format hf"),
             ("zero_shot", None, "causal", "merged", "--format hf"),
             ("lora", None, "causal", "onnx", "encoder classifiers"),
             ("soft_prompt", None, "encoder", "onnx", "--format hf"),
             ("hybrid", {"tune": "full"}, "causal", "hf", "--format merged"),
             ("lora", None, "encoder", "tflite", "not one of")]
    for strategy, params, backend, fmt, hint in cases:
        with pytest.raises(CapabilityError, match=re.escape(hint)):
            check_format(strategy, params, backend, fmt)
    fine = [("lora", None, "encoder", "onnx"), ("hybrid", {"tune": "lora"}, "causal", "hf"),
            ("few_shot", None, "openai", "hf"), ("linear_probe", None, "encoder", "merged")]
    for strategy, params, backend, fmt in fine:
        check_format(strategy, params, backend, fmt)
    loaded = trial_of(store, "enc", "soft_prompt")
    with pytest.raises(CapabilityError, match="virtual tokens"):
        export_trial(loaded, tmp_path / "sp", "merged")
    assert not (tmp_path / "sp").exists()


def test_cli_export_end_to_end(store, tmp_path):
    from tunebench.store import Store

    st = Store(store, create=False)
    key = next(r["key"] for r in st.trials("enc") if r["strategy"] == "full")
    out = tmp_path / "cli-onnx"
    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--trial", key[:8], "--format", "onnx",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["trial"] == key and doc["format"] == "onnx" and doc["path"] == str(out)
    assert {"model.onnx", "model_int8.onnx", "README.md"} <= {f["path"] for f in doc["files"]}
    assert OnnxClassifier(out).predict(TEXTS).shape == (len(TEXTS),)

    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--trial", key[:8], "--format", "merged",
                            "--out", str(tmp_path / "cli-merged")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"exported trial {key[:8]} (full(lr=0.001)) of study 'enc' as merged" in text
    assert "model.safetensors" in text and "tunebench_export.json" in text and "README.md" in text

    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--trial", key[:8], "--format", "onnx",
                            "--out", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output
    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--trial", key[:8], "--format", "hf",
                            "--out", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "--format merged" in r.output and not (tmp_path / "nope").exists()
    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--format", "hf"])
    assert r.exit_code == 2 and "--trial ID or --best" in r.output
    r = runner.invoke(cli, ["export", "enc", "--store", str(store), "--best", "--format", "zip"])
    assert r.exit_code == 2 and "not one of" in r.output


def test_errors_are_tunebench_errors():
    assert issubclass(ExportError, TunebenchError)
