"""The one training loop shared by every weight-changing strategy, and the predictor they all return.

Strategies differ only in how they prepare the model (freezing, PEFT wrapping), in their parameter
groups (e.g. discriminative learning rates) and in a per-epoch trainable-parameter schedule.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import Split
from ..errors import ConfigError
from ..evaluation.metrics import classification_metrics
from ..progress import NULL_REPORTER, Reporter
from .base import Predictor, Strategy, TrainConfig

log = logging.getLogger(__name__)

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class TrainResult:
    """What the loop did: per-epoch dev metrics, the epoch kept, speed and trainable parameters."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    examples_seen: int = 0
    trainable_params: int = 0

    @property
    def examples_per_s(self) -> float:
        return self.examples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def length_grouped_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length examples: sort within shuffled windows of 50 batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window].tolist(), key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def split_decay(groups: list[dict], weight_decay: float) -> list[dict]:
    """Split each parameter group into decayed and non-decayed (bias, norm) parameters."""
    out = []
    for g in groups:
        named = g["params"]
        extra = {k: v for k, v in g.items() if k != "params"}
        decay = [p for n, p in named if not n.endswith(_NO_DECAY)]
        nodecay = [p for n, p in named if n.endswith(_NO_DECAY)]
        if decay:
            out.append({"params": decay, "weight_decay": weight_decay, **extra})
        if nodecay:
            out.append({"params": nodecay, "weight_decay": 0.0, **extra})
    return out


def make_optimizer(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where this PyTorch supports it: 5x faster steps on CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


@torch.inference_mode()
def _batched(fn, backend, ids: list[list[int]], width: int, batch_size: int) -> torch.Tensor:
    """``fn(batch)`` over length-sorted batches, rows back in input order."""
    out = torch.zeros((len(ids), width), dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        with backend.autocast():
            out[chunk] = fn(backend.collate([ids[i] for i in chunk])).float().cpu()
    return out


def predict_logits(model: nn.Module, backend, ids: list[list[int]], batch_size: int = 128) -> np.ndarray:
    """Logits for tokenized inputs, batched by length, in input order."""
    was_training = model.training
    model.eval()
    out = _batched(lambda b: model(**b), backend, ids, model.head.out_features, batch_size).numpy()
    model.train(was_training)
    return out


def frozen_features(model: nn.Module, backend, ids: list[list[int]], batch_size: int = 128) -> torch.Tensor:
    """Pooled features of a frozen encoder (eval mode), computed once so that only the head's epochs repeat."""
    model.encoder.eval()
    width = model.head.in_features
    return _batched(lambda b: model.features(**b), backend, ids, width, batch_size).to(backend.device)


def fit(model: nn.Module, backend, cfg: TrainConfig, *, train: Split, dev: Split, seed: int,
        param_groups: list[dict] | None = None, schedule: Callable[[int], None] | None = None,
        labels: list[str], reporter: Reporter = NULL_REPORTER) -> TrainResult:
    """Train ``model`` (an ``EncoderClassifier``) in place and keep the epoch with the best dev metric.

    ``param_groups`` hold ``(name, param)`` pairs (every parameter that may ever train) plus optional
    group options such as ``lr``; ``schedule(epoch)`` may toggle ``requires_grad`` before each epoch.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if param_groups is None:
        param_groups = [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}]
    trainable = {n: p for g in param_groups for n, p in g["params"]}
    optim = make_optimizer(split_decay(param_groups, cfg.weight_decay), cfg.lr)
    train_ids = backend.tokenize(train.texts, cfg.max_length)
    dev_ids = backend.tokenize(dev.texts, cfg.max_length)
    lengths = [len(x) for x in train_ids]
    y = torch.as_tensor(train.labels, dtype=torch.long)
    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    loss_fn = nn.CrossEntropyLoss()
    result = TrainResult()
    encoder_params = {id(p) for p in model.encoder.parameters()}
    frozen_encoder = not any(id(p) in encoder_params for p in trainable.values())
    if frozen_encoder:  # e.g. linear probe: encode once, then only the head's epochs repeat
        t0 = time.perf_counter()
        train_feats, dev_feats = frozen_features(model, backend, train_ids), frozen_features(model, backend, dev_ids)
        result.train_seconds += time.perf_counter() - t0

        def train_logits(idx: list[int]) -> torch.Tensor:
            return model.classify(train_feats[idx])

        def dev_logits() -> np.ndarray:
            model.eval()
            with torch.inference_mode():
                return model.classify(dev_feats).cpu().numpy()
    else:
        def train_logits(idx: list[int]) -> torch.Tensor:
            with backend.autocast():
                return model(**backend.collate([train_ids[i] for i in idx]))

        def dev_logits() -> np.ndarray:
            return predict_logits(model, backend, dev_ids)
    best_score, best_state, stale = -1.0, None, 0
    max_trainable = 0
    for epoch in range(cfg.epochs):
        if schedule is not None:
            schedule(epoch)
        max_trainable = max(max_trainable, sum(p.numel() for p in trainable.values() if p.requires_grad))
        model.train()
        if frozen_encoder:
            model.encoder.eval()
        reporter.start(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
        t0 = time.perf_counter()
        running = 0.0
        for batch_idx in length_grouped_batches(lengths, cfg.batch_size, rng):
            logits = train_logits(batch_idx)
            loss = loss_fn(logits.float(), y[batch_idx].to(logits.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in trainable.values() if p.requires_grad], 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            running += float(loss.detach())
            reporter.advance()
        result.train_seconds += time.perf_counter() - t0
        result.examples_seen += len(train_ids)
        reporter.stop()
        dev_pred = dev_logits().argmax(1)
        m = classification_metrics(dev.labels, dev_pred, labels)
        entry = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch,
                 "dev_accuracy": m["accuracy"], "dev_macro_f1": m["macro_f1"]}
        result.history.append(entry)
        log.info("epoch %d: loss %.4f dev accuracy %.4f macro-F1 %.4f", epoch + 1, entry["train_loss"],
                 m["accuracy"], m["macro_f1"])
        score = m[cfg.metric]
        if score > best_score:
            best_score, stale, result.best_epoch = score, 0, epoch + 1
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        else:
            stale += 1
            if cfg.early_stopping and stale >= cfg.early_stopping:
                log.info("early stopping after epoch %d (best %d)", epoch + 1, result.best_epoch)
                break
    if best_state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
    result.trainable_params = max_trainable
    model.eval()
    return result


class ClassifierPredictor(Predictor):
    """A trained ``EncoderClassifier``; its artifact holds only the weights that were trained."""

    kind: ClassVar[str] = "classifier"

    def __init__(self, strategy, config, labels, *, model: nn.Module, backend, trained: list[str]):
        super().__init__(strategy, config, labels)
        self.model = model
        self.backend = backend
        self.trained = trained

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        ids = self.backend.tokenize(texts, self.config.max_length)
        return predict_logits(self.model, self.backend, ids)

    def _save(self, directory: Path) -> None:
        state = self.model.state_dict()
        save_file({k: state[k].detach().contiguous().cpu() for k in self.trained}, str(directory / "weights.safetensors"))

    @classmethod
    def _load(cls, directory, backend, strategy, config, labels):
        from .base import registry

        strat = registry.get(strategy)(config)
        model = strat.build_model(backend, len(labels))
        weights = load_file(str(directory / "weights.safetensors"), device=str(backend.device))
        missing = set(weights) - set(model.state_dict())
        if missing:
            raise ValueError(f"{directory}: artifact weights do not fit the model: {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
        model.eval()
        return cls(strategy, config, labels, model=model, backend=backend, trained=sorted(weights))


class TuningStrategy(Strategy):
    """Base of weight-changing strategies: build and prepare the model, then run :func:`fit`."""

    requires: ClassVar[tuple[str, ...]] = ("train",)
    predictor_cls: ClassVar[type[Predictor]] = ClassifierPredictor
    config: TrainConfig

    def preflight(self, backend) -> None:
        self.check(backend)
        try:  # catches config mistakes PEFT only sees on a real model (e.g. target_modules that match nothing)
            self.build_model(backend, 2)
        except Exception as exc:
            raise ConfigError(f"strategy '{self.name}': cannot prepare the model with {self.config.to_dict()}: "
                              f"{str(exc).splitlines()[0]}") from None

    def build_model(self, backend, num_labels: int) -> nn.Module:
        """A fresh classifier, prepared for this strategy (frozen parts, PEFT wrapping)."""
        model = backend.build_classifier(num_labels, self.config.dropout)
        self.prepare(model)
        return model

    def prepare(self, model: nn.Module) -> None:
        """Set what trains. Default: everything."""

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Parameter groups for the optimizer; None: every parameter with ``requires_grad``."""
        return None

    def schedule(self, model: nn.Module) -> Callable[[int], None] | None:
        """Per-epoch trainable-parameter schedule; None: fixed."""
        return None

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend)
        labels = list(task.label_names)
        torch.manual_seed(self.seed)  # head and adapter initialisation depend on the seed only
        model = self.build_model(backend, len(labels))
        groups = self.param_groups(model)
        result = fit(model, backend, self.config, train=train, dev=dev, seed=self.seed, param_groups=groups,
                     schedule=self.schedule(model), labels=labels, reporter=self.reporter)
        names = {id(p): n for n, p in model.named_parameters()}
        if groups is None:
            trained = [n for n, p in model.named_parameters() if p.requires_grad]
        else:
            trained = [names[id(p)] for g in groups for _, p in g["params"]]
        predictor = ClassifierPredictor(self.name, self.config, labels, model=model, backend=backend, trained=trained)
        predictor.train_result = result
        return predictor
