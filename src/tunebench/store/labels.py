"""Teacher labels kept beside the artifacts, so trials that share a teacher buy each label once.

A distill teacher is identified by the key its own trial would have (same strategy, params, model, seed, train
size, data): the same key adapts the same predictor, so its answer for an input is the same in every trial. Each
trial that labels writes one file, ``<artifact root>/.teacher-labels/<teacher key>/<trial key>.json``, holding per
input text its label, class scores, tokens, cost and seconds; a later trial with that teacher (another pool size
of a distillation curve, a cascade beside its distill) reads every file there. One file per writer: trials on
different workers never write the same file, and a trial that fails after labelling still leaves what it paid for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .locations import ArtifactRoot

log = logging.getLogger(__name__)

FOLDER = ".teacher-labels"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class LabelCache:
    """The labels the teacher ``teacher_key`` has given, for trial ``owner`` to read and add to."""

    def __init__(self, root: ArtifactRoot, teacher_key: str, owner: str):
        self.root, self.teacher_key, self.owner = root, teacher_key, owner
        self.folder = root.join(f"{FOLDER}/{teacher_key}")

    def _files(self) -> list[str]:
        if self.root.is_local:
            folder = Path(self.folder)
            return sorted(str(p) for p in folder.glob("*.json")) if folder.is_dir() else []
        try:
            self.root.fs.invalidate_cache(self.folder)  # other workers' files appear while this one runs
            return sorted(p for p in self.root.fs.ls(self.folder, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []

    def _read(self, path: str) -> dict[str, Any]:
        try:
            if self.root.is_local:
                text = Path(path).read_text(encoding="utf-8")
            else:
                with self.root.fs.open(path, "r", encoding="utf-8") as f:
                    text = f.read()
            return json.loads(text)["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a torn or foreign file: ignored, relabelled
            log.warning("teacher labels: %s unreadable (%s); its inputs are labelled again", path, exc)
            return {}

    def lookup(self, texts: list[str]) -> list[dict[str, Any] | None]:
        """Per text, what the teacher answered for it in an earlier trial (None where it was never asked)."""
        known: dict[str, Any] = {}
        for path in self._files():
            known.update(self._read(path))
        return [known.get(_digest(t)) for t in texts]

    def add(self, texts: list[str], entries: list[dict[str, Any]]) -> None:
        """Keep the teacher's answers for ``texts`` in this trial's file, beside what an earlier attempt of the
        same trial kept there (the file is rewritten whole, atomically on a directory root)."""
        if not texts:
            return
        path = f"{self.folder}/{self.owner}.json" if not self.root.is_local else str(Path(self.folder) /
                                                                                      f"{self.owner}.json")
        items = self._read(path) if self.root.exists(path) else {}
        items.update({_digest(t): e for t, e in zip(texts, entries)})
        body = json.dumps({"teacher_key": self.teacher_key, "trial": self.owner, "items": items})
        try:
            if self.root.is_local:
                Path(self.folder).mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(body)
                os.replace(tmp, path)
            else:
                self.root.fs.pipe(path, body.encode("utf-8"))
        except OSError as exc:  # the labels are already in the trial; only their reuse is lost
            log.warning("teacher labels: could not keep them at %s (%s); later trials label again", path, exc)
