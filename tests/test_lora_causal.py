"""LoRA on a causal LM learns where full fine-tuning does (issue 18): the keyword -> colour task on a tiny random
Llama at the standard initialisation, where all-linear LoRA without adapted embeddings stayed at chance."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import COLOURS, WORDS, _bpe_tokenizer, write_csv
from tunebench.analysis.leaderboard import tuning_flags
from tunebench.config import ModelConfig, TaskConfig
from tunebench.data import load_task
from tunebench.strategies import registry
from tunebench.strategies.lora import lm_targets

FILLERS = ["the", "a", "today", "maybe", "very", "quite", "and", "then", "over", "under"]


def keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """A keyword among three filler words; the keyword (word i) decides the answer (colour i % 4)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(len(WORDS))
        words = rng.sample(FILLERS, 3)
        words.insert(rng.randrange(4), WORDS[k])
        rows.append((" ".join(words), COLOURS[k % 4]))
    return rows


@pytest.fixture(scope="module")
def standard_llama(tmp_path_factory):
    """A 2-layer, 64-wide random Llama at transformers' default initialisation (std 0.02), no chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunebench.backends import load_backend

    out = tmp_path_factory.mktemp("llama-std-init")
    tok = _bpe_tokenizer(out, chat=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return load_backend(ModelConfig(backend="causal", path=str(out), precision="fp32"))


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("keyword-task")
    files = {s: write_csv(d / f"{s}.csv", keyword_rows(n, i)) for i, (s, n) in
             enumerate((("train", 200), ("dev", 64), ("test", 100)))}
    return load_task(TaskConfig(data={k: str(v) for k, v in files.items()}, text="text", label="label",
                                instruction="Name the colour of the keyword."))


def tune(backend, task, name: str, **params):
    cls = registry.get(name)
    predictor = cls(cls.config_from_dict({"epochs": 15, "batch_size": 16, **params}), seed=0).adapt(
        backend, task, train=task.train, dev=task.dev)
    acc = float((np.asarray(predictor.predict(task.test.records())) == task.test.labels).mean())
    return predictor, acc


def test_lora_learns_what_full_fine_tuning_learns(standard_llama, keyword_task):
    _, full = tune(standard_llama, keyword_task, "full", lr=1e-3)
    predictor, lora = tune(standard_llama, keyword_task, "lora")  # LoRA's own defaults (r 8, lr 1e-3)
    print(f"full {full:.3f}, lora {lora:.3f}")
    assert full >= 0.9
    assert lora >= 0.9
    assert any(n.endswith("embed_tokens.lora_embedding_A.default") for n in predictor.trained)


def test_lora_without_embeddings_stays_at_chance_and_says_so(standard_llama, keyword_task):
    """The failure before the fix: frozen embeddings leave the linear adapters no token identity to read."""
    predictor, acc = tune(standard_llama, keyword_task, "lora", embeddings=False)
    assert acc <= 0.45  # four colours
    result = predictor.train_result
    row = {"strategy": "lora", "params": {}, "history": result.history,
           "record": {"best_epoch": result.best_epoch, "dev_majority": result.dev_majority}}
    flags = tuning_flags(row)
    assert len(flags) == 1 and flags[0].startswith("did not learn")
    assert "embeddings: true" in flags[0]


def test_lora_targets_on_causal_models(tiny_gpt2, tiny_llama):
    """all-linear means every linear layer but the head (GPT-2's Conv1D included), plus the input embeddings."""
    gpt2, llama = tiny_gpt2.lm_copy(), tiny_llama.lm_copy()
    assert lm_targets(gpt2, "all-linear", True) == ["c_attn", "c_fc", "c_proj", "wte"]
    assert lm_targets(llama, "all-linear", True) == ["down_proj", "embed_tokens", "gate_proj", "k_proj", "o_proj",
                                                     "q_proj", "up_proj", "v_proj"]
    assert lm_targets(llama, ["q_proj"], True) == ["embed_tokens", "q_proj"]
    assert lm_targets(llama, "all-linear", False) == "all-linear"
    assert lm_targets(llama, r".*\.q_proj", True) == r"(?:.*\.q_proj)|(?:model\.embed_tokens)"


def test_a_hybrid_keys_its_lora_embeddings_like_a_plain_lora():
    """A hybrid's LoRA adapts the embeddings too: its trial key says so (a hybrid that ran before the option
    trained without them and must rerun), and ``embeddings: false`` keeps the key such a trial had."""
    from tunebench.strategies import registry

    hybrid = registry.get("hybrid")
    plain = {"tune": "lora", "prompt": "few_shot", "tune_params": {"r": 4}, "prompt_params": {}}
    assert hybrid.key_params(plain, "causal")["tune_params"] == {"r": 4, "embeddings": True}
    off = {**plain, "tune_params": {"r": 4, "embeddings": False}}
    assert hybrid.key_params(off, "causal") == plain
    full = {**plain, "tune": "full", "tune_params": {"epochs": 2}}
    assert hybrid.key_params(full, "causal") == full
    assert registry.get("lora").key_params({"r": 4, "embeddings": True}, "causal") == {"r": 4, "embeddings": True}
