"""Shared fixtures: a tiny random BERT with a locally trained tokenizer, and small task files."""

from __future__ import annotations

import csv
import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful", "brilliant"]
NEGATIVE = ["awful", "terrible", "dreadful", "boring", "horrible", "poor", "dull", "bad"]
FILLER = ["the", "movie", "was", "plot", "acting", "really", "quite", "story", "film", "and", "a", "very"]


def toy_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentiment rows whose label is decided by one cue word among filler words (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT and a WordPiece tokenizer trained here: no download."""
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [t for t, _ in toy_rows(400, 0)] + POSITIVE + NEGATIVE + [str(i) for i in range(1000)]
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig

    return load_backend(ModelConfig(path=str(tiny_model_dir), precision="fp32"))


@pytest.fixture()
def toy_files(tmp_path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", toy_rows(64, 1)),
        "dev": write_csv(tmp_path / "dev.csv", toy_rows(16, 2)),
        "test": write_csv(tmp_path / "test.csv", toy_rows(16, 3)),
    }


@pytest.fixture()
def toy_task(toy_files):
    from tunebench.config import TaskConfig
    from tunebench.data import load_task

    cfg = TaskConfig(data={k: str(v) for k, v in toy_files.items()}, text="text", label="label",
                     labels={"neg": "negative", "pos": "positive"})
    return load_task(cfg)


WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "candle", "garden", "rocket", "violin", "mirror",
         "forest", "pepper", "castle", "ocean", "saddle"]
COLOURS = ["red", "blue", "green", "gold"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_rows(seed: int, repeats: int) -> list[tuple[str, str]]:
    """The deterministic toy task: each word maps to one of four colours (word i -> colour i % 4)."""
    rng = random.Random(seed)
    rows = [(w, COLOURS[i % 4]) for i, w in enumerate(WORDS)] * repeats
    rng.shuffle(rows)
    return rows


def _bpe_tokenizer(out: Path, chat: bool, bos: bool = False):
    """A byte-level BPE tokenizer trained here on the toy vocabulary (no download); with ``bos`` it starts every
    input with ``<s>``, as Llama's own tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ([t for t, _ in toy_rows(400, 0)] + POSITIVE + NEGATIVE + WORDS + COLOURS
              + ["Classify the text. Answer with one of: Text: Answer: Input: Output: Reasoning: positive negative"]
              + [f"{w} {c} {w}{c}" for w in WORDS for c in COLOURS])
    special = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a chat template: the causal backend's test model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _bpe_tokenizer(out, chat=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2,  # larger than the default so a frozen LM head can express a choice
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (learned positions, tied embeddings), no chat template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _bpe_tokenizer(out, chat=False)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig

    return load_backend(ModelConfig(backend="causal", path=str(tiny_llama_dir), precision="fp32"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig

    return load_backend(ModelConfig(backend="causal", path=str(tiny_gpt2_dir), precision="fp32"))


# -- real services: PostgreSQL and a Ray cluster, started by scripts/test-services.sh (the test command) --------
def _service(var: str, what: str) -> str:
    value = os.environ.get(var)
    if not value:
        if os.environ.get("TUNEBENCH_REQUIRE_SERVICES"):
            pytest.fail(f"{var} is not set: the test command starts {what} (scripts/test-services.sh)")
        pytest.skip(f"{what} not running here ({var} unset); `. scripts/test-services.sh` starts one")
    return value


@pytest.fixture()
def pg_url() -> str:
    """A fresh, empty PostgreSQL database for one test (dropped after it)."""
    import uuid

    import psycopg

    admin = _service("TUNEBENCH_TEST_POSTGRES", "a PostgreSQL server")
    name = f"tb_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path) -> str:
    """Where a store lives: a directory (SQLite) or a fresh PostgreSQL database; the store tests run on both."""
    if request.param == "sqlite":
        return str(tmp_path / "runs")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def ray_cluster():
    """This test process joined to the local Ray cluster the test command started."""
    import ray

    address = _service("TUNEBENCH_TEST_RAY", "a local Ray cluster")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}})
    yield address


def toy_study(tmp_path: Path, toy_files: dict[str, Path], model_dir: Path, **extra) -> dict:
    """The 14-trial toy ladder (2 zero-shot templates, few-shot, linear probe, full; 2 seeds x 2 sizes)."""
    return {
        "name": "toy-ladder",
        "task": {"type": "classification", "data": {k: str(v) for k, v in toy_files.items()},
                 "text": "text", "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
        "model": {"backend": "encoder", "path": str(model_dir), "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 16, "max_length": 32},
        "strategies": [{"zero_shot": {"label_templates": ["{{ label }}", "it was {{ label }}"]}},
                       {"few_shot": {"shots": 2}}, {"linear_probe": {}}, {"full": {"epochs": 1}}],
        "seeds": [0, 1],
        "train_sizes": [16, "all"],
        "store": str(tmp_path / "runs"),
        **extra,
    }


def assert_verdicts_follow_intervals(report_json: Path, html: str | None = None) -> int:
    """No "tied" beside an interval that excludes 0 (or the reverse), in the report's data, its HTML
    leaderboard and the recommendation's sentences; returns how many comparisons were checked."""
    import json
    import re

    doc = json.loads(Path(report_json).read_text())
    checked = 0
    for s in doc["analysis"]["strategies"]:
        c = s["vs_best"]
        if c is None:
            continue
        contains = c["ci"][0] <= 0 <= c["ci"][1]
        assert c["tied"] == contains == s["tied_with_best"], (s["label"], c)
        checked += 1
    for r in doc["recommendation"]["ranking"]:
        for reason in r["reasons"]:
            for rel, lo, hi in re.findall(r"(tied with|worse than|better than) [^:]+: difference [-+.\d]+ "
                                          r"\([\d.]+% CI ([-+.\d]+) to ([-+.\d]+)\)", reason):
                assert (rel == "tied with") == (float(lo) <= 0 <= float(hi)), reason
                checked += 1
    if html is not None:
        rows = re.findall(r'<tr class="(tied)?"><td>([^<]+)</td>.*?</tr>', html, flags=re.S)
        by_label = {s["label"]: s for s in doc["analysis"]["strategies"]}
        for tied, label in rows:
            if label in by_label:
                assert bool(tied) == by_label[label]["tied_with_best"], label
    return checked


@pytest.fixture(scope="session")
def stores(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    """The studies the serving tests serve (tests/serving.py), built once per session."""
    from tests.serving import build_stores

    return build_stores(tmp_path_factory.mktemp("serve"), tiny_model_dir, tiny_llama_dir)


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds`` (SIGALRM: main thread)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
