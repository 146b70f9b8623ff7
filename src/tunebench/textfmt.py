"""Safe ``{field}`` templates: only plain names are substituted, never attributes or indexing."""

from __future__ import annotations

import re
from collections.abc import Mapping

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> list[str]:
    """Names used in ``template``, in order of first appearance.

    Example:
        >>> placeholders("{title}: {body}")
        ['title', 'body']
    """
    seen: list[str] = []
    for name in _PLACEHOLDER.findall(template):
        if name not in seen:
            seen.append(name)
    return seen


def render(template: str, values: Mapping[str, object]) -> str:
    """Replace each ``{name}`` by ``values[name]``; unknown names raise ``KeyError``.

    Example:
        >>> render("This review is {label}.", {"label": "positive"})
        'This review is positive.'
    """
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)
