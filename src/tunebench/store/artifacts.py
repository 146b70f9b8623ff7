"""Loading a stored trial back as a working predictor (what ``serve`` and ``export`` start from)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import load_backend
from ..config import ModelConfig, StudyConfig
from ..errors import StoreError
from ..strategies import load_predictor
from ..strategies.cascade import TEACHER_DIR
from .results import Store

log = logging.getLogger(__name__)


@dataclass
class LoadedTrial:
    """A stored trial with its model loaded: the backend, the predictor rebuilt from its artifact, its facts."""

    study: str
    row: dict
    model_config: ModelConfig
    backend: Any
    predictor: Any
    task_type: str
    task: dict
    artifact: Path

    @property
    def key(self) -> str:
        return self.row["key"]

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels)

    @property
    def name(self) -> str:
        """The id clients use (``model`` in OpenAI requests): the study and the trial's short key."""
        return f"{self.study}:{self.key[:8]}"


def open_trial(store: Store, study: str, row: dict, backend=None) -> LoadedTrial:
    """Load the stored trial ``row`` of ``study``: its model (``backend`` may be passed when already loaded) and
    its predictor rebuilt from the artifact. Choosing the row is the read side's job
    (:func:`tunebench.analysis.selection.find_trial`)."""
    doc = store.study_config(study)["config"]
    try:
        cfg = StudyConfig.from_stored(doc)
    except Exception as exc:  # a store written by another version
        raise StoreError(f"study '{study}': its stored config no longer validates: {exc}") from None
    models = {m.name: m for m in cfg.all_models()}
    model_name = row["record"].get("model") or next(iter(models))
    if model_name not in models:
        raise StoreError(f"trial {row['key'][:8]}: its model '{model_name}' is not in the study's config any more")
    artifact = store.artifact_path(row)
    mc = models[model_name]
    if backend is None:
        backend = load_backend(mc)
    peers = {}
    cascade = row["record"].get("cascade")
    if cascade and (artifact / TEACHER_DIR).is_dir():  # the teacher serves on its own model, loaded here
        teacher = (cascade.get("teacher") or {}).get("model") or model_name
        if teacher not in models:
            raise StoreError(f"trial {row['key'][:8]}: its cascade's teacher model '{teacher}' is not in the study's "
                             "config any more")
        peers[teacher] = backend if teacher == model_name else load_backend(models[teacher])
    elif cascade:  # written before cascades saved their teacher: the student alone
        log.warning("trial %s is a cascade whose artifact holds only the student (written by an older version), "
                    "which loads and serves alone without the teacher behind it; run the trial again to serve the "
                    "cascade", row["key"][:8])
    predictor = load_predictor(artifact, backend, peers)
    log.info("loaded trial %s (%s) from %s", row["key"][:8], row["label"], artifact)
    return LoadedTrial(study, row, mc, backend, predictor, cfg.task.type, cfg.task.model_dump(), artifact)
