"""Prompts as artifacts: Jinja2 templates rendered in a sandbox, demonstrations, answer parsing.

A template sees the example's input fields, ``input`` (the fields joined), ``instruction``, ``labels``
(each with ``name`` and ``description``), ``label_names``, ``task_type`` and ``demonstrations`` (records
with their ``output``). Templates cannot reach Python internals: the sandbox refuses, and the error says so.
"""

from __future__ import annotations

import re
import string
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from .errors import ConfigError

MAX_TEXT = 1_000_000  # characters (or items) of a rendered prompt and of any value a template builds
MAX_STEPS = 200_000  # calls, filters and loop iterations in one rendering (its time bound)
MAX_ARG = 10_000  # an integer passed to a string method or filter (widths, counts)


class TemplateLimit(TemplateError):
    """A template went over a bound on rendering (size, steps or an argument)."""


class _Budget(threading.local):
    steps = 0


_BUDGET = _Budget()


def _step(n: int = 1) -> None:
    _BUDGET.steps += n
    if _BUDGET.steps > MAX_STEPS:
        raise TemplateLimit(f"more than {MAX_STEPS:,} steps (calls, filters and loop iterations) in one rendering")


def _size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_TEXT:
        raise TemplateLimit(f"a value of {len(value):,} characters or items (the limit is {MAX_TEXT:,})")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
        raise TemplateLimit("an integer of more than 4096 bits")
    return value


def _check_args(args: tuple, kwargs: dict, names: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ARG:
            raise TemplateLimit(f"{names}: the argument {a} is over {MAX_ARG:,}")


def _joined_length(seq: Any) -> int:
    return sum(len(x) if isinstance(x, str) else 16 for x in seq) if isinstance(seq, (list, tuple)) else 0


def _precheck(name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse calls whose result would be over :data:`MAX_TEXT` before they build it (join, replace, format)."""
    _check_args(args, kwargs, name)
    if name == "join":
        seq = args[0] if args and isinstance(obj, str) else obj
        if _joined_length(seq) > MAX_TEXT:
            raise TemplateLimit(f"join would build over {MAX_TEXT:,} characters")
    if name == "replace" and isinstance(obj, str) and len(args) >= 2 and isinstance(args[1], str):
        if obj.count(str(args[0]) or " ") * max(1, len(args[1])) + len(obj) > MAX_TEXT:
            raise TemplateLimit(f"replace would build over {MAX_TEXT:,} characters")
    if name in ("format", "format_map") and isinstance(obj, str) and re.search(r"\d{5,}", obj):
        raise TemplateLimit("a format width or precision over 9,999")


def _bounded_filter(name: str, func):
    def run(*args, **kwargs):
        _step()
        lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/env/eval_ctx first
        value = args[lead] if len(args) > lead else None
        _precheck(name, value, args[lead + 1:], kwargs)
        return _size(func(*args, **kwargs))

    run.__dict__.update(getattr(func, "__dict__", {}))  # keeps jinja_pass_arg (pass_context etc.)
    run.__name__ = getattr(func, "__name__", name)
    return run


class _Bounds(NodeTransformer):
    """Route every loop's iterable and every ``~`` concatenation through counted, size-checked filters."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "tb_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "tb_concat", [], [], None, None,
                            lineno=node.lineno)


def _iter(value: Any):
    for item in value:
        _step()
        yield item


def _concat(parts: list) -> str:
    if _joined_length([p if isinstance(p, str) else str(p)[:MAX_TEXT + 1] for p in parts]) > MAX_TEXT:
        raise TemplateLimit(f"~ would build over {MAX_TEXT:,} characters")
    return "".join(str(p) for p in parts)


class BoundedSandbox(SandboxedEnvironment):
    """Jinja2's sandbox with time and memory bounds on rendering: at most :data:`MAX_STEPS` calls, filters and
    loop iterations, no value or output over :data:`MAX_TEXT`, no string-method or filter integer over
    :data:`MAX_ARG`. ``*``, ``**``, ``+`` and ``%`` are checked before they run and are never folded while the
    template compiles (``7 ** 10 ** 8`` would otherwise hang the compiler)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.filters = {k: _bounded_filter(k, f) for k, f in self.filters.items()}
        self.filters["tb_iter"], self.filters["tb_concat"] = _iter, _concat

    def _parse(self, source, name, filename):  # noqa: D401 - jinja's hook between parsing and code generation
        return _Bounds().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        _step()
        _check_binop(operator, left, right)
        return _size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _step()
        name = getattr(__obj, "__name__", "a function")
        if isinstance(getattr(__obj, "__self__", None), (str, list, tuple, dict)):
            _precheck(name, __obj.__self__, args, kwargs)
        elif __obj is not __self.globals.get("range"):  # the sandbox bounds range() itself
            _check_args(args, kwargs, name)
        return _size(SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and re.search(r"\d{5,}", value.__self__):
            def refuse(*args: Any, **kwargs: Any) -> str:
                raise TemplateLimit("a format width or precision over 9,999")
            return refuse
        return wrapped


def _check_binop(op: str, left: Any, right: Any) -> None:
    seq = (str, list, tuple)
    if op == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
        if abs(right) > 256 and abs(left) > 1:
            raise TemplateLimit(f"an exponent of {right} (the limit is 256)")
    if op == "*":
        if isinstance(left, seq) and isinstance(right, int) or isinstance(right, seq) and isinstance(left, int):
            sq, n = (left, right) if isinstance(left, seq) else (right, left)
            if len(sq) * max(0, n) > MAX_TEXT:
                raise TemplateLimit(f"* would build over {MAX_TEXT:,} characters or items")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
            raise TemplateLimit("an integer of more than 4096 bits")
    if op == "+" and isinstance(left, seq) and isinstance(right, seq) and len(left) + len(right) > MAX_TEXT:
        raise TemplateLimit(f"+ would build over {MAX_TEXT:,} characters or items")
    if op == "%" and isinstance(left, str) and re.search(r"\d{5,}", left):
        raise TemplateLimit("a format width or precision over 9,999")


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
        _BUDGET.steps = 0
        try:
            text = self._bounded(variables)
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

    def _bounded(self, variables: dict[str, Any]) -> str:
        out, size = [], 0
        for chunk in self._template.generate(**variables):
            size += len(chunk)
            if size > MAX_TEXT:
                raise TemplateLimit(f"the prompt is over {MAX_TEXT:,} characters")
            out.append(chunk)
        return "".join(out)


_SINGLE_BRACES = re.compile(r"(?<!\{)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}(?!\})")


def single_braces_to_jinja(value: Any) -> Any:
    """An old-style ``{name}`` template (or a list of them) as Jinja2 (``{{ name }}``); other values unchanged.

    Example:
        >>> single_braces_to_jinja(["This review is {label}."])
        ['This review is {{ label }}.']
    """
    if isinstance(value, list):
        return [single_braces_to_jinja(v) for v in value]
    return _SINGLE_BRACES.sub(r"{{ \1 }}", value) if isinstance(value, str) else value


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

