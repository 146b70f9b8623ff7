"""Every registered strategy, on a tiny random BERT: adapt, predict, save, load, same predictions."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import yaml

from tunebench.errors import CapabilityError, ConfigError
from tunebench.strategies import load_predictor, registry

EXPECTED = {"zero_shot", "few_shot", "chain_of_thought", "linear_probe", "soft_prompt", "lora", "full",
            "gradual_unfreeze", "hybrid", "prompt_search", "distill", "cascade"}
CAUSAL_ONLY = {"chain_of_thought", "hybrid"}
COMPOSED = {"distill", "cascade"}  # a teacher and a student: tests/test_distill.py and test_cascade.py run them
QUICK = {"epochs": 2, "batch_size": 16, "max_length": 32}
BACKENDS = ["encoder", "llama", "gpt2"]


def quick_config(name: str, backend: str = "encoder"):
    cls = registry.get(name)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    params = {k: v for k, v in QUICK.items() if k in fields}
    if backend != "encoder" and "max_length" in params:
        params["max_length"] = 160  # a causal prompt holds the instruction, the labels and the input
    if name == "few_shot":
        params["shots"] = 2
    if name == "chain_of_thought":
        params["max_new_tokens"] = 12
    if name in COMPOSED:
        params = {"teacher": {"strategy": "zero_shot"}, "student": {"strategy": "linear_probe", "params": QUICK}}
    if name == "hybrid":
        params = {"tune": "lora", "prompt": "few_shot", "prompt_params": {"shots": 1},
                  "tune_params": {**QUICK, "max_length": 200}}
    return cls.config_from_dict(params)


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    """The tiny encoder, the tiny Llama (with a chat template) and the tiny GPT-2 (without)."""
    return request.getfixturevalue({"encoder": "tiny_backend", "llama": "tiny_llama", "gpt2": "tiny_gpt2"}[request.param])


def test_registry_holds_every_strategy():
    assert set(registry.all()) == EXPECTED
    for name, cls in registry.all().items():
        assert cls.name == name
        assert cls.config_cls.__name__.endswith("Config")
        assert cls.family in {"prompting", "prompt_tuning", "weight_tuning", "hybrid"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapt_keeps_the_shared_signature(name):
    sig = inspect.signature(registry.get(name).adapt)
    params = list(sig.parameters.values())
    assert [p.name for p in params] == ["self", "backend", "task", "train", "dev"]
    assert [p.kind for p in params[3:]] == [inspect.Parameter.KEYWORD_ONLY] * 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_survives_a_yaml_round_trip(name):
    cls = registry.get(name)
    cfg = quick_config(name)
    text = yaml.safe_dump(cfg.to_dict())
    again = cls.config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_rejects_unknown_and_bad_values(name):
    cls = registry.get(name)
    with pytest.raises(ConfigError, match="unknown parameter 'no_such_key'"):
        cls.config_from_dict({"no_such_key": 1})
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    bad = {"epochs": -3} if "epochs" in fields else {"max_length": -3} if "max_length" in fields else {"tune": "nope"}
    with pytest.raises(ConfigError):
        cls.config_from_dict(bad)


@pytest.mark.parametrize("name", sorted(EXPECTED - COMPOSED))
class TestEveryStrategy:
    """The common contract, run for each registered strategy on each tiny backend."""

    def test_adapt_predict_save_load(self, name, any_backend, toy_task, tmp_path):
        cls = registry.get(name)
        kind = "encoder" if any_backend.name == "encoder" else "causal"
        strategy = cls(quick_config(name, kind), seed=0)
        if name in CAUSAL_ONLY and kind == "encoder":
            with pytest.raises(CapabilityError, match=name):
                strategy.adapt(any_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
            return
        predictor = strategy.adapt(any_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
        records = toy_task.test.records()
        scores = predictor.predict_scores(records)
        assert scores.shape == (len(records), len(toy_task.label_names))
        assert np.isfinite(scores).all()
        pred = predictor.predict(records)
        assert set(np.asarray(pred).tolist()) <= {-1, 0, 1}  # -1: a generated answer that names no label
        out = predictor.run(records)
        assert len(out.prompt_tokens) == len(records) and min(out.prompt_tokens) > 0

        predictor.save(tmp_path / "artifact")
        files = {p.name for p in (tmp_path / "artifact").iterdir()}
        assert "predictor.json" in files
        assert not any(f.endswith((".pkl", ".pt", ".bin")) for f in files), files  # safetensors / JSON only
        loaded = load_predictor(tmp_path / "artifact", any_backend)
        np.testing.assert_allclose(loaded.predict_scores(records), scores, rtol=1e-4, atol=1e-4)
        assert np.asarray(loaded.predict(records)).tolist() == np.asarray(pred).tolist()

    def test_training_strategies_report_their_training(self, name, tiny_backend, toy_task):
        cls = registry.get(name)
        if name in CAUSAL_ONLY:
            return
        predictor = cls(quick_config(name), seed=0).adapt(tiny_backend, toy_task, train=toy_task.train,
                                                          dev=toy_task.dev)
        result = getattr(predictor, "train_result", None)
        if cls.family == "prompting":
            assert result is None
            return
        assert len(result.history) == 2 and 1 <= result.best_epoch <= 2
        assert result.examples_seen == 2 * len(toy_task.train)
        total = sum(p.numel() for p in predictor.model.parameters())
        assert 0 < result.trainable_params <= total
        if name in ("linear_probe", "soft_prompt", "lora"):
            assert result.trainable_params < total / 2  # the encoder itself stays (mostly) frozen
        if name == "full":
            assert result.trainable_params == total



def test_same_seed_same_numbers(tiny_backend, toy_task):
    cls = registry.get("lora")
    runs = [cls(quick_config("lora"), seed=3).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
            .predict_scores(toy_task.test.texts) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_probe_reuses_frozen_features_across_configs(tiny_backend, toy_task, monkeypatch):
    """A search's probe trials share their inputs: the frozen encoder runs once per input set, and each trial
    scores exactly as it would with features computed afresh, its training time counting the features."""
    from tunebench.strategies import training

    tiny_backend.__dict__.pop("_frozen_feature_cache", None)
    calls = []
    real = training.frozen_features
    monkeypatch.setattr(training, "frozen_features", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    cls = registry.get("linear_probe")

    def run(lr):
        cfg = dataclasses.replace(quick_config("linear_probe"), lr=lr)
        return cls(cfg, seed=0).adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)

    run(1e-2)
    assert calls == [len(toy_task.train), len(toy_task.dev)]
    second = run(3e-3)
    assert len(calls) == 2  # no new forward pass over train or dev
    feature_s = sum(sec for _, sec in tiny_backend.__dict__.pop("_frozen_feature_cache").values())
    assert feature_s > 0 and second.train_result.train_seconds >= feature_s
    fresh = run(3e-3)
    assert len(calls) == 4
    np.testing.assert_allclose(second.predict_scores(toy_task.test.texts), fresh.predict_scores(toy_task.test.texts),
                               rtol=1e-5, atol=1e-6)
    assert [h["dev_accuracy"] for h in second.train_result.history] == \
        [h["dev_accuracy"] for h in fresh.train_result.history]


def test_zero_shot_expands_one_trial_per_template():
    cls = registry.get("zero_shot")
    cfg = cls.config_from_dict({"label_templates": ["{{ label }}", "It is {{ label }}."]})
    assert [c.label_templates for c in cls.expand(cfg)] == [["{{ label }}"], ["It is {{ label }}."]]
    with pytest.raises(ConfigError, match="label"):
        cls.config_from_dict({"label_templates": ["no placeholder"]})
    cfg = cls.config_from_dict({"template": ["A {{ input }}", "B {{ input }}"]})
    assert [c.template for c in cls.expand(cfg)] == ["A {{ input }}", "B {{ input }}"]


def test_gradual_unfreeze_follows_its_schedule(tiny_backend, toy_task):
    cls = registry.get("gradual_unfreeze")
    cfg = cls.config_from_dict({**QUICK, "epochs": 3, "schedule": [0, 1, 3]})
    strategy = cls(cfg, seed=0)
    model = strategy.build_model(tiny_backend, 2)
    apply = strategy.schedule(model)
    counts = []
    for epoch in range(3):
        apply(epoch)
        counts.append(sum(p.numel() for p in model.encoder.parameters() if p.requires_grad))
    assert counts[0] == 0 < counts[1] < counts[2]
    layer = sum(p.numel() for p in model.encoder.encoder.layer[-1].parameters())
    assert counts[1] == layer


@pytest.mark.parametrize("name,params", [("full", {}), ("gradual_unfreeze", {"schedule": [1, 2]})])
def test_unfrozen_encoder_weights_train(name, params, tiny_backend, toy_task):
    """The encoder itself moves (features are not cached as if it were frozen), not just the head."""
    import torch

    cls = registry.get(name)
    predictor = cls(cls.config_from_dict({**QUICK, **params}), seed=0).adapt(
        tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
    pretrained = dict(tiny_backend._model.named_parameters())
    moved = [n for n, p in predictor.model.encoder.named_parameters() if not torch.equal(p.detach(), pretrained[n])]
    assert any(".layer.1." in n for n in moved)  # the top block trained
    if name == "gradual_unfreeze":
        assert not any("embeddings" in n for n in moved)  # never unfrozen by this schedule


class _NoTrainBackend:
    name = "frozen-api"
    capabilities = frozenset({"embed"})
    model_id = "remote"

    def require(self, *caps, strategy=""):
        from tunebench.backends.base import Backend

        Backend.require(self, *caps, strategy=strategy)


def test_missing_capability_is_a_typed_error(toy_task):
    cls = registry.get("lora")
    with pytest.raises(CapabilityError, match="needs \\['train'\\]"):
        cls(quick_config("lora")).adapt(_NoTrainBackend(), toy_task, train=toy_task.train, dev=toy_task.dev)


@pytest.mark.parametrize("name", sorted(EXPECTED - CAUSAL_ONLY - COMPOSED))
def test_bf16_autocast_path(name, tiny_model_dir, toy_task, tmp_path):
    """The bf16 path (taken automatically on AMX CPUs and bf16 GPUs) trains, predicts and reloads."""
    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig

    backend = load_backend(ModelConfig(path=str(tiny_model_dir), precision="bf16"))
    assert backend.describe()["precision"] == "bf16"
    predictor = registry.get(name)(quick_config(name), seed=0).adapt(backend, toy_task, train=toy_task.train,
                                                                     dev=toy_task.dev)
    scores = predictor.predict_scores(toy_task.test.texts)
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    predictor.save(tmp_path / "a")
    again = load_predictor(tmp_path / "a", backend).predict(toy_task.test.texts)
    assert again.tolist() == predictor.predict(toy_task.test.texts).tolist()
