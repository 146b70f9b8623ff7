"""Reading a study file: YAML in, validated pydantic models out, errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .study import StudyConfig


def _yaml_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at pydantic location ``loc``, as deep as it can be followed."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def read_study(path: str | Path) -> tuple[StudyConfig, Path, yaml.Node | None]:
    """Read and validate a study YAML as config; returns the config, the directory its paths are relative to and
    the YAML tree (for line numbers). Strategy parameters are checked against the registry by
    :func:`tunebench.runner.load_study`, which most callers want."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study is a YAML mapping with name, task, model and strategies")
    _read_template_files(raw, path, root)
    cfg = parse_study(raw, source=str(path), root=root)
    return cfg, path.resolve().parent, root


def error_at(path: str | Path, root: yaml.Node | None, exc: ConfigError) -> ConfigError:
    """``exc`` (about ``strategies[i]...``) with the study file and the entry's YAML line in front."""
    msg = str(exc)
    idx = msg.split("]")[0].split("[")[-1] if msg.startswith("strategies[") else None
    line = _yaml_line(root, ("strategies", int(idx))) if idx and idx.isdigit() else None
    return ConfigError(f"{path}{f' line {line}' if line else ''}: {msg}")


def _read_template_files(raw: dict, path: Path, root: yaml.Node | None) -> None:
    """Replace each ``template_file: path`` (or a list of paths) by ``template:`` with the files' text.

    Paths are relative to the study file. The template text, not the file name, keys the trials.
    """
    def load(params: dict, loc: tuple) -> None:
        if not isinstance(params, dict) or "template_file" not in params:
            for key in ("tune_params", "prompt_params"):  # hybrids nest a strategy's parameters
                if isinstance(params, dict) and isinstance(params.get(key), dict):
                    load(params[key], loc + (key,))
            return
        line = _yaml_line(root, loc + ("template_file",)) if root is not None else None
        where = f"{path}{f' line {line}' if line else ''}"
        if "template" in params:
            raise ConfigError(f"{where}: give either template or template_file, not both")
        files = params.pop("template_file")
        texts = []
        for f in files if isinstance(files, list) else [files]:
            file = Path(f) if Path(str(f)).is_absolute() else path.parent / str(f)
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}: template_file {file}: cannot read it ({exc.__class__.__name__}: "
                                  f"{exc}); the path is relative to the study file") from None
        params["template"] = texts if isinstance(files, list) else texts[0]

    if isinstance(raw.get("training"), dict):
        load(raw["training"], ("training",))
    for i, item in enumerate(raw.get("strategies") or []):
        if isinstance(item, dict) and len(item) == 1 and "name" not in item:
            (name, params), = item.items()
            load(params, ("strategies", i, name))
        elif isinstance(item, dict):
            load(item.get("params"), ("strategies", i, "params"))


def parse_study(raw: dict, *, source: str = "<study>", root: yaml.Node | None = None) -> StudyConfig:
    """Validate a study given as a dict (the Python API's entry point)."""
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _without_tags(tuple(err["loc"]))
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = _yaml_line(root, loc) if root is not None else None
            where = f"{source} line {line}" if line else source
            lines.append(f"{where}: {field}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _without_tags(loc: tuple) -> tuple:
    """A pydantic error location without the union tag of a model block (``model.causal.path`` → ``model.path``)."""
    out: list = []
    for i, part in enumerate(loc):
        after_model = i > 0 and (loc[i - 1] == "model" or (i > 1 and loc[i - 2] == "models"))
        if after_model and part in ("encoder", "causal", "openai"):
            continue
        out.append(part)
    return tuple(out)
