"""The study's ``metrics:`` list: quality measures besides the metric table, for now one LLM judge.

A judge is a model of the study that scores each generated answer on named criteria, asked at temperature 0 with a
rubric from the prompt registry (``rubric: NAME@VERSION``), written inline (``template:``) or the built-in one.

Example:
    >>> JudgeConfig(model="grader", rubric="support-reply-quality@2", criteria=["correct", "tone"]).bounds
    (1, 5)
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import _Strict
from .files import clip

_CRITERION = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
_SCALE = re.compile(r"^\s*(-?\d{1,4})\s*-\s*(-?\d{1,4})\s*$")
MAX_SCALE_STEPS = 100


class JudgeConfig(_Strict):
    """An LLM judge of generated text: which model, which rubric, which criteria on which scale, how many repeats."""

    model: str = Field(description="Name of the study model that judges (usually an openai endpoint); it runs at "
                       "temperature 0. A model only a judge names is not a candidate of the strategies.")
    rubric: str | None = Field(None, description="The rubric, a registry reference NAME@VERSION (`tunebench prompts "
                               "import FILE --kind rubric`); default: the built-in rubric, unless template is given.")
    template: str | None = Field(None, description="The rubric written here instead (Jinja2; variables: input, "
                                 "output, reference, instruction, criteria, low, high and the input fields).")
    criteria: list[str] = Field(default_factory=lambda: ["correct", "complete"], min_length=1, max_length=20,
                                description="What is scored, each separately (names become the keys of the "
                                "judge's JSON answer).")
    scale: str = Field("1-5", description="The score range, LOW-HIGH in whole numbers, e.g. 1-5 or 0-10.")
    repeats: int = Field(3, ge=1, le=20, description="Times each answer is judged; the self-agreement of the repeats "
                         "is stored (at temperature 0 it tests the endpoint's nondeterminism).")
    max_new_tokens: int = Field(200, ge=8, le=4096, description="Most tokens of one judge answer.")
    max_items: int | None = Field(None, ge=1, le=1_000_000, description="Judge only the first N test items "
                                  "(bounds the judge's cost; default: all).")
    pairwise: bool = Field(False, description="Allow `tunebench judge STUDY --pair A B`: the judge is shown two "
                           "strategies' answers to each test item and asked which is better, in both orders (a "
                           "verdict that changes with the order is a tie); 2 calls per item and pair.")

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not _CRITERION.match(c)]
        if bad:
            raise ValueError(f"criterion {clip(bad[0], 40)!r}: use a word of letters, digits and _ (it is a key "
                             "of the judge's JSON answer), e.g. correct, complete, tone")
        if len(set(v)) != len(v):
            raise ValueError(f"a criterion is named twice in {v}")
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        text = str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        m = _SCALE.match(text or "")
        if not m:
            raise ValueError(f"scale {clip(v, 40)!r}: write LOW-HIGH in whole numbers, e.g. 1-5 or 0-10")
        low, high = int(m.group(1)), int(m.group(2))
        if not low < high or high - low > MAX_SCALE_STEPS:
            raise ValueError(f"scale {v}: LOW must be below HIGH, at most {MAX_SCALE_STEPS} apart (e.g. 1-5)")
        return f"{low}-{high}"

    @model_validator(mode="after")
    def _one_rubric(self) -> JudgeConfig:
        if self.rubric is not None and self.template is not None:
            raise ValueError("give either rubric (a registry reference) or template (the rubric written here), "
                             "not both")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """(low, high) of the scale."""
        m = _SCALE.match(self.scale)
        assert m is not None  # checked when the config was read
        return int(m.group(1)), int(m.group(2))


class MetricEntry(_Strict):
    """One entry of ``metrics:``: ``judge: {...}``."""

    judge: JudgeConfig


def metric_entries(v: Any) -> Any:
    """``metrics:`` as written: a list of one-key mappings; a table metric's name is refused with the reason."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError("give a list, e.g. metrics: [{judge: {model: grader, criteria: [correct, tone]}}]")
    for item in v:
        if isinstance(item, str):
            raise ValueError(f"{clip(item, 40)!r}: every metric of the table (exact_match, token_f1, rouge_l, bleu, "
                             "chrf) is computed already; metrics: lists judges, e.g. - judge: {model: grader}")
    return v
