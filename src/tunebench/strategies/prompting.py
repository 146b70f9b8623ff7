"""Prompting with frozen weights: zero-shot, few-shot and chain-of-thought.

On the encoder backend, prompts are embedded (label prompts, demonstration prototypes or neighbours); on
the causal backend they are Jinja2 templates the LM reads, scored label by label or answered by generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CapabilityError, ConfigError
from ..prompts import PromptTemplate, select_demonstrations
from .base import ExportParts, Predictor, PromptConfig, Strategy, as_texts, doc, register
from .causal import CausalPredictor, Retrieval, demo_pool, make_builder, select_demos


class EmbeddingPredictor(Predictor):
    """Scores classes by cosine similarity between the input's embedding and stored anchor embeddings.

    ``mode='prototype'``: one anchor per class, score = similarity. ``mode='knn'``: anchors are
    demonstrations, a class scores the summed similarity of its members among the ``k`` nearest.
    ``mode='kernel'``: anchors are demonstrations, a class scores ``tau * log(sum(exp((sim - 1) / tau)))``
    over its members (a soft nearest neighbour). ``center`` (optional) is subtracted from every embedding
    before the cosine (the anchors were built the same way); ``label_anchors`` (optional) add
    ``label_weight`` times the similarity to each label's prompt.
    """

    kind: ClassVar[str] = "embedding"

    def __init__(self, strategy, config, labels, *, backend, anchors: torch.Tensor, anchor_labels: torch.Tensor,
                 mode: str = "prototype", k: int = 1, max_length: int = 256, prompt: dict | None = None,
                 tau: float = 0.05, center: torch.Tensor | None = None, label_anchors: torch.Tensor | None = None,
                 label_weight: float = 0.0):
        super().__init__(strategy, config, labels)
        self.prompt = prompt  # what a prompt search chose (label prompt, demonstrations, weight)
        self.backend = backend
        self.anchors = anchors.float()
        self.anchor_labels = anchor_labels.long()
        self.mode = mode
        self.k = k
        self.max_length = max_length
        self.tau = tau
        self.center = None if center is None else center.float()
        self.label_anchors = None if label_anchors is None else label_anchors.float()
        self.label_weight = label_weight

    def scores_of(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores of (normalised) input embeddings. ``exclude[i]`` (knn and kernel modes) is an anchor row
        input ``i`` must not see (its own copy, when scoring demonstrations leave-one-out); -1 for none."""
        if self.center is not None:
            emb = torch.nn.functional.normalize(emb - self.center, dim=-1)
        sims = emb @ self.anchors.T
        if exclude is not None and self.mode != "prototype":
            rows = torch.nonzero(exclude >= 0).flatten()
            sims[rows, exclude[rows]] = -torch.inf
        n_labels = len(self.labels)
        if self.mode == "prototype":
            scores = torch.full((len(emb), n_labels), -2.0)
            scores[:, self.anchor_labels] = sims
        elif self.mode == "kernel":
            mass = torch.zeros((len(emb), n_labels)).index_add_(1, self.anchor_labels, torch.exp((sims - 1) / self.tau))
            scores = self.tau * torch.log(mass + 1e-30)
        else:
            top, idx = sims.topk(min(self.k, sims.shape[1]), dim=1)
            scores = torch.zeros((len(emb), n_labels))
            scores.scatter_add_(1, self.anchor_labels[idx], top + 1.0)  # +1 keeps contributions positive
        if self.label_anchors is not None and self.label_weight:
            scores = scores + self.label_weight * (emb @ self.label_anchors.T)
        return scores

    def predict_scores(self, inputs) -> np.ndarray:
        texts = as_texts(inputs)
        return self.scores_of(self.backend.embed(texts, max_length=self.max_length)).numpy()

    def prompt_info(self, record: dict | None = None) -> dict | None:
        return dict(self.prompt) if self.prompt else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``anchors.safetensors`` holds (the artifact and the export share it)."""
        out = {"anchors": self.anchors, "anchor_labels": self.anchor_labels, "center": self.center,
               "label_anchors": self.label_anchors}
        return {k: v.contiguous() for k, v in out.items() if v is not None}

    def export_formats(self) -> tuple[str, ...]:
        return ("hf",)  # the anchors for the unchanged base encoder

    def export_parts(self):
        """The anchor tensors, how they are compared (``embedding.json``) and the tokenizer."""
        emb = {"labels": list(self.labels), "mode": self.mode, "k": self.k, "tau": self.tau,
               "label_weight": self.label_weight, "max_length": self.max_length, "pooling": "mean",
               "normalize": True, "centered": self.center is not None}
        return ExportParts("embedding", list(self.labels), tokenizer=self.export_tokenizer(),
                           max_length=self.max_length, tensors=self.tensors(), embedding=emb)

    def _save(self, directory: Path) -> None:
        save_file(self.tensors(), str(directory / "anchors.safetensors"))
        (directory / "embedding.json").write_text(
            json.dumps({"mode": self.mode, "k": self.k, "max_length": self.max_length, "prompt": self.prompt,
                        "tau": self.tau, "label_weight": self.label_weight}), encoding="utf-8")

    @classmethod
    def _load(cls, directory, backend, strategy, config, labels):
        t = load_file(str(directory / "anchors.safetensors"))
        opts = json.loads((directory / "embedding.json").read_text(encoding="utf-8"))
        return cls(strategy, config, labels, backend=backend, anchors=t["anchors"], anchor_labels=t["anchor_labels"],
                   center=t.get("center"), label_anchors=t.get("label_anchors"), **opts)


def readable(name: str) -> str:
    """``card_arrival`` -> ``card arrival``: label names as words for prompts."""
    return name.replace("_", " ").replace("-", " ").strip()


class PromptingStrategy(Strategy):
    """Frozen weights: on the encoder backend embeddings; on the causal backend the LM reads a prompt."""

    family = "prompting"
    backends = ("encoder", "causal", "openai")
    reasoning: ClassVar[bool] = False
    config: PromptConfig

    def needs(self, backend) -> tuple[str, ...]:
        if backend.lm:
            return ("generate",) if self.reasoning or self.config.predict == "generate" else ("score",)
        return self.requires

    def demonstrations(self, backend, task, train) -> tuple[list[dict], Retrieval | None]:
        """Fixed demonstrations for every input, or a retrieval index (default: none)."""
        return [], None

    def build_prompt(self, backend, task, train):
        """The prompt builder and retrieval of this strategy (hybrids train a model on the same prompt)."""
        demos, retrieval = self.demonstrations(backend, task, train)
        return make_builder(self.config, task, reasoning=self.reasoning, demos=demos), retrieval

    def mode(self) -> str:
        return "reason" if self.reasoning else self.config.predict

    def adapt_causal(self, backend, task, *, train, dev) -> Predictor:
        builder, retrieval = self.build_prompt(backend, task, train)
        return CausalPredictor(self.name, self.config, task.label_names, backend=backend, builder=builder,
                               mode=self.mode(), retrieval=retrieval, seed=self.seed)


@dataclass
class ZeroShotConfig(PromptConfig):
    """Zero-shot: no training data. Encoder: label prompts; causal: instruction + template."""

    label_templates: list[str] = doc(
        "encoder: Jinja2 label prompts with {{ label }} (and {{ description }}); each is its own trial.",
        default_factory=lambda: ["{{ label }}"])
    use_descriptions: bool = doc("encoder: also embed each label's description, when the task gives one.",
                                 default=True)
    max_length: int = doc("Tokens kept per input (causal: per prompt).", default=256)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.label_templates:
            raise ValueError("label_templates: give at least one template")
        if self.max_length < 8:
            raise ValueError("max_length must be >= 8")
        for t in self.label_templates:
            try:
                tpl = PromptTemplate(t, "label_templates")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            bad = [v for v in tpl.variables if v not in ("label", "description")]
            if "label" not in tpl.variables or bad:
                raise ValueError(f"label template {t!r} must use {{{{ label }}}} (and may use {{{{ description }}}}), "
                                 "nothing else")


@register
class ZeroShot(PromptingStrategy):
    """Classify (or answer) with no training data: label prompts on an encoder, an instruction on an LM."""

    name = "zero_shot"
    config_cls = ZeroShotConfig
    requires = ("embed",)
    uses_train = False
    predictor_cls = EmbeddingPredictor
    config: ZeroShotConfig

    @classmethod
    def expand(cls, config: ZeroShotConfig) -> list[ZeroShotConfig]:
        out = []
        for c in super().expand(config):
            out.extend(replace(c, label_templates=[t]) for t in c.label_templates)
        return out

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        if backend.lm:
            return self.adapt_causal(backend, task, train=train, dev=dev)
        tpl = PromptTemplate(self.config.label_templates[0], "label_templates")
        prompts, owner = [], []
        for i, lab in enumerate(task.labels):
            desc = lab.description or ""
            prompts.append(tpl.render({"label": readable(lab.name), "description": desc}))
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
class FewShotConfig(PromptConfig):
    """Few-shot: labelled demonstrations from train. Encoder: prototypes or k-NN; causal: in the prompt."""

    shots: int = doc("Demonstrations per class (generation tasks: in all).", default=8)
    selection: str = doc("balanced: `shots` per class; random: shots x classes drawn from train; retrieved "
                         "(causal): the shots x classes training examples most similar to each input, by "
                         "the embeddings of model.retriever.", default="balanced")
    classifier: str = doc("encoder: prototype (nearest class mean) or knn (vote of the k nearest).",
                          default="prototype")
    k: int = doc("encoder: neighbours for classifier=knn.", default=3)
    max_length: int = doc("Tokens kept per input (causal: per prompt; a longer prompt keeps its end).",
                          default=1024)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shots < 1 or self.k < 1 or self.max_length < 8:
            raise ValueError("need shots >= 1, k >= 1 and max_length >= 8")
        if self.selection not in ("balanced", "random", "retrieved"):
            raise ValueError(f"selection must be 'balanced', 'random' or 'retrieved', not {self.selection!r}")
        if self.classifier not in ("prototype", "knn"):
            raise ValueError(f"classifier must be 'prototype' or 'knn', not {self.classifier!r}")


@register
class FewShot(PromptingStrategy):
    """Demonstrations picked from train (seeded): embedded on an encoder, shown in the prompt to an LM."""

    name = "few_shot"
    config_cls = FewShotConfig
    requires = ("embed",)
    predictor_cls = EmbeddingPredictor
    config: FewShotConfig

    def check(self, backend, task_type: str = "classification") -> None:
        super().check(backend, task_type)
        if not backend.lm and self.config.selection == "retrieved":
            raise CapabilityError("few_shot: selection 'retrieved' puts the nearest examples in a causal model's "
                                  "prompt; on the encoder backend use classifier: knn")

    def select(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        return np.sort(select_demonstrations(labels, self.config.shots, self.config.selection, self.seed, True))

    def demonstrations(self, backend, task, train):
        if self.config.selection == "retrieved":
            k = self.config.shots * max(1, len(task.labels))
            return [], Retrieval.build(backend.config.retriever, demo_pool(task, train), k, backend)
        return select_demos(task, train, self.config.shots, self.config.selection, self.seed), None

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        if backend.lm:
            return self.adapt_causal(backend, task, train=train, dev=dev)
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


@dataclass
class ChainOfThoughtConfig(PromptConfig):
    """Chain of thought (causal): the model reasons, then gives a final 'Answer:' line that is parsed."""

    shots: int = doc("Demonstrations per class shown before the input (0: zero-shot reasoning).", default=0)
    selection: str = doc("balanced or random demonstrations (as few_shot).", default="balanced")
    max_new_tokens: int = doc("Most tokens generated for the reasoning and the answer.", default=256)
    stop: list[str] = doc("Generation stops at any of these strings.", default_factory=lambda: ["\n\nText:",
                                                                                                  "\n\nInput:"])
    max_length: int = doc("Tokens kept per prompt.", default=1024)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shots < 0 or self.max_length < 8:
            raise ValueError("need shots >= 0 and max_length >= 8")
        if self.selection not in ("balanced", "random"):
            raise ValueError(f"selection must be 'balanced' or 'random', not {self.selection!r}")


@register
class ChainOfThought(PromptingStrategy):
    """Reason step by step, then answer; the final answer is parsed and the reasoning's tokens are counted."""

    name = "chain_of_thought"
    config_cls = ChainOfThoughtConfig
    requires = ("generate",)
    backends = ("causal", "openai")
    reasoning = True
    predictor_cls = CausalPredictor
    config: ChainOfThoughtConfig

    def demonstrations(self, backend, task, train):
        if not self.config.shots:
            return [], None
        return select_demos(task, train, self.config.shots, self.config.selection, self.seed), None

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        return self.adapt_causal(backend, task, train=train, dev=dev)
