"""Config keys renamed in the past: old study files keep working, with a warning that names the new key.

A strategy entry's parameters are rewritten when the study is parsed (so the rest of tunebench, and the trial
keys, see only today's names: results stored from an old file and from its rewritten form are the same trials).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from ..errors import ConfigError
from .files import clip

log = logging.getLogger(__name__)

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


# strategy -> old key -> (new key, how an old value reads as a new one)
RENAMED_PARAMS: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "zero_shot": {"templates": ("label_templates", single_braces_to_jinja)},
}


def renamed_params(strategy: str, params: Any, where: str | None = None) -> Any:
    """``params`` of ``strategy`` with old keys under their new names. With ``where`` (the entry, e.g.
    ``strategies[0].zero_shot``) each rename is logged as a deprecation warning; without, it is silent (the Python
    API's ``config_from_dict``). A hybrid's ``prompt_params`` are renamed for its prompting strategy."""
    if not isinstance(params, dict):
        return params
    out = dict(params)
    for old, (new, convert) in RENAMED_PARAMS.get(strategy, {}).items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where or strategy}: give {new} only: {old} is its old name")
        out[new] = convert(out.pop(old))
        if where is not None:
            log.warning("%s: '%s' is deprecated; write '%s' instead (read as %s: %s)", where, old, new, new,
                        clip(out[new], 200))
    if strategy == "hybrid" and isinstance(out.get("prompt_params"), dict):
        prompt = out.get("prompt", "few_shot")
        out["prompt_params"] = renamed_params(prompt if isinstance(prompt, str) else "", out["prompt_params"],
                                              f"{where}.prompt_params" if where else None)
    return out
