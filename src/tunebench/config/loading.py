"""Reading a study file: YAML in, validated pydantic models out, errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .files import STUDY_MAX_BYTES, TEMPLATE_MAX_BYTES, check_path, clip, read_text_limited
from .pairs import read_pairs_file
from .study import StudyConfig

MAX_DEPTH = 64  # nesting of a study file (a real one is under 10 deep)
MAX_NODES = 100_000  # values in a study file once its aliases are expanded
MAX_ERRORS = 12  # validation errors listed (the rest are counted)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth, the size of the document once aliases are expanded (no
    "billion laughs"), and constructor failures (``!!float abc``) reported as YAML errors with their line."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":int", ":float")) and len(node.value) > 100:
            raise yaml.constructor.ConstructorError(None, None, f"a number of {len(node.value):,} characters; "
                                                    "numbers in a study are at most 100 characters", node.start_mark)
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001 - a constructor's own failure (ValueError, AttributeError ...)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {clip(node.value, 60)} ({node.tag}): {clip(str(exc), 120)}",
                node.start_mark) from None


def _expanded(node: yaml.Node, memo: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """How many values ``node`` stands for, and how deep it nests, once every alias is expanded (linear time:
    shared nodes are memoised). Over :data:`MAX_NODES` values or :data:`MAX_DEPTH` levels is an error."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it (a cycle)",
                                          node.start_mark)
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = [_expanded(n, memo, open_) for n in node.value]
    elif isinstance(node, yaml.MappingNode):
        children = [_expanded(n, memo, open_) for kv in node.value for n in kv]
    else:
        children = []
    open_.discard(key)
    size, depth = 1 + sum(c[0] for c in children), 1 + max((c[1] for c in children), default=0)
    memo[key] = (size, depth)
    if size > MAX_NODES:
        raise yaml.composer.ComposerError(None, None, f"the document expands to over {MAX_NODES:,} values through "
                                          "its aliases (*name); write the values out or use fewer aliases",
                                          node.start_mark)
    if depth > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep once its aliases "
                                          "(*name) are expanded", node.start_mark)
    return size, depth


def load_yaml(text: str) -> tuple[object, yaml.Node | None]:
    """The YAML document in ``text`` and its node tree (for line numbers), read with :class:`_BoundedLoader`.

    Raises ``yaml.YAMLError`` (with a mark where there is one) for anything it refuses."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded(node, {}, set())
        data = loader.construct_document(node)  # flattens merge keys (<<: *x) in place: not for line numbers
    finally:
        loader.dispose()
    lines = _BoundedLoader(text)
    try:
        return data, lines.get_single_node()
    finally:
        lines.dispose()


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
    path = check_path(path, "study file")
    text = read_text_limited(path, "study file", STUDY_MAX_BYTES)
    try:
        raw, root = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {clip(str(getattr(exc, 'problem', None) or exc), 300)}") from None
    except RecursionError:  # the bounds above should make this unreachable; never a traceback
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study is a YAML mapping with name, task, model and strategies")
    _read_template_files(raw, path, root)
    cfg = parse_study(raw, source=str(path), root=root, base_dir=path.parent)
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
        if isinstance(files, list) and not files:
            raise ConfigError(f"{where}: template_file: give a file or a non-empty list of files")
        texts = []
        for f in files if isinstance(files, list) else [files]:
            name = check_path(f, f"{where}: template_file")
            file = name if name.is_absolute() else path.parent / name
            texts.append(read_text_limited(file, f"{where}: template_file (relative to the study file)",
                                           TEMPLATE_MAX_BYTES))
        params["template"] = texts if isinstance(files, list) else texts[0]

    if isinstance(raw.get("training"), dict):
        load(raw["training"], ("training",))
    metrics = raw.get("metrics")
    for i, item in enumerate(metrics if isinstance(metrics, list) else []):
        if isinstance(item, dict) and isinstance(item.get("judge"), dict):  # a judge's rubric in a file
            load(item["judge"], ("metrics", i, "judge"))
    strategies = raw.get("strategies")
    for i, item in enumerate(strategies if isinstance(strategies, list) else []):
        if isinstance(item, dict) and len(item) == 1 and "name" not in item:
            (name, params), = item.items()
            load(params, ("strategies", i, name))
        elif isinstance(item, dict):
            load(item.get("params"), ("strategies", i, "params"))


def _read_pairs_file(raw: dict, base: Path, source: str, root: yaml.Node | None) -> dict:
    """``raw`` with ``consistency.counterfactual.pairs_file`` read into ``pairs`` (a relative path is relative to
    ``base``, the study file's folder); unchanged where there is no file to read or ``pairs`` is already there (a
    stored config carries both). ``raw`` itself is not modified."""
    consistency = raw.get("consistency")
    cf = consistency.get("counterfactual") if isinstance(consistency, dict) else None
    if not isinstance(cf, dict) or cf.get("pairs_file") is None or "pairs" in cf:
        return raw
    loc = ("consistency", "counterfactual", "pairs_file")
    line = _yaml_line(root, loc) if root is not None else None
    where = f"{source}{f' line {line}' if line else ''}: {'.'.join(loc)}"
    name = check_path(cf["pairs_file"], where)
    pairs = read_pairs_file(name if name.is_absolute() else base / name, f"{where} (relative to the study file)")
    return {**raw, "consistency": {**consistency, "counterfactual": {**cf, "pairs": pairs}}}


def parse_study(raw: dict, *, source: str = "<study>", root: yaml.Node | None = None,
                base_dir: str | Path = ".") -> StudyConfig:
    """Validate a study given as a dict (the Python API's entry point); files the study names
    (``consistency.counterfactual.pairs_file``) are read relative to ``base_dir``."""
    raw = _read_pairs_file(raw, Path(base_dir), source, root)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        errors = exc.errors()
        for err in errors[:MAX_ERRORS]:
            loc = _without_tags(tuple(err["loc"]))
            field = clip(".".join(str(p) for p in loc), 120) or "(top level)"
            line = _yaml_line(root, loc) if root is not None else None
            where = f"{source} line {line}" if line else source
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {field}: {clip(msg, 400)}")
        if len(errors) > MAX_ERRORS:
            lines.append(f"{source}: … and {len(errors) - MAX_ERRORS} more error(s)")
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
