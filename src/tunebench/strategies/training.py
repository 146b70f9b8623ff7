"""The one training loop shared by every weight-changing strategy, and the predictor they all return.

Strategies differ only in how they prepare the model (freezing, PEFT wrapping), in their parameter
groups (e.g. discriminative learning rates) and in a per-epoch trainable-parameter schedule.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import Split
from ..errors import CapabilityError, ConfigError
from ..evaluation.metrics import classification_metrics
from ..progress import NULL_REPORTER, Reporter
from .base import ExportParts, Predictor, Strategy, TrainConfig, adapter_kind, as_texts, registry
from .causal import CausalLMObjective, CausalPredictor, make_builder

log = logging.getLogger(__name__)

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")

EpochHook = Callable[[int, dict[str, float], float], None]
_EPOCH_HOOK: ContextVar[EpochHook | None] = ContextVar("tunebench_epoch_hook", default=None)


@contextmanager
def on_epoch(hook: EpochHook) -> Iterator[None]:
    """Within the block, :func:`fit` calls ``hook(epoch, dev_metrics, score)`` after each epoch's dev evaluation
    (``score``: the selection score, higher is better). The hook may raise to stop training (the hyperparameter
    search raises ``optuna.TrialPruned``). The previous hook is restored on exit, also on errors."""
    token = _EPOCH_HOOK.set(hook)
    try:
        yield
    finally:
        _EPOCH_HOOK.reset(token)


def epoch_hook() -> EpochHook | None:
    """The hook :func:`on_epoch` installed in this context, or None."""
    return _EPOCH_HOOK.get()


@dataclass
class TrainResult:
    """What the loop did: per-epoch dev metrics, the epoch kept, speed and trainable parameters."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    examples_seen: int = 0
    trainable_params: int = 0
    dev_majority: float | None = None  # dev accuracy of always answering the most frequent class (classification)

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


_FEATURE_CACHE_SIZE = 4  # feature sets kept per backend (a search reuses one train and one dev set)


def cached_features(model: nn.Module, backend, ids: list[list[int]]) -> tuple[torch.Tensor, float]:
    """:func:`frozen_features`, computed once per backend for the same token ids and pooling: the trials of a
    search (and seeds) over a frozen encoder share their inputs, so only the first pays the forward passes.
    Also returns the seconds the features took when first computed (a trial's training time counts them, hit
    or miss, so it reads the same as when the trial runs alone). The pretrained weights behind ``backend``
    never change (every strategy trains a copy), which is what makes the features reusable."""
    digest = hashlib.blake2b(digest_size=16)
    for row in ids:
        digest.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
    key = (getattr(model, "pool", None), model.head.in_features, len(ids), digest.hexdigest())
    cache = backend.__dict__.setdefault("_frozen_feature_cache", OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        log.debug("frozen features reused for %d inputs", len(ids))
        return cache[key]
    t0 = time.perf_counter()
    feats = frozen_features(model, backend, ids)
    cache[key] = (feats, time.perf_counter() - t0)
    while len(cache) > _FEATURE_CACHE_SIZE:
        cache.popitem(last=False)
    return cache[key]


def majority_share(labels) -> float | None:
    """The share of the most frequent label (the accuracy of a constant answer); None without labels."""
    if labels is None or len(labels) == 0:
        return None
    return float(np.bincount(np.asarray(labels, dtype=np.int64)).max() / len(labels))


class Objective:
    """What :func:`fit` trains: a model, the length of each training example, a batch loss, a dev evaluation.

    ``evaluate`` returns dev metrics; ``score_key`` names the one that picks the best epoch (higher is
    better). ``setup`` does one-off work before the first epoch (counted as training time).
    """

    model: nn.Module
    lengths: list[int]
    score_key: str

    def setup(self, trainable: dict[str, torch.nn.Parameter]) -> float:
        """One-off work before training (e.g. features of a frozen encoder); ``trainable``: every parameter
        that may train in some epoch. Returns the seconds of earlier work it reused from a cache (counted as
        this run's training time too, so a trial's cost does not depend on what ran before it)."""
        return 0.0

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, model: nn.Module, idx: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError


class ClassifierObjective(Objective):
    """Cross-entropy of a classification head; dev accuracy and macro-F1. A frozen encoder is run once."""

    def __init__(self, model: nn.Module, backend, cfg: TrainConfig, train: Split, dev: Split, labels: list[str],
                 text_fn: Callable[[Split], list[str]] = lambda s: s.texts):
        self.model, self.backend, self.cfg, self.labels_names = model, backend, cfg, labels
        self.train_ids = backend.tokenize(text_fn(train), cfg.max_length)
        self.dev_ids = backend.tokenize(text_fn(dev), cfg.max_length)
        self.lengths = [len(x) for x in self.train_ids]
        # soft targets (a distill teacher's label distribution): cross-entropy against the distribution
        self.y = (torch.as_tensor(train.soft, dtype=torch.float32) if train.soft is not None
                  else torch.as_tensor(train.labels, dtype=torch.long))
        self.dev_labels = dev.labels
        self.score_key = cfg.metric
        self.loss_fn = nn.CrossEntropyLoss()
        self.frozen = False
        self.train_feats = self.dev_feats = None

    def setup(self, trainable: dict[str, torch.nn.Parameter]) -> float:
        encoder_params = {id(p) for p in self.model.encoder.parameters()}
        self.frozen = not any(id(p) in encoder_params for p in trainable.values())
        if not self.frozen:
            return 0.0
        # e.g. linear probe: encode once (once per backend across a search's trials), then only the head trains
        t0 = time.perf_counter()
        self.train_feats, train_s = cached_features(self.model, self.backend, self.train_ids)
        self.dev_feats, dev_s = cached_features(self.model, self.backend, self.dev_ids)
        return max(0.0, train_s + dev_s - (time.perf_counter() - t0))

    def train_mode(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.encoder.eval()

    def loss(self, model: nn.Module, idx: list[int]) -> torch.Tensor:
        if self.frozen:
            logits = model(features=self.train_feats[idx])
        else:
            with self.backend.autocast():
                logits = model(**self.backend.collate([self.train_ids[i] for i in idx]))
        return self.loss_fn(logits.float(), self.y[idx].to(logits.device))

    def evaluate(self) -> dict[str, float]:
        if self.frozen:
            self.model.eval()
            with torch.inference_mode():
                logits = self.model(features=self.dev_feats).cpu().numpy()
        else:
            logits = predict_logits(self.model, self.backend, self.dev_ids)
        m = classification_metrics(self.dev_labels, logits.argmax(1), self.labels_names)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def _accelerator(backend):
    """The Accelerate handle: a no-op wrapper in one process, DDP and sharding under ``accelerate launch``."""
    from accelerate import Accelerator  # heavy (seconds to import): only once a model trains

    return Accelerator(cpu=backend.device.type == "cpu")


def warmup_linear_decay(optim: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))


@dataclass
class _Step:
    """What one optimisation step needs: the (wrapped) model, optimizer, LR schedule and Accelerate handle."""

    model: nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    accelerator: object

    def __call__(self, objective: Objective, batch_idx: list[int], active: list[torch.nn.Parameter]) -> float:
        """Backpropagate one batch's loss, clip, step; the batch loss."""
        loss = objective.loss(self.model, batch_idx)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(active, 1.0)
        self.optim.step()
        self.sched.step()
        self.optim.zero_grad(set_to_none=True)
        return float(loss.detach())


def _train_epoch(objective: Objective, step: _Step, batches: list[list[int]], active: list[torch.nn.Parameter],
                 reporter: Reporter, label: str) -> float:
    """One pass over ``batches``; the summed batch losses (nothing trains when ``active`` is empty)."""
    reporter.start(label, len(batches))
    running = 0.0
    for batch_idx in batches:
        if active:  # a schedule may leave nothing to train in an epoch
            running += step(objective, batch_idx, active)
        reporter.advance()
    return running


def _selection_score(objective: Objective, dev: dict[str, float]) -> float:
    """The dev score that picks the best epoch (higher is better: a loss counts negated)."""
    score = dev[objective.score_key]
    return -score if objective.score_key == "loss" else score


def _log_epoch(result: TrainResult, epoch: int, running: float, n_batches: int, dev: dict[str, float]) -> None:
    entry = {"epoch": epoch + 1, "train_loss": running / max(1, n_batches), **{f"dev_{k}": v for k, v in dev.items()}}
    result.history.append(entry)
    log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))


def _restore(trainable: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor] | None) -> None:
    """Copy a kept state back into the trainable parameters (None: keep the last epoch's)."""
    if state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state[n])


def fit(objective: Objective, backend, cfg: TrainConfig, *, seed: int, param_groups: list[dict] | None = None,
        schedule: Callable[[int], None] | None = None, reporter: Reporter = NULL_REPORTER) -> TrainResult:
    """Train ``objective.model`` in place and keep the epoch with the best dev score.

    ``param_groups`` hold ``(name, param)`` pairs (every parameter that may ever train) plus optional
    group options such as ``lr``; ``schedule(epoch)`` may toggle ``requires_grad`` before each epoch.
    Runs through Accelerate: in one process it is plain PyTorch; under ``accelerate launch`` the model is
    wrapped for data parallelism and each process takes its share of the batches.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = objective.model
    if param_groups is None:
        param_groups = [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}]
    trainable = {n: p for g in param_groups for n, p in g["params"]}
    optim = make_optimizer(split_decay(param_groups, cfg.weight_decay), cfg.lr)
    accelerator = _accelerator(backend)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = max(1, math.ceil(len(objective.lengths) / cfg.batch_size) // world)
    total = steps_per_epoch * cfg.epochs
    sched = warmup_linear_decay(optim, total, int(cfg.warmup_ratio * total))
    wrapped, optim = accelerator.prepare(model, optim)
    step = _Step(wrapped, optim, sched, accelerator)
    result = TrainResult()
    t0 = time.perf_counter()
    reused = objective.setup(trainable) or 0.0
    result.train_seconds += time.perf_counter() - t0 + reused
    best_score, best_state, stale = -math.inf, None, 0
    max_trainable = 0
    for epoch in range(cfg.epochs):
        if schedule is not None:
            schedule(epoch)
        active = [p for p in trainable.values() if p.requires_grad]
        max_trainable = max(max_trainable, sum(p.numel() for p in active))
        objective.train_mode()
        batches = length_grouped_batches(objective.lengths, cfg.batch_size, rng)
        batches = batches[rank::world][:steps_per_epoch]  # equal shares keep data-parallel processes in step
        t0 = time.perf_counter()
        running = _train_epoch(objective, step, batches, active, reporter, f"epoch {epoch + 1}/{cfg.epochs}")
        result.train_seconds += time.perf_counter() - t0
        result.examples_seen += sum(len(b) for b in batches) * world
        reporter.stop()
        dev = objective.evaluate()
        _log_epoch(result, epoch, running, len(batches), dev)
        score = _selection_score(objective, dev)
        hook = _EPOCH_HOOK.get()
        if hook is not None:
            hook(epoch + 1, dev, score)
        if score > best_score:
            best_score, stale, result.best_epoch = score, 0, epoch + 1
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        else:
            stale += 1
            if cfg.early_stopping and stale >= cfg.early_stopping:
                log.info("early stopping after epoch %d (best %d)", epoch + 1, result.best_epoch)
                break
    _restore(trainable, best_state)
    result.trainable_params = max_trainable
    result.dev_majority = majority_share(getattr(objective, "dev_labels", None))
    model.eval()
    accelerator.free_memory()
    return result


class ClassifierPredictor(Predictor):
    """A trained ``EncoderClassifier``; its artifact holds only the weights that were trained."""

    kind: ClassVar[str] = "classifier"

    def __init__(self, strategy, config, labels, *, model: nn.Module, backend, trained: list[str]):
        super().__init__(strategy, config, labels)
        self.model = model
        self.backend = backend
        self.trained = trained

    def predict_scores(self, inputs) -> np.ndarray:
        ids = self.backend.tokenize(as_texts(inputs), self.config.max_length)
        return predict_logits(self.model, self.backend, ids)

    def export_formats(self) -> tuple[str, ...]:
        # an ONNX graph: an encoder's classifier (a causal LM's body with a last-token head is not exported so)
        return ("hf", "merged", "onnx") if self.backend.name == "encoder" else ("hf", "merged")

    def export_parts(self):
        """The encoder (PEFT-wrapped or not), pooling and head; the tokenizer and how inputs are batched."""
        n = int(getattr(self.config, "max_length", 512))
        limit = getattr(self.backend, "max_positions", None)
        return ExportParts(
            "classifier", list(self.labels), model=self.model.encoder, adapter=adapter_kind(self.model.encoder),
            tokenizer=self.export_tokenizer(), max_length=min(n, limit) if limit else n, max_positions=limit,
            head=self.model.head, pooling=self.model.pool,
            batch=lambda texts, max_length: self.backend.collate(self.backend.tokenize(texts, max_length)))

    def _save(self, directory: Path) -> None:
        state = self.model.state_dict()
        save_file({k: state[k].detach().cpu().clone().contiguous() for k in self.trained},
                  str(directory / "weights.safetensors"))

    @classmethod
    def _load(cls, directory, backend, strategy, config, labels):
        strat = registry.get(strategy)(config)
        model = strat.build_model(backend, len(labels))
        weights = load_file(str(directory / "weights.safetensors"), device=str(backend.device))
        missing = set(weights) - set(model.state_dict())
        if missing:
            raise ValueError(f"{directory}: artifact weights do not fit the model: {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
        model.eval()
        return cls(strategy, config, labels, model=model, backend=backend, trained=sorted(weights))


def trained_names(model: nn.Module, groups: list[dict] | None) -> list[str]:
    """Names of the parameters that may have trained (what an artifact must keep)."""
    if groups is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in groups for _, p in g["params"]]


class TuningStrategy(Strategy):
    """Base of weight-changing strategies: build and prepare the model, then run :func:`fit`.

    On the encoder backend the model is an ``EncoderClassifier`` prepared by :meth:`prepare`; on the
    causal backend it is a copy of the LM prepared by :meth:`prepare_lm` and trained on prompt + answer
    (``lm_objective = False`` keeps the classifier head on the LM's features instead, as linear probing does).
    """

    requires: ClassVar[tuple[str, ...]] = ("train",)
    predictor_cls: ClassVar[type[Predictor]] = ClassifierPredictor
    lm_objective: ClassVar[bool] = True
    config: TrainConfig

    def uses_lm(self, backend) -> bool:
        return backend.name == "causal" and self.lm_objective

    def check(self, backend, task_type: str = "classification") -> None:
        super().check(backend, task_type)
        if task_type == "generation" and not self.lm_objective:
            raise CapabilityError(f"strategy '{self.name}' trains a classification head; a generation task "
                                  "needs a strategy that trains the LM (lora, full, soft_prompt, gradual_unfreeze)")

    def preflight(self, backend, task_type: str = "classification") -> None:
        self.check(backend, task_type)
        try:  # catches config mistakes PEFT only sees on a real model (e.g. target_modules that match nothing)
            if self.uses_lm(backend):
                self.build_lm(backend)
            else:
                self.build_model(backend, 2)
        except Exception as exc:
            raise ConfigError(f"strategy '{self.name}': cannot prepare the model with {self.config.to_dict()}: "
                              f"{str(exc).splitlines()[0]}") from None

    def build_model(self, backend, num_labels: int) -> nn.Module:
        """A fresh classifier, prepared for this strategy (frozen parts, PEFT wrapping)."""
        model = backend.build_classifier(num_labels, self.config.dropout)
        self.prepare(model)
        return model

    def build_lm(self, backend) -> nn.Module:
        """A fresh copy of the causal LM, prepared for this strategy."""
        return self.prepare_lm(backend.lm_copy()).to(backend.device)

    def prepare(self, model: nn.Module) -> None:
        """Set what trains in an ``EncoderClassifier``. Default: everything."""

    def prepare_lm(self, lm: nn.Module) -> nn.Module:
        """Set what trains in a causal LM (may wrap it, e.g. with PEFT). Default: everything."""
        return lm

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Parameter groups for the optimizer; None: every parameter with ``requires_grad``."""
        return None

    def schedule(self, model: nn.Module) -> Callable[[int], None] | None:
        """Per-epoch trainable-parameter schedule; None: fixed."""
        return None

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        if self.uses_lm(backend):
            return self.adapt_lm(backend, task, train=train, dev=dev, builder=make_builder(self.config, task))
        labels = list(task.label_names)
        torch.manual_seed(self.seed)  # head and adapter initialisation depend on the seed only
        model = self.build_model(backend, len(labels))
        groups = self.param_groups(model)
        objective = ClassifierObjective(model, backend, self.config, train, dev, labels)
        result = fit(objective, backend, self.config, seed=self.seed, param_groups=groups,
                     schedule=self.schedule(model), reporter=self.reporter)
        predictor = ClassifierPredictor(self.name, self.config, labels, model=model, backend=backend,
                                        trained=trained_names(model, groups))
        predictor.train_result = result
        return predictor

    def adapt_lm(self, backend, task, *, train, dev, builder, retrieval=None, name: str | None = None,
                 config=None, decode=None, mode: str | None = None) -> Predictor:
        """Supervised fine-tuning of the LM on ``builder``'s prompts; the predictor prompts the tuned model.

        A hybrid passes its own ``name`` and ``config`` (what the artifact records), the prompt strategy's
        ``decode`` options and prediction ``mode``.
        """
        torch.manual_seed(self.seed)
        model = self.build_lm(backend)
        groups = self.param_groups(model)
        predictor = CausalPredictor(name or self.name, config or self.config, list(task.label_names),
                                    backend=backend, builder=builder, mode=mode or self.config.predict, model=model,
                                    retrieval=retrieval, seed=self.seed, decode=decode or self.config)
        objective = CausalLMObjective(predictor, task, self.config, train, dev)
        result = fit(objective, backend, self.config, seed=self.seed, param_groups=groups,
                     schedule=self.schedule(model), reporter=self.reporter)
        predictor.trained = trained_names(model, groups)
        predictor.train_result = result
        return predictor
