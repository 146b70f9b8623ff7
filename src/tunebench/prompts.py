"""Prompts as artifacts: Jinja2 templates rendered in a sandbox, demonstrations, answer parsing.

A template sees the example's input fields, ``input`` (the fields joined), ``instruction``, ``labels``
(each with ``name`` and ``description``), ``label_names``, ``task_type`` and ``demonstrations`` (records
with their ``output``). Templates cannot reach Python internals: the sandbox refuses, and the error says so.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import SecurityError

from .errors import ConfigError
from .sandbox import BoundedSandbox, TemplateLimit, render_bounded

_ENV = BoundedSandbox(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)

CLASSIFY_TEMPLATE = """\
{% if instruction %}{{ instruction }}
{% else %}Classify the text.
{% endif %}
Answer with one of: {{ label_names | join(", ") }}.
{% for l in labels if l.description %}
- {{ l.name }}: {{ l.description }}
{% endfor %}
{% for d in demonstrations %}

Text: {{ d.input }}
Answer: {{ d.output }}
{% endfor %}

Text: {{ input }}
Answer:"""

GENERATE_TEMPLATE = """\
{% if instruction %}{{ instruction }}
{% endif %}
{% for d in demonstrations %}

Input: {{ d.input }}
Output: {{ d.output }}
{% endfor %}

Input: {{ input }}
Output:"""

COT_CLASSIFY_TEMPLATE = """\
{% if instruction %}{{ instruction }}
{% else %}Classify the text.
{% endif %}
Possible answers: {{ label_names | join(", ") }}.
{% for l in labels if l.description %}
- {{ l.name }}: {{ l.description }}
{% endfor %}
Think step by step, then give the final answer on its own line as "Answer: <answer>".
{% for d in demonstrations %}

Text: {{ d.input }}
{% if d.reasoning %}Reasoning: {{ d.reasoning }}
{% endif %}
Answer: {{ d.output }}
{% endfor %}

Text: {{ input }}
Reasoning:"""

COT_GENERATE_TEMPLATE = """\
{% if instruction %}{{ instruction }}
{% endif %}
Think step by step, then give the final output on its own line as "Answer: <output>".
{% for d in demonstrations %}

Input: {{ d.input }}
{% if d.reasoning %}Reasoning: {{ d.reasoning }}
{% endif %}
Answer: {{ d.output }}
{% endfor %}

Input: {{ input }}
Reasoning:"""


def default_template(task_type: str, reasoning: bool = False) -> str:
    if reasoning:
        return COT_CLASSIFY_TEMPLATE if task_type == "classification" else COT_GENERATE_TEMPLATE
    return CLASSIFY_TEMPLATE if task_type == "classification" else GENERATE_TEMPLATE


# what compiling or rendering a template can raise: it is the user's code, so every Exception is the template's
# failure (a filter's own AssertionError, a TypeError on a wrong operand ...), reported with the template's name
_RENDER_ERRORS = (Exception,)


class PromptTemplate:
    """A sandboxed Jinja2 template. Syntax errors, unknown variables and unsafe access raise ``ConfigError``.

    Example:
        >>> PromptTemplate("Review: {{ input }}\\nSentiment:").render({"input": "great film"})
        'Review: great film\\nSentiment:'
    """

    def __init__(self, source: str, where: str = "template"):
        self.source = source
        self.where = where
        try:
            self._template = _ENV.from_string(source)
            self.variables = sorted(meta.find_undeclared_variables(_ENV.parse(source)))
        except TemplateSyntaxError as exc:
            raise ConfigError(f"{where} line {exc.lineno}: invalid Jinja2 template: {exc.message}") from None
        except _RENDER_ERRORS as exc:  # raised while Jinja folds constants at compile time ('x'['y'] and 1)
            raise ConfigError(f"{where}: invalid Jinja2 template ({exc.__class__.__name__}: "
                              f"{_clip(str(exc), 200)})") from None

    def render(self, variables: dict[str, Any]) -> str:
        """The rendered prompt; any failure (including the bounds of :class:`BoundedSandbox`) is a
        ``ConfigError`` naming the template."""
        try:
            text = render_bounded(self._template, variables)
        except SecurityError as exc:
            raise ConfigError(f"{self.where}: the template tries to reach Python internals, which the sandbox "
                              f"forbids ({exc}); use only the prompt variables") from None
        except UndefinedError as exc:
            raise ConfigError(f"{self.where}: {exc.message}; available variables: "
                              f"{', '.join(sorted(variables))}") from None
        except TemplateLimit as exc:
            raise ConfigError(f"{self.where}: rendering stopped: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{self.where}: rendering stopped: recursion too deep (a macro that calls "
                              "itself without end?)") from None
        except _RENDER_ERRORS as exc:
            raise ConfigError(f"{self.where}: rendering failed ({exc.__class__.__name__}: "
                              f"{_clip(str(exc), 200)})") from None
        return text.strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: how generated answers are compared."""
    return " ".join(text.lower().translate(_PUNCT).split())


_ANSWER = re.compile(r"answer\s*[:：]\s*(.*)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` (to the end of its line), or None when there is none."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    return found[-1].strip()


def parse_label(text: str | None, label_names: list[str]) -> int:
    """Label id named by a generated answer, or -1 (a format failure) when none or several match.

    Exact match after normalisation first; else the answer must contain exactly one label name as words.

    Example:
        >>> parse_label(" Positive.", ["negative", "positive"])
        1
        >>> parse_label("no idea", ["negative", "positive"])
        -1
    """
    if text is None:
        return -1
    norm = normalize(text)
    names = [normalize(n) for n in label_names]
    if norm in names:
        return names.index(norm)
    padded = f" {norm} "
    hits = [i for i, n in enumerate(names) if n and f" {n} " in padded]
    # several hits: a longer name may contain a shorter one ("very positive" vs "positive")
    hits = [i for i in hits if not any(j != i and names[i] in names[j] and f" {names[j]} " in padded for j in hits)]
    return hits[0] if len(hits) == 1 else -1


@dataclass
class PromptBuilder:
    """Renders the prompt of one example: template + task variables + demonstrations.

    Demonstrations are either fixed (``demos``) or retrieved per input (``retrieved[i]`` gives the demos of
    the i-th rendered record via :meth:`render_many` with ``demo_sets``).
    """

    template: str
    task_type: str
    instruction: str | None = None
    labels: list[dict] = field(default_factory=list)
    demos: list[dict] = field(default_factory=list)
    where: str = "template"

    def __post_init__(self) -> None:
        self._tpl = PromptTemplate(self.template, self.where)

    @property
    def variables(self) -> dict[str, Any]:
        return {"instruction": self.instruction or "", "labels": self.labels,
                "label_names": [lab["name"] for lab in self.labels], "task_type": self.task_type}

    def render(self, record: dict[str, str], demos: list[dict] | None = None) -> str:
        return self._tpl.render({**self.variables, **record,
                                 "demonstrations": self.demos if demos is None else demos})

    def to_dict(self) -> dict:
        return {"template": self.template, "task_type": self.task_type, "instruction": self.instruction,
                "labels": self.labels, "demos": self.demos}

    @classmethod
    def from_dict(cls, d: dict) -> PromptBuilder:
        return cls(**d)


def demo_record(record: dict[str, str], output: str) -> dict[str, str]:
    return {**record, "output": output}


def select_demonstrations(labels: np.ndarray, shots: int, selection: str, seed: int,
                          classification: bool) -> np.ndarray:
    """Indices of fixed demonstrations: ``balanced`` (``shots`` per class) or ``random`` (shots x classes)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels) if classification else np.zeros(1, dtype=np.int64)
    if selection == "random" or not classification:
        n = min(len(labels), shots * len(classes))
        return rng.choice(len(labels), size=n, replace=False)
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, size=min(len(idx), shots), replace=False).tolist())
    picked = np.asarray(picked, dtype=np.int64)
    rng.shuffle(picked)  # interleave classes so the last demonstration does not always share one label
    return picked


# ---- registry references (the store's prompt registry resolves them) ----
NAME_PATTERN = r"[A-Za-z0-9_.\-/]+"
_NAME = re.compile(rf"^{NAME_PATTERN}$")


def check_name(name: str) -> str:
    """A registry name: letters, digits, ``_ . - /``; ``/`` separates folders (no empty, ``.`` or ``..`` parts)."""
    parts = name.split("/")
    if not _NAME.match(name) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"prompt name {name!r}: use letters, digits and _ . - / (folders separated by /, "
                          "no empty, '.' or '..' parts), e.g. support-intent or team/support-intent")
    return name



def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME[@VERSION]`` -> ``(name, selector)``; the selector is ``latest``, a number or ``#hashprefix``."""
    name, _, selector = ref.strip().partition("@")
    selector = selector or "latest"
    check_name(name)
    if not (selector == "latest" or selector.isdigit() or re.fullmatch(r"#[0-9a-fA-F]+", selector)):
        raise ConfigError(f"prompt reference {ref!r}: after '@' give a version number, 'latest' or '#' and a hash "
                          "prefix, e.g. support-intent@3, support-intent@latest or support-intent@#1a2b3c")
    return name, selector

