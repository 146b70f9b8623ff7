"""Tuning defaults that scale with the data: a pure function of (strategy, training examples, classes, backend).

A fixed "3 epochs at lr 1e-4" is too little training for 100 examples and more than needed for 10,000. The
defaults below are chosen from a calibration on SST-2 and BANKING77 subsets (``bench/calibrate_defaults.py``;
the table it printed is in docs/architecture.md, "Tuning defaults"):

* batch size 16 below 1,000 examples (enough optimisation steps per epoch), 32 from there on;
* epochs from a target number of optimisation steps, clamped to a per-strategy range; early stopping (patience)
  whenever the epoch budget is long, so a run that has converged stops and the best dev epoch is kept;
* the learning rate per strategy, from the calibration's best dev accuracy;
* with many classes and few examples each (over 10 classes, under 100 examples per class), twice the steps and
  three times the learning rate.

They apply where a study leaves a key unset: explicit values (in the entry, in ``training:`` or searched) win.
Calibrated on the encoder backend only; on a causal LM the strategies keep their fixed defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALED_KEYS = ("lr", "epochs", "batch_size", "early_stopping")  # warm-up stays at 6% of the steps: not calibrated


@dataclass(frozen=True)
class _Rule:
    lrs: tuple[float, float, float]  # learning rate below 1,000 examples, below 10,000, from 10,000
    steps: int  # target optimisation steps over the run
    min_epochs: int
    max_epochs: int


RULES: dict[str, _Rule] = {  # calibrated: full and lora; gradual unfreezing is full fine-tuning on a schedule
    "full": _Rule((1e-4, 1e-4, 1e-4), steps=400, min_epochs=3, max_epochs=20),
    "gradual_unfreeze": _Rule((1e-4, 1e-4, 1e-4), steps=400, min_epochs=6, max_epochs=20),
    "lora": _Rule((1e-3, 1e-3, 1e-3), steps=400, min_epochs=3, max_epochs=20),
}
AUTO_SEARCHED = ("full", "gradual_unfreeze", "lora", "linear_probe", "soft_prompt")  # strategies with search: auto


def scaled_defaults(strategy: str, n_train: int, n_classes: int, backend: str = "encoder") -> dict[str, float | int]:
    """The size-scaled values of :data:`SCALED_KEYS` for ``strategy`` trained on ``n_train`` examples of
    ``n_classes`` classes (0 for generation); ``{}`` where nothing is calibrated (causal LMs, prompting)."""
    if not is_scaled(strategy, backend) or n_train < 1:
        return {}
    rule = RULES[strategy]
    batch = 16 if n_train < 1000 else 32
    steps_per_epoch = math.ceil(n_train / batch)
    # many classes with few examples each (BANKING77 at 100 examples): a head over many classes learns from few
    # examples per class; twice the steps and 3x the learning rate were best in the calibration
    many = n_classes > 10 and n_train / n_classes < 100
    epochs = min(rule.max_epochs, max(rule.min_epochs, math.ceil(rule.steps * (2 if many else 1) / steps_per_epoch)))
    lr = rule.lrs[0] if n_train < 1000 else rule.lrs[1] if n_train < 10_000 else rule.lrs[2]
    lr = float(f"{lr * 3:.3g}") if many else lr
    return {"lr": lr, "epochs": epochs, "batch_size": batch, "early_stopping": patience(epochs)}


def is_scaled(strategy: str, backend: str = "encoder") -> bool:
    """Whether ``strategy`` on ``backend`` has size-scaled defaults at all."""
    return strategy in RULES and backend == "encoder"


def patience(epochs: int) -> int:
    """Early-stopping patience for a run of ``epochs``: off up to 4 epochs, then a fifth of the run (at least 2)."""
    return 0 if epochs <= 4 else max(2, epochs // 5)


def auto_search(strategy: str, n_train: int, n_classes: int, backend: str, base: dict,
                fixed: set[str] = frozenset()) -> tuple[dict, int]:
    """``search: auto``: the searched space of ``strategy`` and its budget in configurations.

    The space is centred on ``base`` (the trial's config with its size-scaled defaults): the learning rate over
    [lr / 4, lr x 4] (log), epochs over [epochs / 2, epochs x 2], plus what matters for the strategy (LoRA's rank
    and alpha, soft prompts' virtual tokens, gradual unfreezing's layer decay, a probe's weight decay). Keys in
    ``fixed`` (set explicitly in the study) are not searched. Strategies without calibrated defaults (linear probe,
    soft prompt) are searched around their fixed defaults. The budget shrinks as each configuration gets
    dearer: 12 configurations up to 500 examples, 8 up to 5,000, 6 beyond. ``({}, 0)`` for a strategy that has no
    such space (prompting strategies: ``prompt_search`` is their search)."""
    if strategy not in AUTO_SEARCHED:
        return {}, 0
    lr, epochs = float(base["lr"]), int(base["epochs"])
    space: dict = {"lr": {"low": float(f"{lr / 4:.3g}"), "high": float(f"{lr * 4:.3g}"), "log": True},
                   "epochs": {"low": max(1, epochs // 2), "high": max(2, min(2 * epochs, 10_000))}}
    space.update({
        "lora": {"r": [4, 8, 16, 32], "alpha": [8, 16, 32, 64]},
        "soft_prompt": {"virtual_tokens": [5, 10, 20, 50]},
        "gradual_unfreeze": {"layer_lr_decay": [0.5, 0.8, 1.0]},
        "linear_probe": {"weight_decay": [0.0, 0.01, 0.1]},
    }.get(strategy, {}))
    space = {k: v for k, v in space.items() if k not in fixed}
    trials = 12 if n_train <= 500 else 8 if n_train <= 5000 else 6
    return space, trials
