"""The causal backend: learning on toy tasks, generation tasks, prompts and their sandbox, the prefix cache."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.conftest import COLOURS, WORDS, write_csv
from tunebench.config import TaskConfig
from tunebench.data import load_task
from tunebench.errors import ConfigError
from tunebench.strategies import registry


def colour_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """The deterministic toy task: word i -> colour i % 4 (a lookup the model must learn; chance is 1/4)."""
    rng = random.Random(seed)
    rows = [(WORDS[k % len(WORDS)], COLOURS[(k % len(WORDS)) % 4]) for k in range(n)]
    rng.shuffle(rows)
    return rows


@pytest.fixture()
def colour_task(tmp_path):
    files = {"train": write_csv(tmp_path / "train.csv", colour_rows(128, 1)),
             "dev": write_csv(tmp_path / "dev.csv", colour_rows(32, 2)),
             "test": write_csv(tmp_path / "test.csv", colour_rows(48, 3))}
    cfg = TaskConfig(data={k: str(v) for k, v in files.items()}, text="text", label="label",
                     instruction="Name the colour of the word.")
    return load_task(cfg)


def accuracy(predictor, task) -> float:
    pred = np.asarray(predictor.predict(task.test.records()))
    return float((pred == task.test.labels).mean())


SHORT = "Colour of: {{ input }}"  # a short prompt: the tiny random model's attention has few tokens to sift


@pytest.mark.parametrize("name,params", [
    ("lora", {"lr": 1e-2, "r": 16, "alpha": 32, "lora_dropout": 0.0, "epochs": 12, "batch_size": 8}),
    ("full", {"lr": 2e-3, "epochs": 8, "batch_size": 16}),
])
def test_tuning_learns_what_zero_shot_cannot(name, params, tiny_llama, colour_task):
    zero = registry.get("zero_shot")(registry.get("zero_shot").config_from_dict({"template": SHORT}), seed=0)
    zs = accuracy(zero.adapt(tiny_llama, colour_task, train=colour_task.train, dev=colour_task.dev), colour_task)
    cls = registry.get(name)
    cfg = cls.config_from_dict({**params, "max_length": 96, "template": SHORT})
    predictor = cls(cfg, seed=0).adapt(tiny_llama, colour_task, train=colour_task.train, dev=colour_task.dev)
    acc = accuracy(predictor, colour_task)
    print(f"{name}: zero-shot {zs:.3f} -> tuned {acc:.3f}")
    assert zs <= 0.5  # four colours: chance is 0.25
    assert acc >= 0.9
    losses = [h["train_loss"] for h in predictor.train_result.history]
    assert losses[-1] < losses[0]


@pytest.fixture()
def phrase_task(tmp_path):
    """A small generation task: word i -> 'the <colour i % 4>' (exact match needs the EOS to be learnt too)."""
    def rows(n, seed):
        return [(w, f"the {c}") for w, c in colour_rows(n, seed)]

    files = {k: write_csv(tmp_path / f"{k}.csv", rows(n, s), header=("word", "phrase"))
             for k, n, s in (("train", 128, 1), ("dev", 32, 2), ("test", 32, 3))}
    cfg = TaskConfig(type="generation", data={k: str(v) for k, v in files.items()}, text="word", target="phrase")
    return load_task(cfg)


def test_generation_task_learns_exact_match(tiny_llama, phrase_task):
    from tunebench.evaluation.metrics import generation_metrics

    targets = phrase_task.test.targets
    zero = registry.get("zero_shot")(registry.get("zero_shot").config_from_dict({"max_new_tokens": 6}), seed=0)
    zs = zero.adapt(tiny_llama, phrase_task, train=phrase_task.train, dev=phrase_task.dev)
    before = generation_metrics(zs.predict(phrase_task.test.records()), targets)
    cls = registry.get("full")
    cfg = cls.config_from_dict({"lr": 2e-3, "epochs": 8, "batch_size": 16, "max_length": 64, "max_new_tokens": 6})
    tuned = cls(cfg, seed=0).adapt(tiny_llama, phrase_task, train=phrase_task.train, dev=phrase_task.dev)
    out = tuned.run(phrase_task.test.records())
    after = generation_metrics(out.predictions, targets)
    print(f"generation exact match: zero-shot {before['exact_match']:.3f} -> full {after['exact_match']:.3f}")
    assert before["exact_match"] <= 0.1
    assert after["exact_match"] >= 0.9 and after["rouge_l"] >= 0.9
    assert max(out.completion_tokens) <= 6 and min(out.prompt_tokens) > 0
    history = tuned.train_result.history
    assert "dev_loss" in history[0] and history[-1]["dev_loss"] < history[0]["dev_loss"]
    nll = tuned.reference_nll(phrase_task.test.records(), targets)
    assert np.exp(nll.mean()) < np.exp(zs.reference_nll(phrase_task.test.records(), targets).mean())


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ input.__class__.__init__.__globals__ }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ labels.__getitem__.__self__ }}{{ ().__class__ }}",
])
def test_templates_cannot_reach_python_internals(source, colour_task, tiny_llama):
    cls = registry.get("zero_shot")
    strategy = cls(cls.config_from_dict({"template": source}), seed=0)
    with pytest.raises(ConfigError, match="sandbox|unsafe|Python internals"):
        strategy.adapt(tiny_llama, colour_task, train=colour_task.train, dev=colour_task.dev).predict(
            colour_task.test.records()[:1])


def test_template_errors_are_clear():
    cls = registry.get("few_shot")
    with pytest.raises(ConfigError, match="template line 2: invalid Jinja2"):
        cls.config_from_dict({"template": "ok\n{% for x in %}"})
    from tunebench.prompts import PromptTemplate

    with pytest.raises(ConfigError, match="'nope' is undefined; available variables: .*input"):
        PromptTemplate("{{ nope }}").render({"input": "x"})


def test_prompt_sees_fields_labels_instruction_and_demonstrations(tiny_llama, colour_task):
    cls = registry.get("few_shot")
    template = ("{{ instruction }}|{{ label_names | join(',') }}|{% for d in demonstrations %}{{ d.text }}="
                "{{ d.output }};{% endfor %}|{{ text }}")
    predictor = cls(cls.config_from_dict({"template": template, "shots": 1}), seed=0).adapt(
        tiny_llama, colour_task, train=colour_task.train, dev=colour_task.dev)
    info = predictor.prompt_info(colour_task.test.records()[0])
    assert info["template"] == template
    body = info["example"]
    assert body.startswith("<|user|>Name the colour of the word.|blue,gold,green,red|")  # inside the chat template
    assert body.count("=") == 4  # one demonstration per class
    assert f"|{colour_task.test.texts[0]}</s><|assistant|>" in body


def test_generate_mode_parses_answers_and_counts_format_failures(tiny_gpt2, colour_task):
    from tunebench.evaluation.metrics import classification_metrics

    cls = registry.get("zero_shot")
    predictor = cls(cls.config_from_dict({"predict": "generate", "max_new_tokens": 4}), seed=0).adapt(
        tiny_gpt2, colour_task, train=colour_task.train, dev=colour_task.dev)
    out = predictor.run(colour_task.test.records())
    assert len(out.generated) == len(colour_task.test) and max(out.completion_tokens) <= 4
    m = classification_metrics(colour_task.test.labels, out.predictions, colour_task.label_names)
    failures = float(np.mean(np.asarray(out.predictions) == -1))
    assert m["format_failure_rate"] == pytest.approx(failures)
    assert failures > 0.5  # a random model rarely names a colour


def test_answer_parsing():
    from tunebench.prompts import final_answer, parse_label

    names = ["negative", "positive", "very positive"]
    assert parse_label("  Positive!", names) == 1
    assert parse_label("I think it is very positive.", names) == 2
    assert parse_label("positive or negative", names) == -1
    assert final_answer("step 1...\nAnswer: negative\nmore") == "negative"
    assert final_answer("no final line") is None


def test_retrieved_demonstrations_are_the_nearest(tiny_llama, colour_task, tiny_model_dir):
    from tunebench.strategies.causal import Retrieval, demo_pool

    pool = demo_pool(colour_task, colour_task.train)
    retrieval = Retrieval.build(str(tiny_model_dir), pool, k=2)
    demos = retrieval.demos_for([{"input": "apple"}])[0]
    assert demos[-1]["input"] == "apple" and demos[-1]["output"] == "red"  # most similar last
    assert retrieval.demos_for([{"input": "apple"}], exclude_self=True)[0][-1]["input"] != "apple"


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_prefix_cache_gives_the_same_scores(which, request):
    backend = request.getfixturevalue(which)
    demos = "Text: apple\nAnswer: red\n\nText: river\nAnswer: blue\n\n"
    prompts = [backend.prompt_ids(backend.format_prompt(demos + f"Text: {w}\nAnswer:"))
               for w in ("stone", "cloud tiger", "piano", "a much longer input with more words")]
    conts = [[backend.answer_ids("red"), backend.answer_ids("blue green gold"), backend.answer_ids("gold")]] * 4
    cached, n1 = backend.score(prompts, conts, cache=True, batch_size=3)
    naive, n2 = backend.score(prompts, conts, cache=False, batch_size=3)
    np.testing.assert_allclose(cached, naive, atol=1e-4)
    assert (n1 == n2).all() and n1[0, 1] > 1


def test_sampling_is_seeded(tiny_gpt2):
    prompts = [tiny_gpt2.format_prompt("Text: apple\nAnswer:")] * 2
    a = tiny_gpt2.generate(prompts, max_new_tokens=6, temperature=1.0, seed=1, stop=[])
    b = tiny_gpt2.generate(prompts, max_new_tokens=6, temperature=1.0, seed=1, stop=[])
    c = tiny_gpt2.generate(prompts, max_new_tokens=6, temperature=1.0, seed=2, stop=[])
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    greedy = tiny_gpt2.generate(prompts, max_new_tokens=6, stop=[])
    assert greedy[0].text == greedy[1].text and greedy[0].completion_tokens == 6
