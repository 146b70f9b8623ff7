"""Jinja2's sandbox with bounds on rendering time and memory, for prompt templates users write.

The sandbox already keeps templates away from Python internals; these bounds keep a template from hanging or
exhausting a run:

* **time**: a rendering stops after :data:`MAX_SECONDS` of wall time or :data:`MAX_STEPS` steps. A step is a
  call, a filter, an operator, an item or attribute lookup or one loop iteration (recursive ``loop(...)`` calls
  included), so no construct runs long between two checks of the clock;
* **memory**: every value a template builds, and the rendered prompt, stays under :data:`MAX_TEXT` characters
  (a list counts its items and the characters of its strings). Operations that can build far more than they are
  given (``*``, ``%``, ``format``, ``replace``, ``join``, widths of ``center``/``indent``/``ljust``..., ``lipsum``)
  are estimated *before* they run;
* **compiling**: ``*``, ``**``, ``+`` and ``%`` are intercepted, which also stops Jinja from folding them while it
  compiles (``7 ** 10 ** 8`` would otherwise hang the compiler); loops and ``~`` are rewritten into counted,
  size-checked filters before code generation.

A template that goes over a bound raises :class:`TemplateLimit`.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Iterable

from jinja2 import TemplateError, nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_TEXT = 10_000_000  # characters of a rendered prompt, and the weight of any value a template builds
MAX_STEPS = 1_000_000  # steps in one rendering
MAX_SECONDS = 5.0  # wall time of one rendering
MAX_WIDTH = 100_000  # a width or count that pads or repeats text (format widths, center, indent, zfill ...)
MAX_LIPSUM = 100  # paragraphs lipsum() may write
_INT_BITS = 4096


class TemplateLimit(TemplateError):
    """A template went over a bound on rendering (time, size or a width)."""


class _Budget(threading.local):
    steps = 0
    deadline = float("inf")


_BUDGET = _Budget()


def start_budget() -> None:
    """Reset this thread's budget: called at the start of each rendering."""
    _BUDGET.steps, _BUDGET.deadline = 0, time.monotonic() + MAX_SECONDS


def _step() -> None:
    _BUDGET.steps += 1
    if _BUDGET.steps > MAX_STEPS:
        raise TemplateLimit(f"more than {MAX_STEPS:,} steps (calls, filters, operators, loop iterations)")
    if time.monotonic() > _BUDGET.deadline:
        raise TemplateLimit(f"rendering took longer than {MAX_SECONDS:g} s")


def weight(value: Any) -> int:
    """Roughly how many characters ``value`` stands for: a string its length; a collection its items plus the
    characters of its string items (one level: deeper values were checked when they were built)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return len(value) + sum(len(x) for x in value if isinstance(x, (str, bytes)))
    if isinstance(value, dict):
        return len(value) + sum(len(x) for x in value.values() if isinstance(x, (str, bytes)))
    return 16


def _checked(value: Any) -> Any:
    if weight(value) > MAX_TEXT:
        raise TemplateLimit(f"a value of about {weight(value):,} characters (the limit is {MAX_TEXT:,})")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _INT_BITS:
        raise TemplateLimit(f"an integer of more than {_INT_BITS} bits")
    return value


def _over(estimate: int, what: str) -> None:
    if estimate > MAX_TEXT:
        raise TemplateLimit(f"{what} would build about {estimate:,} characters (the limit is {MAX_TEXT:,})")


def _width(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_WIDTH:
            raise TemplateLimit(f"{what}: a width or count of {value:,} (the limit is {MAX_WIDTH:,})")
        return abs(value)
    return 0


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_NUMBER = re.compile(r"\d+")


def _format_widths(fmt: str, what: str) -> int:
    """The largest width or precision written in a ``%`` or ``{}`` format string (refused over MAX_WIDTH)."""
    widest = 0
    for m in _PERCENT_SPEC.finditer(fmt):
        widest = max(widest, *(_width(int(g), what) for g in m.groups() if g and g.isdigit()), 0)
    for m in _BRACE_SPEC.finditer(fmt):
        widest = max(widest, *(_width(int(n), what) for n in _NUMBER.findall(m.group(1))), 0)
    return widest


def _format_estimate(fmt: str, args: Iterable[Any], what: str) -> None:
    args = list(args)
    fields = fmt.count("%") + fmt.count("{")
    biggest = max((weight(a) for a in args), default=0)
    for a in args:
        _width(a, what)  # '{:>{}}'.format(x, 10**9): a width given as an argument
    _over(len(fmt) + sum(weight(a) for a in args) + fields * (biggest + _format_widths(fmt, what)), what)


def _precheck(name: str, obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse a call whose result would be over :data:`MAX_TEXT` before it is built; returns ``args`` (``join``
    of a generator gets it as a list, so its size can be known)."""
    if name in ("center", "ljust", "rjust", "zfill", "indent", "wordwrap", "truncate") and args:
        width = _width(args[0], name)
        if name == "indent" and isinstance(obj, str):
            _over(len(obj) + width * (obj.count("\n") + 1), name)
    if name == "expandtabs" and isinstance(obj, str) and args:
        _over(len(obj) + obj.count("\t") * _width(args[0], name), name)
    if name == "replace" and isinstance(obj, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        _over(len(obj) + (obj.count(old) if old else len(obj) + 1) * len(new), name)
    if name in ("format", "format_map") and isinstance(obj, str):
        values = list(args) + list(kwargs.values())
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        _format_estimate(obj, values, name)
    if name == "join":
        if isinstance(obj, str):  # 'sep'.join(items)
            items = _materialised(args[0]) if args else []
            args = (items, *args[1:])
            _over(weight(items) + len(obj) * len(items), name)
    return args


def _materialised(items: Any) -> list:
    out = []
    for x in items:
        _step()
        out.append(x)
        if len(out) > MAX_TEXT:
            raise TemplateLimit(f"more than {MAX_TEXT:,} items")
    return out


def _bounded_filter(name: str, func):
    def run(*args, **kwargs):
        _step()
        lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/env/eval_ctx first
        if len(args) > lead:
            value = args[lead]
            _over(weight(value), name)  # a filter's work and output grow with its input
            if name == "join":  # value|join(sep): know the items before joining them
                value = _materialised(value)
                sep = args[lead + 1] if len(args) > lead + 1 else kwargs.get("d", "")
                _over(weight(value) + len(str(sep)) * len(value), "join")
                args = (*args[:lead], value, *args[lead + 1:])
            elif name == "format" and isinstance(value, str):
                _format_estimate(value, [*args[lead + 1:], *kwargs.values()], "format")
            else:
                _precheck(name, value, args[lead + 1:], kwargs)
        return _checked(func(*args, **kwargs))

    run.__dict__.update(getattr(func, "__dict__", {}))  # keeps jinja_pass_arg (pass_context etc.)
    run.__name__ = getattr(func, "__name__", name)
    return run


class _Rewrite(NodeTransformer):
    """Every loop's iterable and every ``~`` through counted, size-checked filters."""

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
    _over(sum(weight(p) for p in parts), "~")
    return _checked("".join(str(p) for p in parts))


def _check_binop(op: str, left: Any, right: Any) -> None:
    seq = (str, list, tuple)
    if op == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
        if abs(right) > 256 and abs(left) > 1:
            raise TemplateLimit(f"an exponent of {right} (the limit is 256)")
    if op == "*":
        if isinstance(left, seq) and isinstance(right, int) or isinstance(right, seq) and isinstance(left, int):
            sq, n = (left, right) if isinstance(left, seq) else (right, left)
            _over(weight(sq) * max(0, n), "*")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > _INT_BITS:
            raise TemplateLimit(f"an integer of more than {_INT_BITS} bits")
    if op == "+" and isinstance(left, seq) and isinstance(right, seq):
        _over(weight(left) + weight(right), "+")
    if op == "%" and isinstance(left, str):
        _format_estimate(left, right if isinstance(right, tuple) else [right], "%")


class BoundedSandbox(SandboxedEnvironment):
    """:class:`jinja2.sandbox.SandboxedEnvironment` with the bounds described in this module."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kw: Any):
        super().__init__(finalize=_checked, **kw)  # every {{ value }} is checked before it becomes text
        self.filters = {k: _bounded_filter(k, f) for k, f in self.filters.items()}
        self.filters["tb_iter"], self.filters["tb_concat"] = _iter, _concat

    def _parse(self, source, name, filename):  # jinja's hook between parsing and code generation
        return _Rewrite().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        _step()
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def getitem(self, obj, argument):
        _step()
        return super().getitem(obj, argument)

    def getattr(self, obj, attribute):
        _step()
        return super().getattr(obj, attribute)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's loop(items): count its iterations
            args = (_iter(args[0]), *args[1:])
        elif isinstance(owner, (str, list, tuple, dict)):
            _over(weight(owner), getattr(__obj, "__name__", "method"))
            args = _precheck(getattr(__obj, "__name__", "method"), owner, args, kwargs)
        elif __obj is __self.globals.get("lipsum"):
            n = args[0] if args else kwargs.get("n", 5)
            if isinstance(n, int) and n > MAX_LIPSUM:
                raise TemplateLimit(f"lipsum: {n} paragraphs (the limit is {MAX_LIPSUM})")
            for w in (*args[2:], *(kwargs.get(k) for k in ("min", "max"))):
                _width(w, "lipsum")
        return _checked(SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, name = value.__self__, value.__name__

        def bounded(*args: Any, **kwargs: Any) -> str:
            values = list(args[0].values()) if name == "format_map" and args and isinstance(args[0], dict) else \
                [*args, *kwargs.values()]
            _format_estimate(fmt, values, name)
            return _checked(wrapped(*args, **kwargs))

        return bounded


def render_bounded(template, variables: dict[str, Any]) -> str:
    """``template`` (compiled by a :class:`BoundedSandbox`) rendered within the bounds; the output is checked
    chunk by chunk, so a prompt over :data:`MAX_TEXT` stops as it grows."""
    start_budget()
    out, size = [], 0
    for chunk in template.generate(**variables):
        size += len(chunk)
        if size > MAX_TEXT:
            raise TemplateLimit(f"the prompt is over {MAX_TEXT:,} characters")
        out.append(chunk)
    return "".join(out)
