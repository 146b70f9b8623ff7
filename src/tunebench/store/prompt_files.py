"""Prompt registry versions as files, for review in version control.

:func:`export_prompts` writes ``NAME@V.jinja`` (the exact template text) and ``NAME@V.yaml`` (name, version,
hash, kind, source) beside it; :func:`import_prompts` registers the text of such files (the sidecar, when there,
gives the name and kind), so an edited file becomes a new version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import yaml

from ..errors import TunebenchError
from ..prompts import PromptTemplate
from .prompts import PromptRegistry, PromptVersion, backfill, content_hash
from .results import Store


def open_registry(root: Path, *, create: bool = False) -> PromptRegistry:
    """The registry of the store at ``root``, with trials stored before the registry existed linked to their
    templates."""
    st = Store(root, create=create)
    backfill(st)
    return PromptRegistry(st)


@dataclass
class PromptFile:
    """One file :func:`export_prompts` wrote (or found already holding the same bytes)."""

    version: PromptVersion
    path: Path
    unchanged: bool

    @property
    def is_template(self) -> bool:
        """The ``.jinja`` file (the other one is its ``.yaml`` sidecar)."""
        return self.path.suffix == ".jinja"


def _contents(pv: PromptVersion, out_dir: Path) -> list[tuple[Path, bytes]]:
    base = out_dir / f"{pv.ref}.jinja"
    meta = {"name": pv.name, "version": pv.version, "hash": pv.hash, "kind": pv.kind, "source": pv.source}
    return [(base, pv.template.encode("utf-8")),
            (base.with_suffix(".yaml"), yaml.safe_dump(meta, sort_keys=False).encode("utf-8"))]


def export_prompts(versions: Iterable[PromptVersion], out_dir: Path, *, force: bool = False,
                   written: Callable[[PromptFile], None] | None = None) -> list[PromptFile]:
    """Write each version's ``.jinja`` and ``.yaml`` under ``out_dir`` (a name with / becomes folders).

    Every file is checked before any is written: one that exists with different content stops the export unless
    ``force``. ``written`` is called after each file. Raises :class:`TunebenchError` when a file cannot be read
    or written.
    """
    try:
        files = []
        for pv in versions:
            for path, data in _contents(pv, out_dir):
                if path.exists() and path.read_bytes() != data and not force:
                    raise TunebenchError(f"{path} exists with different content; --force replaces it")
                files.append((pv, path, data))
        done = []
        for pv, path, data in files:
            unchanged = path.exists() and path.read_bytes() == data
            if not unchanged:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            done.append(PromptFile(pv, path, unchanged))
            if written is not None:
                written(done[-1])
        return done
    except OSError as exc:
        raise TunebenchError(f"cannot write the export: {exc}") from None


def _read_sidecar(file: Path) -> dict:
    sidecar = file.with_suffix(".yaml")
    if sidecar == file or not sidecar.is_file():
        return {}
    try:
        meta = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TunebenchError(f"{sidecar}: not a readable sidecar ({exc}); fix or delete it") from None
    if not isinstance(meta, dict):
        raise TunebenchError(f"{sidecar}: a sidecar is a mapping of name, version, hash, kind, source")
    return meta


def import_prompts(reg: PromptRegistry, files: Iterable[Path], *, name: str | None = None,
                   kind: str | None = None) -> list[dict]:
    """Register the text of each template file: new text becomes a new version, text already there gives its
    version. The name is ``name``, else the sidecar ``NAME@V.yaml``'s, else the file name before ``@`` (or its
    stem); the kind likewise, else ``prompt`` (a prompt's Jinja syntax is checked first).

    Returns, per file, the version's ``to_dict()`` with ``file``, ``new`` (a version was added) and ``edited``
    (the text differs from the hash its sidecar recorded at export).
    """
    results = []
    for file in files:
        try:
            text = file.read_bytes().decode("utf-8")
        except OSError as exc:
            raise TunebenchError(f"{file}: cannot read it ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise TunebenchError(f"{file}: not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
        meta = _read_sidecar(file)
        target = name or meta.get("name") or (file.name.split("@")[0] if "@" in file.name else file.stem)
        the_kind = kind or meta.get("kind") or "prompt"
        if the_kind in ("prompt", "rubric"):
            PromptTemplate(text, str(file))  # a syntax error names the file and line
        before = {v.hash for v in reg.versions(str(target))}
        pv = reg.register(str(target), text, the_kind, f"file {file.name}")
        edited = bool(meta.get("hash")) and meta["hash"] != content_hash(text)
        results.append({**pv.to_dict(), "file": str(file), "new": pv.hash not in before, "edited": edited})
    return results
