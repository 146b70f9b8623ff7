"""The task: type, data files, fields, labels, instruction and splits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..textfmt import placeholders
from .base import SEED_MAX, _Strict
from .files import path_field


class LabelSpec(_Strict):
    """One class: the value found in the data files, a readable name and an optional description."""

    value: str
    name: str
    description: str | None = None


class DataFiles(_Strict):
    """Where the examples are. Missing dev/test splits are carved from train (see ``SplitConfig``)."""

    train: str
    dev: str | None = None
    test: str | None = None
    unlabelled: str | None = Field(
        None, description="Inputs without labels (same format; a label column, if any, is kept only to audit a "
        "teacher's labels): the pool a `distill` teacher labels.")

    @field_validator("train", "dev", "test", "unlabelled")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return path_field(v)  # type: ignore[return-value]


class SplitConfig(_Strict):
    """How to carve missing splits out of the train file: fractions, stratified by label, seeded."""

    dev: float = Field(0.1, gt=0, lt=1, description="Fraction of train used as dev when no dev file is given.")
    test: float = Field(0.2, gt=0, lt=1, description="Fraction of train used as test when no test file is given.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the split (independent of the trial seeds).")


class TaskConfig(_Strict):
    """What to do: the task type, the fields and the labels."""

    type: Literal["classification", "generation"] = Field(
        "classification", description="classification: pick one of the labels; generation: write the target text.")
    data: DataFiles
    text: list[str] = Field(description="Text field, or a list of fields joined by text_template.")
    text_template: str | None = Field(None, description="How several text fields are joined, e.g. '{title}: {body}'.")
    label: str | None = Field(None, description="Label field (classification).")
    target: str | None = Field(None, description="Expected output field (generation).")
    labels: list[LabelSpec] | None = Field(None, description="Label values, names and descriptions (default: from train).")
    instruction: str | None = Field(None, description="What the task is, in words; prompt templates show it to causal models.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    drop_leakage: bool = Field(False, description="Drop train rows whose text also appears in dev or test.")
    format: Literal["csv", "tsv", "jsonl", "json", "parquet"] | None = Field(
        None, description="File format (default: from the file extension)."
    )
    groups: list[str] = Field(
        default_factory=list, description="Columns of the test data that name groups of users (channel, region, "
        "segment): every trial is also scored per group, with the gap between the best and worst group.")

    human_score: str | None = Field(
        None, description="Column of the test data with human ratings on the judge's scale: the judge also scores "
        "the rated texts, and its agreement with people (Kendall's tau, Cohen's kappa) is stored with every trial.")
    human_rated: str | None = Field(
        None, description="Column holding the texts the human_score rates (default: the target column; then the "
        "rubric sees an empty reference for them).")

    @field_validator("data", mode="before")
    @classmethod
    def _one_file(cls, v: Any) -> Any:
        if v is None or v == {}:
            raise ValueError("give the data files: data: train.csv, or data: {train: ..., dev: ..., test: ...}")
        return {"train": v} if isinstance(v, str) else v

    @field_validator("text", mode="before")
    @classmethod
    def _text_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("groups", mode="before")
    @classmethod
    def _group_list(cls, v: Any) -> Any:
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            if any(not isinstance(c, str) or not c.strip() for c in v):
                raise ValueError("give column names of the test data, e.g. groups: [channel, region]")
            if len(set(v)) != len(v):
                raise ValueError(f"a column is named twice in {v}")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, (dict, list)):
            raise ValueError("give a list of label values ([neg, pos]) or a mapping of value to name or "
                             "{name, description}")
        items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
        out = []
        for value, spec in items:
            if isinstance(spec, dict):
                spec = dict(spec)
                if value is None:  # the stored (dumped) form lists {value, name, description}
                    value = spec.pop("value", None)
                name = spec.pop("name", None)
                desc = spec.pop("description", None)
                if spec:
                    raise ValueError(f"unknown key(s) {sorted(spec)} in a label; use 'name' and 'description'")
                if name is None:
                    name = value
            else:
                name, desc = spec, None
            if name is None:
                raise ValueError("each label needs a name")
            out.append({"value": str(name if value is None else value), "name": str(name), "description": desc})
        return out

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.type == "classification" and not self.label:
            raise ValueError("a classification task needs 'label': the field that holds each example's class")
        if self.type == "generation":
            if not self.target:
                raise ValueError("a generation task needs 'target': the field that holds the expected output")
            if self.label or self.labels:
                raise ValueError("a generation task has a 'target' field, not 'label'/'labels'")
        if not self.text:
            raise ValueError("'text' needs at least one field name")
        if self.human_rated and not self.human_score:
            raise ValueError("human_rated names the texts people rated; give their ratings' column too (human_score)")
        if self.human_score and self.type != "generation":
            raise ValueError("human_score: human ratings calibrate a judge of generated text; this task is "
                             "classification")
        if len(self.text) > 1 or self.text_template:
            template = self.text_template or "\n".join("{%s}" % f for f in self.text)
            missing = [p for p in placeholders(template) if p not in self.text]
            if missing:
                raise ValueError(f"text_template uses {missing}, which are not in 'text' {self.text}")
            self.text_template = template
        if self.labels is not None:
            names = [lab.name for lab in self.labels]
            if len(set(names)) != len(names):
                raise ValueError(f"label names must be unique, got {names}")
        return self
