"""``distill``: a prompted teacher labels a pool of inputs, a tuned student learns from its labels.

The teacher is any prompting strategy on any model of the study, adapted on train and dev as its own trial would
be; it then labels the pool (``task.data.unlabelled``, or the train inputs outside the trial's labelled subset with
``pool: train``) within a budget of calls and dollars. It sees the pool's inputs only, never a gold label. The
student is any tuning strategy, trained on the teacher's labels (hard, or the teacher's label distribution) and
selecting its epochs on the gold dev split; the trial's predictor is the student's, so the artifact serves without
the teacher. Where pool items have gold labels, the teacher's labels are audited against them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import numpy as np

from ..config.costs import CostConfig
from ..data import Split
from ..errors import CapabilityError, ConfigError
from ..evaluation.cost import HOURS
from ..evaluation.metrics import label_audit
from .base import Predictor, Strategy, StrategyConfig, doc, register, registry
from .defaults import scaled_defaults
from .training import ClassifierPredictor, TuningStrategy

log = logging.getLogger(__name__)

POOLS = ("unlabelled", "train")
PART_KEYS = ("strategy", "model", "params")
CHUNK = 16  # pool inputs labelled per call of the teacher's predictor (each input is one counted call)


def _teachers() -> list[str]:
    return [n for n, c in registry.all().items() if c.family == "prompting"]


def _students() -> list[str]:
    return [n for n, c in registry.all().items() if issubclass(c, TuningStrategy)]


def _part(where: str, value: Any, default: str, allowed: list[str]) -> dict[str, Any]:
    """A ``teacher`` / ``student`` block checked: known keys, a strategy of the right kind, valid params."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: give {{strategy: NAME, model: MODEL, params: {{...}}}}, not {value!r}")
    unknown = sorted(set(value) - set(PART_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (valid: {', '.join(PART_KEYS)})")
    part = {"strategy": value.get("strategy", default), "model": value.get("model"),
            "params": value.get("params") or {}}
    if part["strategy"] not in allowed:
        raise ValueError(f"{where}.strategy must be one of {allowed}, not {part['strategy']!r}")
    if part["model"] is not None and not isinstance(part["model"], str):
        raise ValueError(f"{where}.model: give the name of one of the study's models, not {part['model']!r}")
    if not isinstance(part["params"], dict):
        raise ValueError(f"{where}.params: give a mapping of the strategy's parameters, not {part['params']!r}")
    try:
        registry.get(part["strategy"]).config_from_dict(part["params"])
    except ConfigError as exc:
        raise ValueError(f"{where}.params: {exc}") from None
    return part


@dataclass
class DistillConfig(StrategyConfig):
    """Distill: a prompting teacher labels a pool of inputs; a tuning student trains on its labels."""

    teacher: dict[str, Any] = doc(
        "The teacher: {strategy: a prompting strategy, model: a study model (default: the trial's), params: {...}}.",
        default_factory=lambda: {"strategy": "zero_shot", "model": None, "params": {}})
    student: dict[str, Any] = doc(
        "The student: {strategy: a tuning strategy, model: a study model (default: every model it runs on), "
        "params: {...}}; it trains on the teacher's labels and selects epochs on the gold dev split.",
        default_factory=lambda: {"strategy": "full", "model": None, "params": {}})
    pool: str = doc("What the teacher labels: unlabelled (task.data.unlabelled) or train (the train inputs outside "
                    "the trial's train size, their labels hidden from teacher and student).", default="unlabelled")
    pool_size: Optional[int] = doc("Inputs drawn from the pool (seeded by the trial seed; default: all of it).",
                                   default=None)
    pool_sizes: Optional[list[int]] = doc(
        "Several pool sizes, one trial each (instead of pool_size): the distillation learning curve, student quality "
        "against teacher labels bought. The pools are nested: each is the first N of one seeded order of the pool. Each "
        "trial labels its own pool within `budget` (the dry run lists every one).",
        default=None)
    labels: str = doc("hard: the teacher's label; soft: its label distribution (softmax of its class scores) where "
                      "it has scores (a generating teacher gives hard labels).", default="hard")
    temperature: float = doc("Teacher scores are divided by this before the softmax (soft labels, confidence); an "
                             "encoder's cosine similarities span about [-1, 1], so it wants a small value (0.05).",
                             default=1.0)
    min_confidence: float = doc("Teacher labels whose probability is below this are not trained on.", default=0.0)
    budget: dict[str, Union[int, float]] = doc(
        "Most teacher calls and dollars spent labelling: {calls: N, dollars: D} (either; default: no limit). A call "
        "is one pool input; dollars are priced from `costs`: API tokens for a teacher in costs.api, else its seconds "
        "at train_per_hour.",
        default_factory=dict)

    def __post_init__(self) -> None:
        self.teacher = _part("teacher", self.teacher, "zero_shot", _teachers())
        self.student = _part("student", self.student, "full", _students())
        if self.teacher["params"].get("prompt") is not None:
            raise ValueError("teacher.params.prompt: a registered prompt is not resolved inside distill; give the "
                             "template itself (template: or template_file:)")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, not {self.pool!r}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1 (or left out for the whole pool), not {self.pool_size}")
        if self.pool_sizes is not None:
            sizes = self.pool_sizes
            if self.pool_size is not None:
                raise ValueError("pool_sizes: give either pool_size (one trial) or pool_sizes (one trial per size), "
                                 "not both")
            if not isinstance(sizes, list) or not sizes:
                raise ValueError(f"pool_sizes: give a list of pool sizes such as [250, 1000, 4000], not {sizes!r}")
            bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n < 1]
            if bad:
                raise ValueError(f"pool_sizes: every size must be a whole number >= 1, not {bad[0]!r}")
            if len(set(sizes)) != len(sizes):
                raise ValueError(f"pool_sizes: {sorted(n for n in set(sizes) if sizes.count(n) > 1)} given twice")
        if self.labels not in ("hard", "soft"):
            raise ValueError(f"labels must be 'hard' or 'soft', not {self.labels!r}")
        if not 0 < self.temperature <= 100:
            raise ValueError(f"temperature must be in (0, 100], not {self.temperature}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], not {self.min_confidence}")
        if not isinstance(self.budget, dict):
            raise ValueError(f"budget: give {{calls: N, dollars: D}}, not {self.budget!r}")
        unknown = sorted(set(self.budget) - {"calls", "dollars"})
        if unknown:
            raise ValueError(f"budget: unknown key(s) {unknown} (valid: calls, dollars)")
        calls, dollars = self.budget.get("calls"), self.budget.get("dollars")
        if calls is not None and (isinstance(calls, bool) or not isinstance(calls, int) or calls < 0):
            raise ValueError(f"budget.calls must be a whole number >= 0, not {calls!r}")
        if dollars is not None and (isinstance(dollars, bool) or not isinstance(dollars, (int, float))
                                    or not 0 <= dollars <= 1e9):
            raise ValueError(f"budget.dollars must be an amount >= 0, not {dollars!r}")

    def parts(self) -> tuple[StrategyConfig, StrategyConfig]:
        """The validated configs of the teacher and the student."""
        return (registry.get(self.teacher["strategy"]).config_from_dict(self.teacher["params"]),
                registry.get(self.student["strategy"]).config_from_dict(self.student["params"]))


@dataclass
class Labelling:
    """What the teacher did on the pool: a label (and distribution) per input it labelled, and what it cost."""

    predictions: np.ndarray  # label ids, -1 where a generated answer named no label
    scores: Optional[np.ndarray]  # (n, labels) the teacher's class scores, where it has them
    calls: int
    prompt_tokens: int
    completion_tokens: int
    dollars: float
    seconds: float
    stopped: Optional[str]  # why labelling stopped before the planned calls (the dollar budget), else None
    reused: int = 0  # of ``calls``, the labels an earlier trial with this teacher bought (counted at their cost)
    reused_dollars: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "dollars": round(self.dollars, 6), "seconds": round(self.seconds, 4), "stopped": self.stopped,
                "reused": self.reused, "reused_dollars": round(self.reused_dollars, 6)}


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def labelling_pool(config: DistillConfig, task, train: Split, seed: int) -> Split:
    """The inputs the teacher labels: the pool (the unlabelled file, or the train rows outside ``train``) with
    ``pool_size`` of them drawn by ``seed``. ``labels`` hold gold ids where known (-1 elsewhere): only the audit
    reads them."""
    if config.pool == "unlabelled":
        if task.unlabelled is None:
            raise ConfigError("distill.pool: 'unlabelled' needs task.data.unlabelled: FILE (inputs without labels); "
                              "or set pool: train to label the train inputs outside the trial's train size")
        pool = task.unlabelled
    else:
        used = set(train.texts)
        rest = [i for i, t in enumerate(task.train.texts) if t not in used]
        if not rest:
            raise ConfigError("distill.pool: 'train' labels the train inputs outside the trial's train size, and this "
                              f"trial uses all {len(task.train)} of them; set train_sizes below that (e.g. "
                              f"[{max(1, len(task.train) // 4)}]) or give task.data.unlabelled")
        pool = task.train.subset(rest)
    if config.pool_size is not None:  # the first N of one seeded order: the pools of pool_sizes are prefixes
        pool = pool.subset(np.random.default_rng(seed).permutation(len(pool))[:config.pool_size])
    pool.name = "pool"
    return pool


def planned_calls(config: DistillConfig, pool: Split) -> int:
    """The calls labelling makes unless the dollar budget stops it first: one per pool input, at most budget.calls."""
    cap = config.budget.get("calls")
    return len(pool) if cap is None else min(len(pool), int(cap))


def estimate(config: DistillConfig, pool: Split, teacher_model: str, costs: CostConfig | None,
             bought=None) -> dict[str, Any]:
    """What labelling will spend, before anything runs (``tunebench run --dry-run``): the calls exactly (the
    dollar budget may stop it earlier; ``reused``: how many of them, from the first, replay labels earlier trials
    with this teacher bought, as ``bought`` counts them), and for the new calls the input tokens at about 4
    characters a token (the template and any demonstrations come on top) and their dollars where the teacher has
    API prices."""
    calls = planned_calls(config, pool)
    reused = bought(list(pool.texts[:calls])) if bought is not None else 0
    tokens = int(sum(math.ceil(len(t) / 4) for t in pool.texts[reused:calls]))
    api = (costs or CostConfig()).api.get(teacher_model)
    dollars = None if api is None else (tokens * api.input_per_1m + (calls - reused) * api.output_per_1m) / 1e6
    return {"pool": len(pool), "calls": calls, "reused": reused, "input_tokens": tokens, "dollars": dollars,
            "budget": dict(config.budget), "priced_by": "api tokens" if api is not None else "training time (known after)"}


class CallPrice:
    """How a teacher call is priced, as the cost model prices a trial's upfront work: API tokens for a model in
    ``costs.api``, else its share of the batch's seconds at the training hardware's rate (labelling is part of
    producing the student). ``bound`` prices calls before they are made, where that is possible."""

    def __init__(self, teacher_model: str, costs: CostConfig | None):
        self.costs = costs or CostConfig()
        self.api = self.costs.api.get(teacher_model)

    def stored(self, answer: dict[str, Any]) -> float:
        """What one answered call cost: its tokens at the API's prices, else its seconds at the hardware's rate."""
        if self.api is not None:
            return (answer["prompt_tokens"] * self.api.input_per_1m
                    + answer["completion_tokens"] * self.api.output_per_1m) / 1e6
        return float(answer["seconds"]) / HOURS * self.costs.train_per_hour

    def bound(self, predictor: Predictor, records: list[dict]) -> list[float] | None:
        """The most each call can cost, known before it is made: API tokens counted on this side (the prompt
        exactly, the answer at its longest) or bounded from the bytes a remote endpoint is sent; None for time,
        which is known only after the call."""
        counted = predictor.request_tokens(records) if self.api is not None else None
        if counted is None:
            return None
        prompt, answer = counted
        return [(p * self.api.input_per_1m + answer * self.api.output_per_1m) / 1e6 for p in prompt]


def label(predictor: Predictor, pool: Split, calls: int, dollars: float | None, price: CallPrice,
          chunk: int = CHUNK, reporter=None, cache=None) -> Labelling:
    """The teacher's labels for the first ``calls`` pool inputs. With a ``dollars`` budget, labelling stops
    before the first call that could take the spend over it: a call priced before it is made (API tokens counted
    or bounded here) never exceeds it; otherwise (hardware time) a call is priced as the dearest call so far, the
    first one made alone to learn it. The teacher is given the inputs only, never a label.

    ``cache`` (optional; :class:`tunebench.store.labels.LabelCache`): the answers earlier trials with the same
    teacher bought. An input it holds is replayed instead of asked again, under the same budget rule and priced
    the same way (its tokens at today's prices, or its seconds), so the labels and the trial's cost are those of a
    fresh run whichever trial paid; the new answers are added to it, also when labelling fails part-way."""
    records, texts = pool.records(), list(pool.texts)  # fields and the joined input: no label
    known = cache.lookup(texts[:calls]) if cache is not None and calls else [None] * calls
    tally, done, stopped = _Tally(), 0, None
    if reporter is not None:
        reporter.start("teacher labelling the pool", calls)
    try:
        while done < calls:
            batch = records[done:done + min(chunk, calls - done)]
            k, nxt = _fits(predictor, batch, dollars, price, tally, first=done == 0)
            if k <= 0:
                stopped = (f"dollar budget: {tally.spent:.6f} of {dollars:g} spent after {done} call(s); the next "
                           f"call (up to {nxt:.6f}) could exceed it")
                log.warning("distill: labelling stopped by the %s", stopped)
                break
            stored = known[done:done + k]
            ask = [j for j, e in enumerate(stored) if e is None]
            rows = list(stored)
            if ask:
                t0 = time.perf_counter()
                out = predictor.run([batch[j] for j in ask])
                for j, row in zip(ask, _entries(out, time.perf_counter() - t0, len(ask))):
                    rows[j] = row
                tally.fresh.extend((texts[done + j], rows[j]) for j in ask)
            tally.add(rows, [e is not None for e in stored], price)
            done += k
            if reporter is not None:
                reporter.advance(k)
    finally:
        if reporter is not None:
            reporter.stop()
        if cache is not None and tally.fresh:  # what was paid for is kept, also when a call failed part-way
            cache.add([t for t, _ in tally.fresh], [e for _, e in tally.fresh])
    if tally.reused:
        log.info("distill: %d of %d teacher labels reused from earlier trials with this teacher", tally.reused, done)
    stacked = np.concatenate(tally.scores) if tally.scores_seen and tally.scores else None
    return Labelling(np.asarray(tally.preds, dtype=np.int64), stacked, done, tally.p_tok, tally.c_tok, tally.spent,
                     tally.seconds, stopped, tally.reused, tally.reused_dollars)


def _fits(predictor: Predictor, batch: list[dict], dollars: float | None, price: CallPrice, tally: "_Tally",
          first: bool) -> tuple[int, float]:
    """How many of ``batch`` the dollar budget lets through, and the price bound of the next one: the longest
    prefix whose dearest case still fits where calls are priced before they are made, else at the dearest call
    so far (the very first call alone)."""
    if dollars is None:
        return len(batch), 0.0
    bounds = price.bound(predictor, batch)
    if bounds is not None:
        room, k = dollars - tally.spent, 0
        for b in bounds:
            if b > room:
                break
            room -= b
            k += 1
        return k, (bounds[k] if k < len(bounds) else 0.0)
    if first:
        return (1 if dollars > 0 else 0), 0.0
    dearest = tally.dearest
    return (len(batch) if dearest <= 0 else min(len(batch), int((dollars - tally.spent) // dearest))), dearest


class _Tally:
    """Labelling so far: labels, score rows, tokens, dollars, seconds, the dearest call, what was replayed."""

    def __init__(self) -> None:
        self.preds: list[int] = []
        self.scores: list[np.ndarray] = []
        self.scores_seen = True
        self.p_tok = self.c_tok = self.reused = 0
        self.spent = self.seconds = self.dearest = self.reused_dollars = 0.0
        self.fresh: list[tuple[str, dict[str, Any]]] = []  # (input text, answer) the teacher was asked now

    def add(self, rows: list[dict[str, Any]], replayed: list[bool], price: CallPrice) -> None:
        for row, again in zip(rows, replayed):
            cost = price.stored(row)
            self.preds.append(int(row["label"]))
            if row.get("scores") is None:
                self.scores_seen = False
            elif self.scores_seen:
                self.scores.append(np.asarray([row["scores"]], dtype=np.float64))
            self.p_tok += int(row["prompt_tokens"])
            self.c_tok += int(row["completion_tokens"])
            self.spent += cost
            self.seconds += float(row["seconds"])
            self.dearest = max(self.dearest, cost)
            if again:
                self.reused += 1
                self.reused_dollars += cost


def _entries(out, took: float, k: int) -> list[dict[str, Any]]:
    """A batch's answers as the label cache keeps them, one per input (its share of the batch's seconds)."""
    return [{"label": int(out.predictions[j]),
             "scores": None if out.scores is None else [float(v) for v in out.scores[j]],
             "prompt_tokens": int(out.prompt_tokens[j]) if j < len(out.prompt_tokens) else 0,
             "completion_tokens": int(out.completion_tokens[j]) if j < len(out.completion_tokens) else 0,
             "seconds": took / k}
            for j in range(k)]


@register
class Distill(Strategy):
    """Label a pool with a prompted teacher, train a tuned student on those labels, serve the student."""

    name = "distill"
    config_cls = DistillConfig
    family = "weight_tuning"
    requires = ("train",)
    backends = ("encoder", "causal")
    predictor_cls: ClassVar[type[Predictor]] = ClassifierPredictor
    nested_runs = False  # a search or a cross-validation would relabel the pool per configuration or fold
    config: DistillConfig

    @classmethod
    def merge_shared(cls, shared, params):
        """The study-wide ``training`` keys go under the student's params (and the teacher's, where it takes
        them), as they would under each strategy's own entry."""
        params = dict(params or {})
        for part, default in (("teacher", "zero_shot"), ("student", "full")):
            block = params.get(part)
            block = dict(block) if isinstance(block, dict) else ({} if block is None else block)
            if not isinstance(block, dict):
                continue
            name = block.get("strategy", default)
            if name in registry.all() and isinstance(block.get("params") or {}, dict):
                block["params"] = registry.get(name).merge_shared(shared, block.get("params") or {})
            if block or part in params:
                params[part] = block
        return params

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        """What the student changed."""
        student = (params or {}).get("student") or {}
        try:
            return registry.get(student.get("strategy", "full")).weights_kind(student.get("params") or {})
        except KeyError:
            return "full"

    @classmethod
    def peer_models(cls, config: DistillConfig) -> dict[str, str]:
        return {"teacher.model": config.teacher["model"]} if config.teacher["model"] else {}

    @classmethod
    def pinned_model(cls, config: DistillConfig) -> tuple[str, str] | None:
        return ("student.model", config.student["model"]) if config.student["model"] else None

    @classmethod
    def for_model(cls, config: DistillConfig, model: str) -> DistillConfig:
        """Both models named: the teacher's defaults to the trial's own model, the student's is the trial's."""
        return dataclasses.replace(config, teacher={**config.teacher, "model": config.teacher["model"] or model},
                                   student={**config.student, "model": model})

    @classmethod
    def ident_extra(cls, config: DistillConfig, data) -> dict[str, Any]:
        unl = getattr(data, "unlabelled", None)
        return {"pool": unl.fingerprint()} if config.pool == "unlabelled" and unl is not None else {}

    @classmethod
    def spend_estimate(cls, config: DistillConfig, data, train, seed: int, costs: CostConfig | None,
                       bought=None) -> dict:
        """The teacher's labelling of this trial's pool (the same pool and call count the trial will use)."""
        pool = labelling_pool(config, data, train, seed)
        return {"teacher": f"{config.teacher['strategy']} @{config.teacher['model']}",
                **estimate(config, pool, config.teacher["model"] or "", costs, bought)}

    @classmethod
    def expand(cls, config: DistillConfig) -> list[DistillConfig]:
        """One trial per size of ``pool_sizes`` (smallest first), each a plain ``pool_size`` trial: its key and label
        are those the same entry written with that ``pool_size`` has."""
        if config.pool_sizes is None:
            return [config]
        return [dataclasses.replace(config, pool_size=n, pool_sizes=None) for n in sorted(config.pool_sizes)]

    @classmethod
    def key_params(cls, params: dict, backend: str) -> dict:
        """``pool_sizes`` is always expanded away before a trial is keyed: left out, so keys stay as they were."""
        return {k: v for k, v in params.items() if not (k == "pool_sizes" and v is None)}

    @classmethod
    def reusable_trial(cls, config: DistillConfig) -> tuple[str, Any, Optional[str]]:
        return config.teacher["strategy"], config.parts()[0], config.teacher["model"]

    def adopt(self, predictor: Predictor, seconds: float, key: str) -> None:
        """The teacher the study's own trial of it (key ``key``) adapted: labelling starts from it, and its
        adaptation seconds are still what the student's labels cost."""
        self.adopted = (predictor, seconds, key)

    def share_labels(self, cache) -> None:
        """The labels earlier trials with this teacher bought (:class:`tunebench.store.labels.LabelCache`)."""
        self.label_cache = cache

    def _teacher(self, backend):
        cfg, _ = self.config.parts()
        name = self.config.teacher["model"]
        teacher_backend = self.peers.get(name, backend) if name else backend
        return registry.get(self.config.teacher["strategy"])(cfg, seed=self.seed, reporter=self.reporter), \
            teacher_backend

    def _student(self, backend, n_train: int, n_classes: int) -> TuningStrategy:
        """The student, with the size-scaled tuning defaults of the labels it trains on where its params set none."""
        name = self.config.student["strategy"]
        params = dict(self.config.student["params"])
        scaled = scaled_defaults(name, n_train, n_classes, backend.name)
        params.update({k: v for k, v in scaled.items() if k not in params})
        cls = registry.get(name)
        return cls(cls.config_from_dict(params), seed=self.seed, reporter=self.reporter)

    def check(self, backend, task_type: str = "classification") -> None:
        super().check(backend, task_type)
        if task_type != "classification":
            raise CapabilityError("strategy 'distill': a teacher labels a classification task; a generation task "
                                  "is not distilled yet")
        teacher, teacher_backend = self._teacher(backend)
        teacher.check(teacher_backend, task_type)
        student_cls = registry.get(self.config.student["strategy"])
        student = student_cls(self.config.parts()[1], seed=self.seed)
        student.check(backend, task_type)
        if self.config.labels == "soft" and student.uses_lm(backend):
            raise CapabilityError(f"distill: labels 'soft' trains a classification head on the teacher's label "
                                  f"distribution; the student '{student.name}' on a causal model trains the LM on "
                                  "answers (use labels: hard, or linear_probe as the student)")

    def preflight(self, backend, task_type: str = "classification") -> None:
        self.check(backend, task_type)
        student_cls = registry.get(self.config.student["strategy"])
        student_cls(self.config.parts()[1], seed=self.seed).preflight(backend, task_type)

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        cfg = self.config
        pool = labelling_pool(cfg, task, train, self.seed)
        teacher, teacher_backend = self._teacher(backend)
        adopted = getattr(self, "adopted", None)
        if adopted is not None:  # the study's own trial of the teacher (same key) already adapted it
            taught, teacher_s, reused = adopted
            log.info("distill: the teacher is trial %s's stored predictor (adapted in %.1fs), not adapted again",
                     reused[:8], teacher_s)
        else:
            t0 = time.perf_counter()
            # neither model is handed a task holding the pool's gold labels (train's other rows, the unlabelled file)
            taught = teacher.adapt(teacher_backend, dataclasses.replace(task, train=train, unlabelled=None),
                                   train=train, dev=dev)
            teacher_s, reused = time.perf_counter() - t0, None
        self.taught = taught  # the adapted teacher, for a subclass that keeps it beside the student (cascade)
        teacher_model = cfg.teacher["model"] or ""
        calls = planned_calls(cfg, pool)
        run = label(taught, pool, calls, cfg.budget.get("dollars"), CallPrice(teacher_model, self.costs),
                    reporter=self.reporter, cache=getattr(self, "label_cache", None))
        if run.stopped is None and calls < len(pool):
            log.info("distill: labelling stopped at the call budget (%d of %d pool inputs)", calls, len(pool))
        probs = None if run.scores is None else softmax(run.scores, cfg.temperature)
        confidence = probs.max(axis=1) if probs is not None else np.ones(run.calls)
        if probs is None and cfg.min_confidence > 0:
            log.warning("distill: the teacher gives no class scores; min_confidence %.2f is not applied",
                        cfg.min_confidence)
        if probs is None and cfg.labels == "soft":
            log.warning("distill: the teacher gives no class scores; the student trains on its hard labels")
        kept = (run.predictions >= 0) & (confidence >= cfg.min_confidence)
        audit = label_audit(pool.labels[:run.calls], run.predictions, task.label_names, kept=kept)
        if not kept.any():
            raise ConfigError(f"distill: none of the teacher's {run.calls} label(s) is usable (parsed, with "
                              f"confidence >= min_confidence {cfg.min_confidence}); lower min_confidence or raise "
                              "the budget")
        idx = np.flatnonzero(kept)
        taught_split = pool.subset(idx)
        taught_split.name = "distilled"
        taught_split.labels = run.predictions[idx]
        if cfg.labels == "soft" and probs is not None:
            taught_split.soft = probs[idx].astype(np.float32)
        student = self._student(backend, len(taught_split), len(task.labels))
        predictor = student.adapt(backend, dataclasses.replace(task, train=taught_split, unlabelled=None),
                                  train=taught_split, dev=dev)
        predictor.distill = {
            "teacher": {"strategy": cfg.teacher["strategy"], "model": cfg.teacher["model"],
                        "params": teacher.config.to_dict(), "prompt": taught.prompt_info()},
            "student": {"strategy": student.name, "params": student.config.to_dict()},
            "teacher_seconds": round(teacher_s, 4), "teacher_reused": reused is not None, "labelling": run.to_dict(),
            "pool": {"source": cfg.pool, "size": len(pool), "labelled": run.calls, "kept": int(kept.sum()),
                     "soft": taught_split.soft is not None},
            "audit": audit}
        return predictor
