"""Writing an export's files: the adapter or the merged weights, the classifier head, the prompt, the class
anchors (the ONNX writer is in :mod:`tunebench.export.onnx`); a staging directory renamed into place at the end.

Each writer takes the parts the trial's predictor hands over (:meth:`Predictor.export_parts`) and returns the
facts the manifest records.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CapabilityError
from ..strategies.base import ExportParts
from .common import (ANCHORS_FILE, CLASSIFIER_FILE, EMBEDDING_FILE, HEAD_FILE, PROMPT_FILE, check_out_dir,
                     merged_encoder, quiet)
from .onnx import write_onnx


def unexpected(loaded, fmt: str) -> CapabilityError:
    return CapabilityError(f"trial {loaded.key[:8]} ({loaded.row['strategy']}): its predictor "
                           f"({type(loaded.predictor).__name__}) cannot be exported as {fmt}")


def _parts(loaded, fmt: str) -> ExportParts:
    """The parts of the trial's predictor, where it declares that it can be exported as ``fmt``."""
    if fmt not in loaded.predictor.export_formats():
        raise unexpected(loaded, fmt)
    return loaded.predictor.export_parts()


def _write_hf(loaded, d: Path, say, **_) -> dict:
    parts = _parts(loaded, "hf")
    if parts.kind == "embedding":
        save_file(parts.tensors, str(d / ANCHORS_FILE))
        (d / EMBEDDING_FILE).write_text(json.dumps(parts.embedding, indent=2), encoding="utf-8")
        _save_tokenizer(parts, d)
        return {"contents": "anchors", "adapter": None, "embedding": parts.embedding}
    if parts.adapter is not None:
        say("saving the adapter")
        with quiet():
            parts.model.save_pretrained(str(d))
    if parts.kind == "classifier":
        info = _write_classifier_files(parts, d)
        info.update(contents="adapter" if parts.adapter else "head", adapter=parts.adapter)
        return info
    _save_tokenizer(parts, d)
    return {"contents": "adapter" if parts.adapter else "prompt", "adapter": parts.adapter,
            "prompt": _write_prompt(loaded, parts, d)}


def _write_merged(loaded, d: Path, say, **_) -> dict:
    parts = _parts(loaded, "merged")
    say("merging and saving the weights")
    model = merged_encoder(parts.model)
    with quiet():
        model.save_pretrained(str(d))
    if parts.kind == "classifier":
        info = _write_classifier_files(parts, d)
        info.update(contents="merged", adapter=parts.adapter)
        return info
    _save_tokenizer(parts, d)
    return {"contents": "merged", "adapter": parts.adapter, "prompt": _write_prompt(loaded, parts, d)}


def _write_onnx(loaded, d: Path, say, *, per_channel: bool = True) -> dict:
    parts = _parts(loaded, "onnx")
    info = write_onnx(loaded.predictor, d, per_channel=per_channel, say=say)
    info.update(contents="onnx", adapter=parts.adapter)
    return info


WRITERS = {"hf": _write_hf, "merged": _write_merged, "onnx": _write_onnx}


def _save_tokenizer(parts: ExportParts, d: Path) -> None:
    if parts.tokenizer is not None:
        parts.tokenizer.save_pretrained(str(d))


def _write_classifier_files(parts: ExportParts, d: Path) -> dict:
    """Head weights, labels and pooling of a classifier (and the tokenizer)."""
    head = parts.head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(d / HEAD_FILE))
    cls = {"labels": list(parts.labels), "pooling": parts.pooling, "max_length": parts.max_length,
           "hidden_size": head.in_features, "head": HEAD_FILE}
    (d / CLASSIFIER_FILE).write_text(json.dumps(cls, indent=2), encoding="utf-8")
    _save_tokenizer(parts, d)
    return {"classifier": cls}


def _write_prompt(loaded, parts: ExportParts, d: Path) -> dict:
    """``prompt.json``: what the causal model reads: template and its variables (and the task's input fields),
    chat formatting, decoding."""
    first = ("template", "task_type", "mode", "variables")
    p = parts.prompt
    prompt = {**{k: p[k] for k in first},
              "input_fields": list(loaded.task.get("text") or []), "text_template": loaded.task.get("text_template"),
              **{k: v for k, v in p.items() if k not in first}}
    (d / PROMPT_FILE).write_text(json.dumps(prompt, indent=2, ensure_ascii=False), encoding="utf-8")
    demos = "retrieved" if prompt["retrieval"] is not None else len(prompt["variables"]["demonstrations"])
    return {k: prompt[k] for k in ("mode", "chat_template", "max_length")} | {"demonstrations": demos}


# ---- staging and the swap into place --------------------------------------------------------------------
def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden directory beside ``out_dir`` to write the export into."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def swap_into_place(staging: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished staging directory to ``out_dir``; with ``force`` the earlier export goes last."""
    check_out_dir(out_dir, force)  # again: something may have appeared there while we worked
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        else:
            out_dir.rmdir()
    try:
        staging.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def files(directory: Path) -> list[dict]:
    """Every file under ``directory``: its relative path and size."""
    return [{"path": str(p.relative_to(directory)), "bytes": p.stat().st_size}
            for p in sorted(directory.rglob("*")) if p.is_file()]
