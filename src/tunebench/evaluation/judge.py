"""An LLM judge of generated answers, and the figures that say whether to trust it.

The judge is a model of the study, reached through the backend interface (anything with ``format_prompt`` and
``generate``), asked at temperature 0. Each answer is scored on every criterion in one call: the rubric (a
sandboxed Jinja2 template) followed by the format tunebench asks for, one JSON object with an integer per criterion.
The answer is validated against a pydantic schema built from the criteria and the scale; an invalid answer is asked
once more with the reason, and a call that still fails (invalid again, or the endpoint failed) is **missing**: it
never counts as a score, and the missing rate is stored.

Trust figures, stored with every judged trial:

- **self-agreement**: each answer is judged ``repeats`` times; the share of items, among those with at least two
  valid repeats, whose repeats gave the same score on every criterion (exact agreement; at temperature 0 it tests
  the endpoint's nondeterminism), and the same share per criterion;
- **agreement with people** (``task.human_score``): the judge scores the texts people rated; Kendall's tau-b
  (``scipy.stats.kendalltau``) between the human rating and the judge's mean score (over criteria and repeats), and
  Cohen's kappa with quadratic weights (``sklearn.metrics.cohen_kappa_score``) between the human rating and the
  judge's mean, both rounded half up to the scale's whole numbers; 95% percentile intervals from resampling the rated
  items (1,000 resamples, seed 0; resamples where a statistic is undefined are left out).

Pairwise (``PairwiseJudge``, ``compare_answers``): two answers to the same item, asked which is better with each
answer shown first in turn, through the same calls (a ``Verdict`` schema instead of the scores). The verdicts,
mapped to A, B or tie, either agree or make the item a tie; an item with a failed call in either order is missing,
never a loss. A's win rate counts ties half, with a 95% interval over resampled items.

Example:
    >>> j = Judge(backend, DEFAULT_RUBRIC, ["correct"], 1, 5, repeats=2)  # doctest: +SKIP
    >>> run = j.run([{"input": "hi"}], ["hello"], ["hello!"])  # doctest: +SKIP
    >>> run.summary()["scores"]["correct"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..config.judge import JudgeConfig
from ..data import TaskData
from ..errors import DataError, TunebenchError
from ..prompts import PromptTemplate

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = """\
You are grading an answer written for the task below.
{% if instruction %}Task: {{ instruction }}
{% endif %}
Input:
{{ input }}
{% if reference %}
Reference answer:
{{ reference }}
{% endif %}
Answer to grade:
{{ output }}

Score the answer from {{ low }} (worst) to {{ high }} (best) on each criterion: {{ criteria | join(", ") }}."""

PAIRWISE_RUBRIC = """\
You are comparing two answers written for the task below.
{% if instruction %}Task: {{ instruction }}
{% endif %}
Input:
{{ input }}
{% if reference %}
Reference answer:
{{ reference }}
{% endif %}
Answer 1:
{{ first }}

Answer 2:
{{ second }}

Which answer is better, judged on {{ criteria | join(", ") }} taken together?"""

PAIRWISE_FORMAT = ('Reply with one JSON object and nothing else: {"better": "first"} when Answer 1 is better, '
                   '{"better": "second"} when Answer 2 is better, {"better": "tie"} when neither is.')

WEAK_TAU = 0.3  # agreement with people below this is weak (recommend warns)
LOW_SELF_AGREEMENT = 0.8  # repeats of the same call agreeing on fewer items than this: the judge is unstable
RESAMPLES = 1000


class Generator(Protocol):
    """What the judge needs of a backend."""

    def format_prompt(self, text: str) -> str: ...

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 **kw: Any) -> list: ...


def score_schema(criteria: Sequence[str], low: int, high: int) -> type[BaseModel]:
    """The pydantic model of one judge answer: a JSON integer in [low, high] per criterion (other keys ignored)."""
    fields: dict[str, Any] = {f"c{i}": (Annotated[int, Field(strict=True, ge=low, le=high, alias=c)], ...)
                              for i, c in enumerate(criteria)}  # aliased: a criterion may be any word, even "json"
    return create_model("JudgeScores", __config__=ConfigDict(extra="ignore"), **fields)


def format_block(criteria: Sequence[str], low: int, high: int) -> str:
    """The answer format appended to every rubric."""
    shape = json.dumps({c: f"<{low}-{high}>" for c in criteria}).replace('"<', "<").replace('>"', ">")
    return (f"Reply with one JSON object and nothing else, with a whole number from {low} to {high} for each "
            f"criterion:\n{shape}")


def parse_scores(text: str, schema: type[BaseModel]) -> dict[str, int]:
    """The scores in a judge's answer: the outermost ``{...}`` validated against ``schema``; raises ``ValueError``
    (pydantic's ``ValidationError`` is one) with the reason."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the answer")
    return schema.model_validate_json(text[start:end + 1]).model_dump(by_alias=True)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors()[:3]:
            loc = ".".join(str(p) for p in e["loc"])
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
        return "; ".join(parts)
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


@dataclass
class Call:
    """One judge call: the scores (None: missing), whether it needed its retry, and why it failed."""

    scores: dict[str, Any] | None
    retried: bool = False
    error: str | None = None


@dataclass
class Usage:
    """What the judge's own calls cost: calls made (a retry is one more; a batch asked again one by one after a
    failure counts once, and the failed batch's tokens are not known), the tokens the endpoint reported, seconds."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self, price: tuple[float, float] | None) -> dict[str, Any]:
        dollars = None if price is None else (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 4),
                "dollars": None if dollars is None else round(dollars, 8)}


class Judge:
    """Scores answers with a rubric on ``backend``; see the module docstring."""

    def __init__(self, backend: Generator, template: str, criteria: Sequence[str], low: int, high: int, *,
                 repeats: int = 1, max_new_tokens: int = 200, where: str = "judge",
                 clock: Callable[[], float] = time.perf_counter):
        self.backend = backend
        self.rubric = PromptTemplate(template, f"{where} rubric")
        self.criteria, self.low, self.high = list(criteria), low, high
        self.repeats, self.max_new_tokens = repeats, max_new_tokens
        self.schema = score_schema(self.criteria, low, high)
        self.format = format_block(self.criteria, low, high)
        self.clock = clock
        self.usage = Usage()

    def parse(self, text: str) -> dict[str, Any]:
        """One answer's validated content (``ValueError`` with the reason when it is unusable)."""
        return parse_scores(text, self.schema)

    def prompt(self, record: dict, output: str, reference: str | None, instruction: str | None = None) -> str:
        """The rubric rendered for one answer, then the answer format."""
        variables = {**record, "input": record.get("input", ""), "output": output, "reference": reference or "",
                     "instruction": instruction or "", "criteria": self.criteria, "low": self.low, "high": self.high}
        return f"{self.rubric.render(variables)}\n\n{self.format}"

    def _generate(self, prompts: list[str]) -> list[str | Exception]:
        """Each prompt's answer text, or the endpoint's error for that prompt (a failed batch is asked one by one,
        so one failing request loses only its own answer)."""
        if not prompts:
            return []
        t0 = self.clock()
        kw = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0}
        try:
            gens: list[Any] = list(self.backend.generate([self.backend.format_prompt(p) for p in prompts], **kw))
        except TunebenchError as exc:
            log.warning("judge: a batch of %d calls failed (%s); asking one by one", len(prompts), _reason(exc))
            gens = []
            for p in prompts:
                try:
                    gens.append(self.backend.generate([self.backend.format_prompt(p)], **kw)[0])
                except TunebenchError as one:
                    gens.append(one)
        self.usage.seconds += self.clock() - t0
        self.usage.requests += len(prompts)
        out: list[str | Exception] = []
        for g in gens:
            if isinstance(g, Exception):
                out.append(g)
                continue
            self.usage.prompt_tokens += int(g.prompt_tokens or 0)
            self.usage.completion_tokens += int(g.completion_tokens or 0)
            out.append(g.text)
        return out

    def ask(self, prompts: list[str]) -> list[Call]:
        """One call per prompt; an invalid answer is asked once more with the reason; still invalid: missing."""
        calls: list[Call] = []
        again: list[int] = []
        for i, got in enumerate(self._generate(prompts)):
            try:
                if isinstance(got, Exception):
                    raise got
                calls.append(Call(self.parse(got)))
            except (ValueError, TunebenchError) as exc:
                calls.append(Call(None, error=_reason(exc)))
                again.append(i)
        retry = [f"{prompts[i]}\n\nYour previous answer could not be used ({calls[i].error}). "
                 "Answer again with the JSON object only." for i in again]
        for i, got in zip(again, self._generate(retry)):
            calls[i].retried = True
            try:
                if isinstance(got, Exception):
                    raise got
                calls[i].scores, calls[i].error = self.parse(got), None
            except (ValueError, TunebenchError) as exc:
                calls[i].error = _reason(exc)
        return calls

    def run(self, records: list[dict], outputs: list[str], references: list[str | None],
            instruction: str | None = None) -> JudgeRun:
        """Judge every answer ``repeats`` times (one batch per repeat)."""
        prompts = [self.prompt(r, o, ref, instruction) for r, o, ref in zip(records, outputs, references)]
        by_repeat = [self.ask(prompts) for _ in range(self.repeats)]
        calls = [[rep[i] for rep in by_repeat] for i in range(len(prompts))]
        return JudgeRun(self.criteria, self.low, self.high, calls)


@dataclass
class JudgeRun:
    """Every call of one judged set of answers: ``calls[item][repeat]``."""

    criteria: list[str]
    low: int
    high: int
    calls: list[list[Call]]

    def item_scores(self) -> dict[str, list[float | None]]:
        """Per criterion, each item's mean over its valid repeats (None: every repeat missing)."""
        out: dict[str, list[float | None]] = {c: [] for c in self.criteria}
        for item in self.calls:
            valid = [c.scores for c in item if c.scores is not None]
            for c in self.criteria:
                out[c].append(float(np.mean([v[c] for v in valid])) if valid else None)
        return out

    def overall(self) -> list[float | None]:
        """Each item's mean over criteria (and repeats); None where the item has no valid call."""
        per = self.item_scores()
        return [None if per[self.criteria[0]][i] is None else float(np.mean([per[c][i] for c in self.criteria]))
                for i in range(len(self.calls))]

    def self_agreement(self) -> dict[str, Any]:
        """Exact agreement of the repeats: the share of items (with two or more valid repeats) whose repeats gave
        the same score on every criterion, and per criterion."""
        multi = [[c.scores for c in item if c.scores is not None] for item in self.calls]
        multi = [v for v in multi if len(v) >= 2]
        if not multi:
            return {"items": 0, "all_criteria": None, "by_criterion": {}, "mean_spread": None}
        same = lambda vals, c: len({v[c] for v in vals}) == 1  # noqa: E731
        spread = [max(v[c] for v in vals) - min(v[c] for v in vals) for vals in multi for c in self.criteria]
        return {"items": len(multi),
                "all_criteria": float(np.mean([all(same(vals, c) for c in self.criteria) for vals in multi])),
                "by_criterion": {c: float(np.mean([same(vals, c) for vals in multi])) for c in self.criteria},
                "mean_spread": float(np.mean(spread))}

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """Scores (per criterion and overall, with a 95% interval over items), missing calls and self-agreement."""
        per = self.item_scores()
        overall = self.overall()
        flat = [c for item in self.calls for c in item]
        kept = np.asarray([x for x in overall if x is not None], dtype=float)
        errors: dict[str, int] = {}
        for c in flat:
            if c.scores is None:
                errors[c.error or "unknown"] = errors.get(c.error or "unknown", 0) + 1
        return {
            "scores": {c: _mean([x for x in per[c] if x is not None]) for c in self.criteria},
            "overall": _mean(kept.tolist()), "overall_ci": mean_interval(kept, seed),
            "items": len(self.calls), "items_scored": int(len(kept)),
            "calls": len(flat), "missing": sum(c.scores is None for c in flat),
            "missing_rate": float(np.mean([c.scores is None for c in flat])) if flat else None,
            "retried": sum(c.retried for c in flat),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            "self_agreement": self.self_agreement(),
        }

    def items(self) -> dict[str, Any]:
        """What the store keeps per item: each criterion's mean, the overall mean and every repeat's scores."""
        return {"overall": self.overall(), "criteria": self.item_scores(),
                "repeats": [[c.scores for c in item] for item in self.calls]}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def mean_interval(values: np.ndarray, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the mean over resampled items (None under two items)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def round_half_up(x: np.ndarray) -> np.ndarray:
    """Whole numbers, halves rounded up (3.5 -> 4), as kappa's categories."""
    return np.floor(np.asarray(x, dtype=float) + 0.5).astype(int)


def kendall_tau(human: np.ndarray, judge: np.ndarray) -> float | None:
    """Kendall's tau-b (scipy); None where undefined (a constant side)."""
    from scipy.stats import kendalltau  # heavy: scipy.stats takes a second to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = kendalltau(human, judge).statistic
    return None if tau is None or not math.isfinite(tau) else float(tau)


def weighted_kappa(human: np.ndarray, judge: np.ndarray, low: int, high: int) -> float | None:
    """Cohen's kappa with quadratic weights (sklearn) between the human and the judge's scores rounded half up to
    the scale's whole numbers; None where undefined (every rating in one category on both sides)."""
    from sklearn.metrics import cohen_kappa_score  # heavy: scikit-learn takes seconds to import

    labels = list(range(low, high + 1))
    h = np.clip(round_half_up(human), low, high)
    j = np.clip(round_half_up(judge), low, high)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        k = cohen_kappa_score(h, j, labels=labels, weights="quadratic")
    return None if not math.isfinite(k) else float(k)


def human_agreement(human: Sequence[float | None], judge: Sequence[float | None], low: int, high: int, *,
                    seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Kendall's tau and weighted kappa between human ratings and the judge's scores of the same texts, over the
    items that have both, each with a 95% percentile interval over resampled items."""
    pairs = [(h, j) for h, j in zip(human, judge) if h is not None and j is not None]
    out: dict[str, Any] = {"n": len(pairs), "rated": sum(h is not None for h in human), "tau": None, "tau_ci": None,
                           "kappa": None, "kappa_ci": None, "kappa_weights": "quadratic"}
    if len(pairs) < 3:
        return out
    h = np.asarray([p[0] for p in pairs], dtype=float)
    j = np.asarray([p[1] for p in pairs], dtype=float)
    out["tau"], out["kappa"] = kendall_tau(h, j), weighted_kappa(h, j, low, high)
    rng = np.random.default_rng(seed)
    taus, kappas = [], []
    for idx in rng.integers(0, len(pairs), (resamples, len(pairs))):
        t, k = kendall_tau(h[idx], j[idx]), weighted_kappa(h[idx], j[idx], low, high)
        if t is not None:
            taus.append(t)
        if k is not None:
            kappas.append(k)
    if out["tau"] is not None and taus:
        out["tau_ci"] = [float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))]
    if out["kappa"] is not None and kappas:
        out["kappa_ci"] = [float(np.percentile(kappas, 2.5)), float(np.percentile(kappas, 97.5))]
    return out


def trust_warnings(judge: dict | None) -> list[str]:
    """The warnings a stored judge summary (``metrics.judge`` averaged over seeds, see ``analysis``) calls for:
    weak agreement with people (tau below 0.3), low self-agreement (below 0.8), missing calls."""
    if not judge:
        return []
    out = []
    human = judge.get("human") or {}
    if human.get("tau") is not None and human["tau"] < WEAK_TAU:
        ci = human.get("tau_ci")
        out.append(f"the judge agrees weakly with people: Kendall tau-b {human['tau']:.2f}"
                   + (f" (95% CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else "") + f" on {human['n']} rated items, "
                   f"below {WEAK_TAU}; its scores may not rank answers as people would")
    elif human.get("rated") and human.get("tau") is None:
        out.append(f"agreement with people could not be measured ({human.get('n', 0)} of {human['rated']} rated "
                   "items judged, or no variation in the ratings)")
    agree = (judge.get("self_agreement") or {}).get("all_criteria")
    if agree is not None and agree < LOW_SELF_AGREEMENT:
        out.append(f"the judge disagrees with itself: its repeated calls gave the same scores on only "
                   f"{100 * agree:.0f}% of items (below {100 * LOW_SELF_AGREEMENT:.0f}%), at temperature 0")
    missing = judge.get("missing_rate")
    if missing:
        out.append(f"{100 * missing:.1f}% of judge calls failed and are missing (not counted as scores)")
    return out


def check_human(cfg: JudgeConfig, data: TaskData) -> None:
    """Human ratings on the judge's scale, before any trial runs (``DataError`` naming the row otherwise)."""
    if not data.test.human:
        return
    low, high = cfg.bounds
    for i, (score, _) in enumerate(data.test.human):
        if score is not None and not low <= score <= high:
            line = data.test.lines[i] if i < len(data.test.lines) else f"test row {i + 1}"
            raise DataError(f"{data.config.data.test or data.config.data.train} {line}: human score {score:g} in column '{data.config.human_score}' is outside "
                            f"the judge's scale {cfg.scale} (metrics[0].judge.scale); rescale the ratings or the scale")


def judge_test(cfg: JudgeConfig, template: str, backend: Generator, data: TaskData, predictions: Sequence[str], *,
               price: tuple[float, float] | None = None, cache: dict | None = None,
               clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Any], dict[str, Any]]:
    """Judge a trial's test answers (the first ``cfg.max_items``) and, where the data has human ratings, the rated
    texts. Returns the trial's judge summary (scores, missing calls, self-agreement, agreement with people, and the
    judge's own cost, kept apart from the strategy's) and its per-item scores.

    The rated texts do not depend on the strategy, so their judgement is computed once per ``cache`` (a dict kept
    with the judge's backend) and reused by the study's other trials, which record that it was reused."""
    n = len(predictions) if cfg.max_items is None else min(cfg.max_items, len(predictions))
    records = data.test.records()[:n]
    targets = list(data.test.targets or [""] * len(records))[:n]
    low, high = cfg.bounds
    make = lambda: Judge(backend, template, cfg.criteria, low, high, repeats=cfg.repeats,  # noqa: E731
                         max_new_tokens=cfg.max_new_tokens, where="metrics[0].judge", clock=clock)
    judge = make()
    run = judge.run(records, list(predictions[:n]), targets, data.config.instruction)
    summary = run.summary()
    summary.update({"model": cfg.model, "criteria": list(cfg.criteria), "scale": cfg.scale, "repeats": cfg.repeats,
                    "cost": judge.usage.to_dict(price), "human": None})
    items = run.items()
    human = (data.test.human or [])[:n]
    if any(score is not None for score, _ in human):
        rated = [i for i, (score, _) in enumerate(human) if score is not None]
        blank_reference = data.config.human_rated in (None, data.config.target)
        key = json.dumps([template, cfg.model_dump(), [human[i] for i in rated],
                          [records[i]["input"] for i in rated]], sort_keys=True, default=str)
        reused = cache is not None and key in cache
        if reused:
            calibration = cache[key]  # type: ignore[index]
        else:
            cj = make()
            crun = cj.run([records[i] for i in rated], [human[i][1] for i in rated],
                          [None if blank_reference else targets[i] for i in rated], data.config.instruction)
            judged = crun.overall()
            calibration = {**human_agreement([human[i][0] for i in rated], judged, low, high),
                           "missing_rate": crun.summary()["missing_rate"], "cost": cj.usage.to_dict(price),
                           "scores": judged}
            if cache is not None:
                cache[key] = calibration
        summary["human"] = {**{k: v for k, v in calibration.items() if k != "scores"},
                            "cost": None if reused else calibration["cost"], "reused": reused}
        items["human"] = {"index": rated, "judge": calibration["scores"]}
    return summary, items


# ---- pairwise comparison of two strategies' answers -----------------------------------------------------------
class Verdict(BaseModel):
    """One pairwise answer: which of the two answers shown is better (other keys ignored)."""

    model_config = ConfigDict(extra="ignore")
    better: Literal["first", "second", "tie"]


class PairwiseJudge(Judge):
    """Asks which of two answers to the same item is better, each pair in both orders (A shown first, then B shown
    first), through the same calls as :class:`Judge`: temperature 0, a JSON answer validated by :class:`Verdict`,
    one retry with the reason, then missing."""

    def __init__(self, backend: Generator, criteria: Sequence[str], *, template: str = PAIRWISE_RUBRIC,
                 max_new_tokens: int = 200, where: str = "judge", clock: Callable[[], float] = time.perf_counter):
        super().__init__(backend, template, criteria, 0, 1, repeats=1, max_new_tokens=max_new_tokens, where=where,
                         clock=clock)
        self.format = PAIRWISE_FORMAT

    def parse(self, text: str) -> dict[str, Any]:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end < start:
            raise ValueError("no JSON object in the answer")
        return Verdict.model_validate_json(text[start:end + 1]).model_dump()

    def pair_prompt(self, record: dict, first: str, second: str, reference: str | None,
                    instruction: str | None = None) -> str:
        """The comparison rubric rendered for one ordered pair, then the answer format."""
        variables = {**record, "input": record.get("input", ""), "first": first, "second": second,
                     "reference": reference or "", "instruction": instruction or "", "criteria": self.criteria}
        return f"{self.rubric.render(variables)}\n\n{self.format}"

    def compare(self, records: list[dict], a: list[str], b: list[str], references: list[str | None],
                instruction: str | None = None) -> PairwiseRun:
        """Every item asked twice, A first and B first, in one batch."""
        n = len(records)
        prompts = ([self.pair_prompt(r, x, y, ref, instruction) for r, x, y, ref in zip(records, a, b, references)]
                   + [self.pair_prompt(r, y, x, ref, instruction) for r, x, y, ref in zip(records, a, b, references)])
        calls = self.ask(prompts)
        return PairwiseRun(calls[:n], calls[n:])


def _side(call: Call, a_first: bool) -> str | None:
    """A call's verdict as "A", "B" or "tie" (None: missing)."""
    if call.scores is None:
        return None
    better = call.scores["better"]
    if better == "tie":
        return "tie"
    return "A" if (better == "first") == a_first else "B"


@dataclass
class PairwiseRun:
    """The calls of one comparison: ``a_first[i]`` showed A's answer first, ``b_first[i]`` B's."""

    a_first: list[Call]
    b_first: list[Call]

    def outcomes(self) -> list[str | None]:
        """Per item "A", "B" or "tie": the verdict both orders gave, a tie when it changes with the order, None
        (missing) when either call failed; a missing item is never a loss."""
        out: list[str | None] = []
        for x, y in zip(self.a_first, self.b_first):
            u, v = _side(x, True), _side(y, False)
            out.append(None if u is None or v is None else (u if u == v else "tie"))
        return out

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """Wins, ties and losses of A, A's win rate (ties count half) with a 95% interval over items, the order-flip
        rate (items whose verdict changed with the order), the share of verdicts for the answer shown first, and
        the missing calls and items."""
        both = [(_side(x, True), _side(y, False)) for x, y in zip(self.a_first, self.b_first)]
        complete = [(u, v) for u, v in both if u is not None and v is not None]
        outcomes = [o for o in self.outcomes() if o is not None]
        points = np.asarray([{"A": 1.0, "tie": 0.5, "B": 0.0}[o] for o in outcomes], dtype=float)
        flat = self.a_first + self.b_first
        decided = [c.scores["better"] for c in flat if c.scores is not None and c.scores["better"] != "tie"]
        errors: dict[str, int] = {}
        for c in flat:
            if c.scores is None:
                errors[c.error or "unknown"] = errors.get(c.error or "unknown", 0) + 1
        return {
            "items": len(both), "compared": len(complete), "missing": len(both) - len(complete),
            "missing_rate": (len(both) - len(complete)) / len(both) if both else None,
            "wins": outcomes.count("A"), "ties": outcomes.count("tie"), "losses": outcomes.count("B"),
            "order_ties": sum(u != v for u, v in complete),
            "win_rate": _mean(points.tolist()), "win_rate_ci": mean_interval(points, seed),
            "order_flip_rate": float(np.mean([u != v for u, v in complete])) if complete else None,
            "first_shown_share": float(np.mean([d == "first" for d in decided])) if decided else None,
            "calls": len(flat), "missing_calls": sum(c.scores is None for c in flat),
            "retried": sum(c.retried for c in flat),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        }

    def items(self) -> dict[str, Any]:
        """What the store keeps per item: both orders' verdicts (as A/B/tie) and the outcome."""
        return {"a_first": [_side(c, True) for c in self.a_first], "b_first": [_side(c, False) for c in self.b_first],
                "outcome": self.outcomes()}


def compare_answers(cfg: JudgeConfig, backend: Generator, inputs: Sequence[str], references: Sequence[str | None],
                    a: Sequence[str], b: Sequence[str], *, instruction: str | None = None,
                    price: tuple[float, float] | None = None, template: str = PAIRWISE_RUBRIC,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Two strategies' answers to the same test items (the first ``cfg.max_items``) compared by the judge in both
    orders: the summary (see :meth:`PairwiseRun.summary`), the judge's own cost (apart from the strategies') and
    the per-item verdicts under ``items``."""
    if len(a) != len(b) or len(a) != len(inputs):
        raise DataError(f"the two trials answered {len(a)} and {len(b)} test items ({len(inputs)} stored): they "
                        "were not scored on the same test split, so their answers cannot be paired")
    n = len(a) if cfg.max_items is None else min(cfg.max_items, len(a))
    judge = PairwiseJudge(backend, cfg.criteria, template=template, max_new_tokens=cfg.max_new_tokens,
                          where="metrics[0].judge (pairwise)", clock=clock)
    run = judge.compare([{"input": x} for x in inputs[:n]], list(a[:n]), list(b[:n]), list(references[:n]),
                        instruction)
    return {**run.summary(), "model": cfg.model, "criteria": list(cfg.criteria),
            "cost": judge.usage.to_dict(price), "items_detail": run.items()}
