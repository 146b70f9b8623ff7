"""``prompt_search``: optimise the prompt on train and dev, within a budget, and keep every candidate tried.

The search space is built from the user's own prompts, the shipped pattern library (``patterns.yaml``) and,
where the model generates, instructions the model proposes from training examples; demonstration sets are
bootstrapped from train (examples the plain prompt gets right), balanced samples, retrieved neighbours,
or (encoder) the examples most typical of their class. Optuna's TPE sampler proposes (instruction,
template, demonstrations) combinations; each is scored on dev minibatches (a candidate drawn again is
scored on further dev items, its score is the mean over every item seen); the best few are then scored on
the whole dev set and the best of those becomes the trial's prompt. Test data is never seen: ``adapt``
receives only train and dev.

On an encoder the "prompt" is what gets embedded: label prompts (from the pattern library and the user's
``label_templates``), optionally the label descriptions, and a demonstration set used as class prototypes or
as a soft nearest neighbour, mixed with the label prompts by a searched weight, with or without centring every
embedding on the mean of the unlabelled train and dev inputs. Inputs are embedded once, so a candidate costs
only its label prompts and is scored on the whole dev set.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import yaml

from ..errors import ConfigError
from ..evaluation.metrics import token_f1
from ..prompts import PromptTemplate, default_template, select_demonstrations
from .base import Predictor, PromptConfig, doc, register
from .causal import CausalPredictor, Retrieval, answers, demo_pool, make_builder
from .prompting import EmbeddingPredictor, PromptingStrategy, readable

log = logging.getLogger(__name__)

BASE_INSTRUCTION = {"classification": "Classify the text.", "generation": "Complete the task for the input."}


@lru_cache(maxsize=1)
def pattern_library() -> dict[str, Any]:
    """The shipped prompt patterns (instructions, templates per task type, encoder label templates)."""
    text = resources.files("tunebench.strategies").joinpath("patterns.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


@dataclass
class PromptSearchConfig(PromptConfig):
    """Prompt search: instructions, templates and demonstrations optimised on dev within a budget."""

    template: Union[str, list[str], None] = doc(
        "causal: your own Jinja2 template, or a list of them: all are candidates of one search (default: the "
        "built-in template), besides the pattern library's layouts.", default=None)
    instructions: list[str] = doc("Your own candidate instructions (the task's `instruction` is always one).",
                                  default_factory=list)
    label_templates: list[str] = doc("encoder: your own label prompts with {{ label }} (and {{ description }}).",
                                     default_factory=lambda: ["{{ label }}"])
    patterns: bool = doc("Add the shipped pattern library (role, format, step-by-step, label definitions; "
                         "template layouts; encoder label prompts) to the candidates.", default=True)
    propose: int = doc("causal: instructions the model proposes after reading training examples (0: none).",
                       default=3)
    shots: int = doc("Demonstrations per class in a candidate set (generation tasks: in all).", default=4)
    demo_sets: int = doc("Balanced random demonstration sets among the candidates (besides none, bootstrapped, "
                         "retrieved, and on an encoder typical and all of train).", default=3)
    trials: Optional[int] = doc("Most candidates proposed by the optimizer (TPE). Default: 40 on a model that reads "
                                "prompts; 150 on an encoder, where a proposal costs only its label prompts.",
                                default=None)
    budget_calls: int = doc("Most model calls the search may spend (an input scored or generated, a prompt "
                            "embedded); the search stops before exceeding it.", default=4000)
    budget_seconds: Optional[float] = doc("Wall-clock limit of the search in seconds (none: only calls count).",
                                          default=None)
    minibatch: int = doc("causal: dev items scored per proposal (a candidate proposed again sees more).",
                         default=32)
    finalists: int = doc("Best candidates re-scored on the whole dev set before the winner is chosen.",
                         default=3)
    max_length: int = doc("Tokens kept per input (causal: per prompt; a longer prompt keeps its end).",
                          default=1024)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {"shots": self.shots >= 1, "demo_sets": self.demo_sets >= 0,
                  "trials": self.trials is None or self.trials >= 1,
                  "budget_calls": self.budget_calls >= 1, "minibatch": self.minibatch >= 1,
                  "finalists": self.finalists >= 1, "propose": self.propose >= 0, "max_length": self.max_length >= 8,
                  "budget_seconds": self.budget_seconds is None or self.budget_seconds > 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        for t in self.label_templates:
            try:
                tpl = PromptTemplate(t, "label_templates")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            if "label" not in tpl.variables or set(tpl.variables) - {"label", "description"}:
                raise ValueError(f"label template {t!r} must use {{{{ label }}}} (and may use {{{{ description }}}})")


class Budget:
    """Model calls and seconds left to a search."""

    def __init__(self, calls: int, seconds: float | None):
        self.calls, self.seconds, self.used = calls, seconds, 0
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, n: int) -> bool:
        in_time = self.seconds is None or self.elapsed < self.seconds
        return in_time and self.used + n <= self.calls

    def spend(self, n: int) -> None:
        self.used += int(n)


@dataclass
class Candidate:
    """A point of the search space and what has been measured of it on dev."""

    choice: dict[str, Any]
    seen: list[int] = field(default_factory=list)  # dev item indices scored, in order
    hits: list[float] = field(default_factory=list)  # per-item score (accuracy or token F1)

    @property
    def score(self) -> float:
        return float(np.mean(self.hits)) if self.hits else -math.inf


def typical_examples(labels: np.ndarray, emb: torch.Tensor, per: int) -> np.ndarray:
    """The ``per`` examples of each class nearest to their class mean."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        centre = torch.nn.functional.normalize(emb[idx].mean(0), dim=-1)
        sims = emb[idx] @ centre
        out.extend(idx[sims.argsort(descending=True)[:per].numpy()].tolist())
    return np.sort(np.asarray(out, dtype=np.int64))


class EncoderSearch:
    """An encoder prompt search's state and candidates: dev and train inputs embedded once, label prompts embedded
    on demand (cached), the candidate demonstration sets, and how a candidate's choice becomes an
    :class:`EmbeddingPredictor` and is scored (dev as it is, train leave-one-out)."""

    def __init__(self, strategy: PromptSearch, backend, task, train, dev, budget: Budget):
        cfg = strategy.config
        self.name, self.cfg, self.seed = strategy.name, cfg, strategy.seed
        self.backend, self.task, self.train = backend, task, train
        self.n_labels = n_labels = len(task.labels)
        self.max_len = max_len = min(cfg.max_length, 512)
        need = len(dev) + len(train) + n_labels  # inputs once, and the first label prompts (bootstrapping)
        if not budget.allows(need):
            raise ConfigError(f"prompt_search: embedding dev, train and the label prompts takes {need} calls, more "
                              f"than budget_calls={cfg.budget_calls}; raise budget_calls or use a smaller train size")
        self.dev_emb = backend.embed(dev.texts, max_length=max_len)
        self.train_emb = (backend.embed(train.texts, max_length=max_len) if len(train)
                          else torch.zeros(0, self.dev_emb.shape[1]))
        budget.spend(need)
        self.dev_y = torch.as_tensor(dev.labels)
        self.train_y = torch.as_tensor(train.labels)
        self.n_dev = len(dev)
        self.templates = list(dict.fromkeys([*cfg.label_templates,
                                             *(pattern_library()["label_templates"] if cfg.patterns else [])]))
        self.has_desc = any(lab.description for lab in task.labels)
        self.scorers = ["prototype", "kernel"] if len(train) else ["prototype"]
        self._anchors: dict[tuple[int, bool], torch.Tensor] = {}
        self.embedded = 0  # label prompts embedded so far (model calls)
        self.demo_names, self.demo_idx = self._demo_sets()
        budget.spend(self.embedded)
        # calibration: embeddings of one model share a common direction; removing the mean of the (unlabelled)
        # train and dev inputs spreads them out. Anchors and inputs are centred alike (the predictor stores it).
        self.mean = torch.cat([self.train_emb, self.dev_emb]).mean(0)

    def label_anchors(self, t: int, descriptions: bool) -> torch.Tensor:
        """Normalised label prompts of template ``t`` (averaged with the label descriptions when asked)."""
        if (t, descriptions) not in self._anchors:
            labels, n_labels = self.task.labels, self.n_labels
            tpl = PromptTemplate(self.templates[t], "label_templates")
            texts = [tpl.render({"label": readable(lab.name), "description": lab.description or ""})
                     for lab in labels]
            if descriptions:
                texts += [lab.description for lab in labels if lab.description]
            emb = self.backend.embed(texts, max_length=self.max_len)
            self.embedded += len(texts)
            anchors = emb[:n_labels].clone()
            owners = [i for i, lab in enumerate(labels) if descriptions and lab.description]
            for row, i in enumerate(owners):  # a label's prompt and its description, averaged
                anchors[i] = anchors[i] + emb[n_labels + row]
            self._anchors[(t, descriptions)] = torch.nn.functional.normalize(anchors, dim=-1)
        return self._anchors[(t, descriptions)]

    def _demo_sets(self) -> tuple[list[str], list[np.ndarray]]:
        """Candidate demonstration sets (train indices) and their names."""
        cfg, train = self.cfg, self.train
        demo_names, demo_idx = ["none"], [np.zeros(0, dtype=np.int64)]
        if len(train):
            for s in range(cfg.demo_sets):
                demo_names.append(f"balanced#{s}")
                picked = select_demonstrations(train.labels, cfg.shots, "balanced", self.seed + s, True)
                demo_idx.append(np.sort(picked))
            demo_names.append("typical")
            demo_idx.append(typical_examples(train.labels, self.train_emb, cfg.shots))
            plain = (self.train_emb @ self.label_anchors(0, False).T).argmax(1).numpy()  # the user's first prompt
            right = np.flatnonzero(plain == train.labels)
            if len(right):
                picked = select_demonstrations(train.labels[right], cfg.shots, "balanced", self.seed + 1000, True)
                demo_names.append("bootstrapped")
                demo_idx.append(np.sort(right[picked]))
            demo_names.append("all")
            demo_idx.append(np.arange(len(train)))
        return demo_names, demo_idx

    def centred(self, e: torch.Tensor, ch: dict) -> torch.Tensor:
        """Embeddings as a candidate compares them: centred and renormalised when it calibrates."""
        return torch.nn.functional.normalize(e - self.mean, dim=-1) if ch.get("calibrate", 0) else e

    def _labels(self, ch: dict) -> torch.Tensor:
        """The candidate's label anchors, as it compares them."""
        return self.centred(self.label_anchors(ch["label_template"], bool(ch.get("descriptions", 0))), ch)

    def predictor_parts(self, ch: dict) -> dict:
        """The EmbeddingPredictor arguments of a candidate."""
        norm, n_labels = torch.nn.functional.normalize, self.n_labels
        center = self.mean if ch.get("calibrate", 0) else None
        labels = self._labels(ch)
        idx = self.demo_idx[ch["demos"]]
        w = float(ch.get("weight", 1.0))
        if not len(idx):
            return {"anchors": labels, "anchor_labels": torch.arange(n_labels), "center": center}
        ys = torch.as_tensor(self.train.labels[idx])
        demos = self.centred(self.train_emb[torch.as_tensor(idx)], ch)
        if self.scorers[ch.get("scorer", 0)] == "kernel":
            missing = [c for c in range(n_labels) if not bool((ys == c).any())]  # their label prompt stands in
            return {"anchors": torch.cat([demos, labels[missing]]), "mode": "kernel", "tau": ch["tau"],
                    "anchor_labels": torch.cat([ys, torch.as_tensor(missing, dtype=torch.long)]),
                    "center": center, "label_anchors": labels, "label_weight": w}
        protos, present = labels.clone(), torch.zeros(n_labels, dtype=torch.bool)
        for c in torch.unique(ys):
            protos[c] = norm(demos[ys == c].mean(0), dim=-1)
            present[c] = True
        mixed = torch.where(present[:, None], w * labels + (1 - w) * protos, labels)
        return {"anchors": norm(mixed, dim=-1), "anchor_labels": torch.arange(n_labels), "center": center}

    def build(self, ch: dict, prompt: dict | None = None) -> EmbeddingPredictor:
        return EmbeddingPredictor(self.name, self.cfg, self.task.label_names, backend=self.backend,
                                  max_length=self.max_len, prompt=prompt, **self.predictor_parts(ch))

    def train_scores(self, predictor: EmbeddingPredictor, ch: dict, js: torch.Tensor) -> torch.Tensor:
        """Scores of train examples, each left out of the demonstrations it is scored against."""
        norm, train_emb, train_y = torch.nn.functional.normalize, self.train_emb, self.train_y
        idx = self.demo_idx[ch["demos"]]
        row_of = torch.full((len(self.train),), -1, dtype=torch.long)
        row_of[torch.as_tensor(idx, dtype=torch.long)] = torch.arange(len(idx))
        rows = row_of[js]
        if predictor.mode == "kernel":
            return predictor.scores_of(train_emb[js], exclude=rows)
        scores = predictor.scores_of(train_emb[js])
        inside = torch.nonzero(rows >= 0).flatten()
        if not len(inside):
            return scores
        # prototype: the example's own class mean without it (a class it alone represents: its label prompt)
        x = self.centred(train_emb[js[inside]], ch)
        labels = self._labels(ch)
        members = torch.as_tensor(idx, dtype=torch.long)
        demos = self.centred(train_emb[members], ch)
        w = float(ch.get("weight", 1.0))
        for k, (r, i) in enumerate(zip(inside.tolist(), js[inside].tolist())):
            c = int(train_y[i])
            own = demos[(train_y[members] == c) & (members != i)]
            anchor = labels[c] if not len(own) else norm(w * labels[c] + (1 - w) * norm(own.mean(0), dim=-1), dim=-1)
            scores[r, c] = x[k] @ anchor
        return scores

    def evaluate(self, cand: Candidate, items: list[int]) -> int:
        """Dev items (index < len(dev)) as they are; train examples leave-one-out (index len(dev) + j)."""
        n_dev = self.n_dev
        before = self.embedded
        dv = torch.as_tensor([i for i in items if i < n_dev], dtype=torch.long)
        tr = torch.as_tensor([i - n_dev for i in items if i >= n_dev], dtype=torch.long)
        hits = {}
        predictor = self.build(cand.choice)
        if len(dv):
            pred = predictor.scores_of(self.dev_emb[dv]).argmax(1)
            hits.update(zip(dv.tolist(), (pred == self.dev_y[dv]).float().tolist()))
        if len(tr):
            pred = self.train_scores(predictor, cand.choice, tr).argmax(1)
            hits.update(zip((tr + n_dev).tolist(), (pred == self.train_y[tr]).float().tolist()))
        cand.hits.extend(hits[i] for i in items)
        cand.seen.extend(items)
        return self.embedded - before


@register
class PromptSearch(PromptingStrategy):
    """Search instructions, templates and demonstrations on dev (Optuna TPE) within a call or time budget."""

    name = "prompt_search"
    config_cls = PromptSearchConfig
    requires = ("embed",)
    predictor_cls = CausalPredictor
    config: PromptSearchConfig

    @classmethod
    def expand(cls, config: PromptSearchConfig) -> list[PromptSearchConfig]:
        return [config]  # a list of templates is the user's candidate set, not one trial each

    # ---- the search loop, shared by both backends ----------------------------------------------------
    def _optimize(self, space: dict[str, list], evaluate: Callable[[Candidate, list[int]], int], budget: Budget,
                  n_dev: int, step: int, cost: int, trials: int,
                  floats: dict[str, tuple[float, float, bool]] | None = None) -> tuple[Candidate, list]:
        """Propose candidates with TPE, score each on ``step`` more dev items (``evaluate`` returns the model calls
        it made; a proposal costs at most ``cost``), then score the finalists on all of dev, as far as the budget
        allows. Returns the winner and the trace."""
        import optuna  # heavy (about a second to import): only when a search runs

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cands: dict[tuple, Candidate] = {}
        trace: list[dict] = []
        order = np.random.default_rng(self.seed).permutation(n_dev)
        # multivariate TPE models the choices jointly (which weight suits which scorer), not one at a time
        with warnings.catch_warnings():  # multivariate is marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=min(10, max(1, trials // 3)),
                                                 multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        floats = floats or {}
        self.reporter.start("prompt search", trials)

        def objective(trial: optuna.Trial) -> float:
            choice = {k: trial.suggest_categorical(k, list(range(len(v)))) for k, v in space.items() if len(v) > 1}
            choice.update({k: 0 for k, v in space.items() if len(v) == 1})
            for k, (lo, hi, log_scale) in floats.items():  # log scale: continuous; else steps of 0.05
                value = trial.suggest_float(k, lo, hi, log=True) if log_scale else trial.suggest_float(k, lo, hi, step=0.05)
                choice[k] = round(value, 4)
            key = tuple(sorted(choice.items()))
            cand = cands.setdefault(key, Candidate(choice))
            t0, calls = time.perf_counter(), 0
            seen = set(cand.seen)
            todo = [int(i) for i in order if int(i) not in seen][:step]
            if todo:
                calls = evaluate(cand, todo)
                budget.spend(calls)
            trace.append({"trial": trial.number, **choice, "items": len(cand.seen), "score": cand.score,
                          "calls": calls, "seconds": round(time.perf_counter() - t0, 4)})
            self.reporter.advance()
            return cand.score

        def stop_when_spent(study_: optuna.Study, _trial) -> None:
            if not budget.allows(cost):
                log.info("prompt search: budget reached after %d proposals (%d calls, %.1fs)", len(trace),
                         budget.used, budget.elapsed)
                study_.stop()

        try:
            if budget.allows(cost):
                study.optimize(objective, n_trials=trials, timeout=self.config.budget_seconds,
                               callbacks=[stop_when_spent])
        finally:
            self.reporter.stop()
        if not cands:
            if self.config.budget_seconds is not None and budget.elapsed >= self.config.budget_seconds:
                raise ConfigError(f"prompt_search: budget_seconds={self.config.budget_seconds} ran out before the "
                                  f"first candidate could be scored (preparing the candidates took "
                                  f"{budget.elapsed:.0f}s); raise budget_seconds")
            raise ConfigError(f"prompt_search: budget_calls={self.config.budget_calls} is spent before the first "
                              f"candidate could be scored (preparing the candidates took {budget.used} calls, a "
                              f"proposal needs up to {cost}); raise budget_calls")
        ranked = sorted(cands.values(), key=lambda c: (c.score, len(c.seen)), reverse=True)
        finalists = ranked[: self.config.finalists]
        for cand in finalists:  # the rest of dev, as far as the budget goes
            seen = set(cand.seen)
            todo = [int(i) for i in order if int(i) not in seen]
            if todo and budget.allows(len(todo) * cost // max(1, step)):
                budget.spend(evaluate(cand, todo))
                trace.append({"trial": "final", **cand.choice, "items": len(cand.seen), "score": cand.score,
                              "calls": len(todo), "seconds": None})
        full = [c for c in finalists if len(c.seen) == n_dev]
        best = max(full or finalists, key=lambda c: (c.score, len(c.seen)))
        return best, trace

    def _summary(self, best: Candidate, trace: list, candidates: dict, budget: Budget, n_dev: int,
                 **extra) -> dict:
        on_dev = [h for i, h in zip(best.seen, best.hits) if i < n_dev]
        return {"best": best.choice, "best_score": best.score, "best_items": len(best.seen),
                "best_dev_score": float(np.mean(on_dev)) if on_dev else None, "best_dev_items": len(on_dev),
                "candidates": candidates, "trace": trace, "proposals": sum(1 for t in trace if t["trial"] != "final"),
                "calls": budget.used, "budget_calls": self.config.budget_calls,
                "budget_seconds": self.config.budget_seconds, "seconds": round(budget.elapsed, 4), **extra}

    # ---- causal and remote models -------------------------------------------------------------------
    def _instructions(self, backend, task, train, budget: Budget) -> list[str]:
        base = task.config.instruction or ""
        out = [base, *self.config.instructions]
        if self.config.patterns:
            variables = {"base": base or BASE_INSTRUCTION[task.type], "label_names": task.label_names,
                         "task_type": task.type}
            for name, text in pattern_library()["instructions"].items():
                out.append(PromptTemplate(text, f"pattern {name}").render(variables))
        if self.config.propose and "generate" in backend.capabilities and len(train):
            out.extend(self._proposed(backend, task, train, budget))
        seen, unique = set(), []
        for text in out:
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                unique.append(text)
        return unique

    def _proposed(self, backend, task, train, budget: Budget) -> list[str]:
        """Instructions written by the model after reading a few training examples (seeded samples)."""
        rng = np.random.default_rng(self.seed)
        outs = answers(task, train)
        idx = rng.choice(len(train), size=min(len(train), 8), replace=False)
        records = train.records()
        shown = "\n".join(f"Input: {records[int(i)]['input']}\nOutput: {outs[int(i)]}" for i in idx)
        meta = (f"Here are examples of a task.\n\n{shown}\n\nWrite one sentence that instructs an assistant how to "
                "produce the output for an input like these.\nInstruction:")
        n = self.config.propose
        if not budget.allows(n):
            return []
        prompts = [backend.format_prompt(meta)] * n
        proposals = []
        for i, p in enumerate(prompts):  # one seed each, so the n samples differ
            gen = backend.generate([p], max_new_tokens=48, temperature=0.8, top_p=0.95, stop=["\n"],
                                   seed=self.seed + i, max_length=self.config.max_length)[0]
            text = " ".join(gen.text.split()).strip()
            if len(text) >= 8:
                proposals.append(text)
        budget.spend(n)
        log.info("prompt search: the model proposed %d usable instruction(s) of %d", len(proposals), n)
        return proposals

    def _templates(self, task) -> list[str]:
        user = self.config.template
        out = list(user) if isinstance(user, list) else [user] if user else [default_template(task.type)]
        if self.config.patterns:
            out.extend(pattern_library()["templates"].get(task.type, {}).values())
        return out

    def _lm_demo_sets(self, backend, task, train, budget: Budget, score_fn) -> tuple[list, list[str]]:
        """Candidate demonstrations: (kind, fixed demos or a Retrieval) with their names."""
        classification = task.type == "classification"
        pool = demo_pool(task, train)
        sets: list = [("none", [])]
        names = ["none"]
        if not len(train):
            return sets, names
        for s in range(self.config.demo_sets):
            idx = select_demonstrations(train.labels, self.config.shots, "balanced", self.seed + s, classification) \
                if classification else select_demonstrations(np.zeros(len(train)), self.config.shots, "random",
                                                            self.seed + s, False)
            sets.append(("fixed", [pool[int(i)] for i in idx]))
            names.append(f"balanced#{s}")
        boot = self._bootstrapped(task, train, pool, budget, score_fn)
        if boot:
            sets.append(("fixed", boot))
            names.append("bootstrapped")
        retriever = getattr(backend.config, "retriever", None)
        if retriever and budget.allows(len(pool)):  # the retriever embeds the pool once
            k = self.config.shots * (min(len(task.labels), 4) if classification else 1)
            sets.append(("retrieved", Retrieval.build(retriever, pool, min(k, len(pool)), backend)))
            names.append("retrieved")
            budget.spend(len(pool))
        return sets, names

    def _bootstrapped(self, task, train, pool, budget: Budget, score_fn) -> list[dict]:
        """Demonstrations the plain prompt already gets right (balanced over classes where it can be)."""
        classification = task.type == "classification"
        per = self.config.shots
        n_try = min(len(train), 2 * per * (max(1, len(task.labels)) if classification else 1))
        if not budget.allows(n_try):
            return []
        rng = np.random.default_rng(self.seed + 1000)
        tried = (np.sort(select_demonstrations(train.labels, 2 * per, "balanced", self.seed + 1000, True))
                 if classification else rng.choice(len(train), size=n_try, replace=False))
        hits = score_fn([pool[int(i)] for i in tried], [int(i) for i in tried])
        budget.spend(len(tried))
        right = [int(i) for i, h in zip(tried, hits) if h >= 0.999]
        if not right:
            return []
        chosen: list[int] = []
        if classification:
            for c in np.unique(train.labels[right]):
                chosen.extend([i for i in right if train.labels[i] == c][:per])
        else:
            chosen = right[:per]
        rng.shuffle(chosen)
        return [pool[i] for i in chosen]

    def _adapt_lm(self, backend, task, *, train, dev) -> Predictor:
        cfg = self.config
        budget = Budget(cfg.budget_calls, cfg.budget_seconds)
        classification = task.type == "classification"
        dev_records = dev.records()
        dev_answers = answers(task, dev)
        train_answers = answers(task, train)
        mode = cfg.predict

        def predictor(instruction: str, template: str, demos) -> CausalPredictor:
            builder = make_builder(replace(cfg, template=template), task)
            builder.instruction = instruction or None
            retrieval = None
            if isinstance(demos, Retrieval):
                retrieval = demos
            else:
                builder.demos = list(demos)
            return CausalPredictor(self.name, cfg, task.label_names, backend=backend, builder=builder, mode=mode,
                                   retrieval=retrieval, seed=self.seed)

        def item_scores(pred: CausalPredictor, records: list[dict], truth: list[str]) -> list[float]:
            """Per item: 1/0 for the right label (classification) or the answer's token F1 (generation)."""
            out = pred.run(records)
            if classification:
                names = task.label_names
                return [float(int(p) >= 0 and names[int(p)] == t) for p, t in zip(out.predictions, truth)]
            return [token_f1(p, t) for p, t in zip(out.predictions, truth)]

        instructions = self._instructions(backend, task, train, budget)
        templates = self._templates(task)
        plain = predictor(task.config.instruction or "", templates[0], [])

        def boot_score(records, idx):
            return item_scores(plain, records, [train_answers[i] for i in idx])

        demo_sets, demo_names = self._lm_demo_sets(backend, task, train, budget, boot_score)
        space = {"instruction": instructions, "template": templates, "demos": demo_sets}

        def evaluate(cand: Candidate, items: list[int]) -> int:
            ch = cand.choice
            pred = predictor(instructions[ch["instruction"]], templates[ch["template"]], demo_sets[ch["demos"]][1])
            cand.hits.extend(item_scores(pred, [dev_records[i] for i in items], [dev_answers[i] for i in items]))
            cand.seen.extend(items)
            return len(items) * (2 if pred.retrieval is not None else 1)  # retrieval embeds each input too

        retrieving = any(kind == "retrieved" for kind, _ in demo_sets)
        best, trace = self._optimize(space, evaluate, budget, len(dev), cfg.minibatch,
                                     cfg.minibatch * (2 if retrieving else 1), cfg.trials or 40)
        ch = best.choice
        result = predictor(instructions[ch["instruction"]], templates[ch["template"]], demo_sets[ch["demos"]][1])
        candidates = {"instruction": instructions, "template": templates, "demos": demo_names}
        result.search_trace = self._summary(best, trace, candidates, budget, len(dev),
                                            chosen={"instruction": instructions[ch["instruction"]],
                                                    "template": templates[ch["template"]],
                                                    "demos": demo_names[ch["demos"]]})
        return result

    # ---- encoders -----------------------------------------------------------------------------------
    def _adapt_encoder(self, backend, task, *, train, dev) -> Predictor:
        cfg = self.config
        budget = Budget(cfg.budget_calls, cfg.budget_seconds)
        search = EncoderSearch(self, backend, task, train, dev, budget)
        templates, demo_names, scorers = search.templates, search.demo_names, search.scorers
        space = {"label_template": templates, "descriptions": [0, 1] if search.has_desc else [0],
                 "demos": demo_names, "calibrate": [0, 1], "scorer": scorers}
        floats = {"weight": (0.0, 1.0, False), "tau": (0.01, 0.2, True)} if len(train) else None
        # inputs are embedded once, so a proposal is scored on all of dev, and on every train example left out of
        # its own demonstrations (more selection data: less overfitting to a small dev set); it costs only its
        # label prompts
        cost = search.n_labels + (sum(1 for lab in task.labels if lab.description) if search.has_desc else 0)
        n_sel = len(dev) + len(train)
        best, trace = self._optimize(space, search.evaluate, budget, n_sel, n_sel, cost, cfg.trials or 150,
                                     floats=floats)
        ch = best.choice
        chosen = {"label_template": templates[ch["label_template"]], "descriptions": bool(ch.get("descriptions", 0)),
                  "demos": demo_names[ch["demos"]], "demonstrations": int(len(search.demo_idx[ch["demos"]])),
                  "scorer": scorers[ch.get("scorer", 0)], "calibrate": bool(ch.get("calibrate", 0)),
                  "weight": ch.get("weight", 1.0), "tau": ch.get("tau")}
        result = search.build(ch, prompt=chosen)
        result.search_trace = self._summary(best, trace, {"label_template": templates, "demos": demo_names,
                                                          "scorer": scorers}, budget, len(dev), chosen=chosen,
                                            selection="dev and train (each example left out of its own "
                                                      "demonstrations)")
        return result

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        if not len(dev):
            raise ConfigError("prompt_search needs a dev split to score candidates on; give task.data.dev or "
                              "task.split.dev")
        if backend.lm:
            return self._adapt_lm(backend, task, train=train, dev=dev)
        if task.type != "classification":
            raise ConfigError("prompt_search on an encoder searches label prompts: it needs a classification task")
        return self._adapt_encoder(backend, task, train=train, dev=dev)
