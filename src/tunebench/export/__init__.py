"""Exporting a stored trial: the adapter alone (PEFT), the weights merged into the base model, or ONNX (int8).

Formats and what each trial kind supports:

==================  ===========================  ==============================  ==========================
trial               ``hf``                       ``merged``                      ``onnx``
==================  ===========================  ==============================  ==========================
lora                PEFT adapter (+ head)        base + LoRA merged (+ head)     encoder classifiers
soft_prompt         PEFT adapter (+ head)        error: cannot merge, use hf     error
full, unfreeze      error: no adapter, use       tuned weights (+ head)          encoder classifiers
                    merged
linear_probe        head only (base by name)     base copy + head                encoder classifiers
prompting           prompt / class anchors       error: nothing merged, use hf   error
==================  ===========================  ==============================  ==========================

Causal-LM exports always carry ``prompt.json`` (template, demonstrations, chat formatting) because the
tuned model expects the prompt it was tuned with. Encoder classifiers carry ``classifier_head.safetensors``
and ``classifier.json`` (labels, pooling, max length). Every export has a ``README.md`` model card and a
machine-readable ``tunebench_export.json``. Exports are written to a staging directory and renamed into place
at the end, so a failure leaves nothing half-written; a non-empty output directory is never overwritten
(``force`` replaces an earlier tunebench export only).

The trial's predictor says which formats it can be written in and hands over the parts
(:meth:`tunebench.strategies.Predictor.export_parts`); its strategy says what a trial changed
(:meth:`tunebench.strategies.Strategy.weights_kind`). Modules: ``common`` (formats, checks), ``writers`` (hf and
merged files, staging), ``onnx`` (graph, int8, :class:`OnnxClassifier`), ``card`` (manifest, model card).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..analysis.selection import find_trial, load_trial
from ..config import StudyConfig
from ..store import Store
from .card import json_default, manifest, model_card, usage
from .common import (ANCHORS_FILE, CARD, CLASSIFIER_FILE, EMBEDDING_FILE, FORMATS, HEAD_FILE, MANIFEST, ONNX_FP32,
                     ONNX_INT8, ONNX_OPSET, PROMPT_FILE, ExportError, check_format, check_out_dir, default_out_dir,
                     merged_encoder, weights_kind)
from .onnx import OnnxClassifier, quantize_int8, write_onnx
from .writers import WRITERS, files, staging_dir, swap_into_place

__all__ = ["ANCHORS_FILE", "CARD", "CLASSIFIER_FILE", "EMBEDDING_FILE", "FORMATS", "HEAD_FILE", "MANIFEST", "ONNX_FP32",
           "ONNX_INT8", "ONNX_OPSET", "PROMPT_FILE", "ExportError", "ExportPlan", "ExportResult", "OnnxClassifier",
           "check_format", "check_out_dir", "default_out_dir", "export_trial", "merged_encoder", "model_card",
           "onnx_export_for", "prepare_export", "quantize_int8", "run_export", "weights_kind", "write_onnx"]

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote: the directory, its format and files, and the manifest."""

    path: Path
    fmt: str
    files: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def export_trial(loaded, out_dir: str | Path, fmt: str, *, force: bool = False, per_channel: bool = True,
                 status: Callable[[str], None] | None = None) -> ExportResult:
    """Export a loaded trial (:func:`tunebench.analysis.selection.load_trial`) to ``out_dir`` in format ``fmt``.

    ``per_channel`` quantizes ONNX weights per output channel (else per tensor: on SST-2 per channel kept the
    int8 model's accuracy within 0.1 point of fp32, per tensor lost 0.3). ``status`` receives a
    short description of each long step (for a spinner). Returns what was written.
    """
    out_dir = Path(out_dir)
    say = status or (lambda _msg: None)
    check_format(loaded.row["strategy"], loaded.row.get("params"), loaded.model_config.backend, fmt,
                 f"trial {loaded.key[:8]}")
    check_out_dir(out_dir, force)
    staging = staging_dir(out_dir)
    try:
        info = WRITERS[fmt](loaded, staging, say, per_channel=per_channel)
        say("writing the model card")
        facts = manifest(loaded, fmt, info)
        (staging / CARD).write_text(model_card(facts, usage(facts, out_dir.resolve())), encoding="utf-8")
        facts["files"] = files(staging)
        (staging / MANIFEST).write_text(json.dumps(facts, indent=2, default=json_default) + "\n", encoding="utf-8")
        swap_into_place(staging, out_dir, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported trial %s as %s to %s", loaded.key[:8], fmt, out_dir)
    return ExportResult(out_dir, fmt, files(out_dir), facts)


def export_of(path: str | Path) -> dict | None:
    """The manifest of the tunebench export at ``path`` (None when there is none, or it cannot be read)."""
    try:
        doc = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def onnx_export_for(loaded, out_dir: str | Path | None = None, *,
                    status: Callable[[str], None] | None = None) -> Path:
    """The ONNX export of a loaded trial: the one at ``out_dir`` (default ``exports/STUDY-ID-onnx``, where
    ``tunebench export --format onnx`` writes it) when it is this trial's, else written there now.

    A directory holding anything else (another trial's export, other files) is never touched: the error says
    which trial it holds and how to choose another directory.
    """
    check_format(loaded.row["strategy"], loaded.row.get("params"), loaded.model_config.backend, "onnx",
                 f"trial {loaded.key[:8]}")
    target = Path(out_dir) if out_dir is not None else default_out_dir(loaded.study, loaded.key, "onnx")
    doc = export_of(target)
    if doc is not None and doc.get("format") == "onnx" and doc.get("trial") == loaded.key \
            and all((target / name).is_file() for name in (ONNX_INT8, CLASSIFIER_FILE)):
        log.info("using the ONNX export of trial %s at %s", loaded.key[:8], target)
        return target
    if doc is not None:
        held = f"trial {str(doc.get('trial', '?'))[:8]} in format {doc.get('format', '?')}"
        if doc.get("trial") == loaded.key and doc.get("format") == "onnx":
            held = "this trial's ONNX export with files missing"
        raise ExportError(f"{target} holds {held}; give another directory for this trial's ONNX export "
                          f"(or export it there again: tunebench export {loaded.study} --trial {loaded.key[:8]} "
                          f"--format onnx --out {target} --force)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} holds files that are not a tunebench export; choose another directory for this "
                          "trial's ONNX export")
    log.info("exporting trial %s to ONNX at %s", loaded.key[:8], target)
    export_trial(loaded, target, "onnx", status=status)
    return target


# ---- the `tunebench export` command: checks first, then the (slow) load and export -------------------------
@dataclass
class ExportPlan:
    """A checked export request: the stored trial row, the output directory, the format."""

    study: str
    store_root: str | Path
    row: dict
    fmt: str
    target: Path
    force: bool = False


def prepare_export(store_root: str | Path, study: str, *, trial: str | None, best: bool, fmt: str,
                   out_dir: Path | None, force: bool) -> ExportPlan:
    """Check an export request before any model is loaded: the format, which trial (``trial``: an id prefix, or
    ``best``), that the trial can be exported in ``fmt``, and that ``out_dir`` (default
    ``exports/STUDY-ID-FORMAT``) may be written. Raises a ``TunebenchError`` saying what to change."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if (trial is None) == (not best):
        raise ExportError("say which trial: --trial ID or --best (one of them)")
    st = Store(store_root, create=False)
    row = find_trial(st, study, trial, best=best)
    try:  # check the format before the (slow) model load; load_trial reports a config that no longer fits
        models = {m.name: m for m in StudyConfig.from_stored(st.study_config(study)["config"]).all_models()}
        model = models.get(row["record"].get("model")) or next(iter(models.values()))
    except Exception:
        model = None
    if model is not None:
        check_format(row["strategy"], row.get("params"), model.backend, fmt, f"trial {row['key'][:8]}")
    target = out_dir or default_out_dir(study, row["key"], fmt)
    check_out_dir(target, force)
    return ExportPlan(study, store_root, row, fmt, Path(target), force)


def run_export(plan: ExportPlan, *, per_channel: bool = True,
               status: Callable[[str], None] = lambda m: None) -> ExportResult:
    """Load the planned trial on its model and export it (``status``: a description of each long step)."""
    status(f"loading trial {plan.row['key'][:8]} ({plan.row['label']})")
    loaded = load_trial(plan.store_root, plan.study, plan.row["key"])
    return export_trial(loaded, plan.target, plan.fmt, force=plan.force, per_channel=per_channel, status=status)
