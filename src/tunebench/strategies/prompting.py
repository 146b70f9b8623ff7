"""Prompting with frozen weights on an embedding backend: zero-shot label prompts and few-shot demonstrations."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..textfmt import placeholders, render
from .base import Predictor, Strategy, StrategyConfig, doc, register


class EmbeddingPredictor(Predictor):
    """Scores classes by cosine similarity between the input's embedding and stored anchor embeddings.

    ``mode='prototype'``: one anchor per class, score = similarity. ``mode='knn'``: anchors are
    demonstrations, a class scores the summed similarity of its members among the ``k`` nearest.
    """

    kind: ClassVar[str] = "embedding"

    def __init__(self, strategy, config, labels, *, backend, anchors: torch.Tensor, anchor_labels: torch.Tensor,
                 mode: str = "prototype", k: int = 1, max_length: int = 256):
        super().__init__(strategy, config, labels)
        self.backend = backend
        self.anchors = anchors.float()
        self.anchor_labels = anchor_labels.long()
        self.mode = mode
        self.k = k
        self.max_length = max_length

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        emb = self.backend.embed(texts, max_length=self.max_length)
        sims = emb @ self.anchors.T
        n_labels = len(self.labels)
        if self.mode == "prototype":
            scores = torch.full((len(texts), n_labels), -2.0)
            scores[:, self.anchor_labels] = sims
            return scores.numpy()
        k = min(self.k, sims.shape[1])
        top, idx = sims.topk(k, dim=1)
        scores = torch.zeros((len(texts), n_labels))
        scores.scatter_add_(1, self.anchor_labels[idx], top + 1.0)  # +1 keeps contributions positive
        return scores.numpy()

    def _save(self, directory: Path) -> None:
        save_file({"anchors": self.anchors.contiguous(), "anchor_labels": self.anchor_labels.contiguous()},
                  str(directory / "anchors.safetensors"))
        import json

        (directory / "embedding.json").write_text(
            json.dumps({"mode": self.mode, "k": self.k, "max_length": self.max_length}), encoding="utf-8")

    @classmethod
    def _load(cls, directory, backend, strategy, config, labels):
        import json

        t = load_file(str(directory / "anchors.safetensors"))
        opts = json.loads((directory / "embedding.json").read_text(encoding="utf-8"))
        return cls(strategy, config, labels, backend=backend, anchors=t["anchors"], anchor_labels=t["anchor_labels"],
                   **opts)


def readable(name: str) -> str:
    """``card_arrival`` -> ``card arrival``: label names as words for prompts."""
    return name.replace("_", " ").replace("-", " ").strip()


@dataclass
class ZeroShotConfig(StrategyConfig):
    """Zero-shot: label prompts rendered from templates; each template is its own trial."""

    templates: list[str] = doc("Label prompt templates with {label} (and optionally {description}).",
                               default_factory=lambda: ["{label}"])
    use_descriptions: bool = doc("Also embed each label's description, when the task gives one.", default=True)
    max_length: int = doc("Tokens kept per input.", default=256)

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("templates: give at least one template")
        if self.max_length < 8:
            raise ValueError("max_length must be >= 8")
        for t in self.templates:
            bad = [p for p in placeholders(t) if p not in ("label", "description")]
            if "label" not in placeholders(t) or bad:
                raise ValueError(f"template {t!r} must use {{label}} (and may use {{description}}), nothing else")


@register
class ZeroShot(Strategy):
    """Classify by similarity between the input and each label's prompt; no training data used."""

    name = "zero_shot"
    config_cls = ZeroShotConfig
    family = "prompting"
    requires = ("embed",)
    uses_train = False
    predictor_cls = EmbeddingPredictor
    config: ZeroShotConfig

    @classmethod
    def expand(cls, config: ZeroShotConfig) -> list[ZeroShotConfig]:
        return [replace(config, templates=[t]) for t in config.templates]

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend)
        (template,) = self.config.templates[:1]
        prompts, owner = [], []
        for i, lab in enumerate(task.labels):
            desc = lab.description or ""
            prompts.append(render(template, {"label": readable(lab.name), "description": desc}))
            owner.append(i)
            if self.config.use_descriptions and lab.description:
                prompts.append(lab.description)
                owner.append(i)
        emb = backend.embed(prompts, max_length=self.config.max_length)
        owner_t = torch.tensor(owner)
        anchors = torch.stack([emb[owner_t == i].mean(0) for i in range(len(task.labels))])
        anchors = torch.nn.functional.normalize(anchors, dim=-1)
        return EmbeddingPredictor(self.name, self.config, task.label_names, backend=backend, anchors=anchors,
                                  anchor_labels=torch.arange(len(task.labels)), max_length=self.config.max_length)


@dataclass
class FewShotConfig(StrategyConfig):
    """Few-shot: k labelled demonstrations per class from train, nearest prototype or k-nearest neighbours."""

    shots: int = doc("Demonstrations per class.", default=8)
    selection: str = doc("balanced: exactly `shots` per class; random: shots x classes drawn from train.",
                         default="balanced")
    classifier: str = doc("prototype: nearest class mean; knn: vote of the k nearest demonstrations.",
                          default="prototype")
    k: int = doc("Neighbours for classifier=knn.", default=3)
    max_length: int = doc("Tokens kept per input.", default=256)

    def __post_init__(self) -> None:
        if self.shots < 1 or self.k < 1 or self.max_length < 8:
            raise ValueError("need shots >= 1, k >= 1 and max_length >= 8")
        if self.selection not in ("balanced", "random"):
            raise ValueError(f"selection must be 'balanced' or 'random', not {self.selection!r}")
        if self.classifier not in ("prototype", "knn"):
            raise ValueError(f"classifier must be 'prototype' or 'knn', not {self.classifier!r}")


@register
class FewShot(Strategy):
    """Pick demonstrations from train (seeded) and classify by their embeddings."""

    name = "few_shot"
    config_cls = FewShotConfig
    family = "prompting"
    requires = ("embed",)
    predictor_cls = EmbeddingPredictor
    config: FewShotConfig

    def select(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.config.selection == "random":
            n = min(len(labels), self.config.shots * n_classes)
            return np.sort(rng.choice(len(labels), size=n, replace=False))
        picked = []
        for c in range(n_classes):
            idx = np.flatnonzero(labels == c)
            picked.extend(rng.choice(idx, size=min(len(idx), self.config.shots), replace=False).tolist())
        return np.sort(np.asarray(picked, dtype=np.int64))

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend)
        n = len(task.labels)
        chosen = self.select(train.labels, n)
        emb = backend.embed([train.texts[i] for i in chosen], max_length=self.config.max_length)
        ys = torch.as_tensor(train.labels[chosen])
        if self.config.classifier == "prototype":
            present = torch.unique(ys)
            anchors = torch.nn.functional.normalize(torch.stack([emb[ys == c].mean(0) for c in present]), dim=-1)
            return EmbeddingPredictor(self.name, self.config, task.label_names, backend=backend, anchors=anchors,
                                      anchor_labels=present, max_length=self.config.max_length)
        return EmbeddingPredictor(self.name, self.config, task.label_names, backend=backend, anchors=emb,
                                  anchor_labels=ys, mode="knn", k=self.config.k, max_length=self.config.max_length)
