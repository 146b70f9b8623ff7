"""What every export module shares: formats and file names, the error type, what a trial can be exported as,
the output-directory rule, merging an adapter into a copy, and silencing library chatter."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

from torch import nn

from ..errors import CapabilityError, TunebenchError
from ..strategies import registry
from ..strategies.base import adapter_kind

FORMATS = ("hf", "merged", "onnx")
MANIFEST = "tunebench_export.json"
CARD = "README.md"
HEAD_FILE = "classifier_head.safetensors"
CLASSIFIER_FILE = "classifier.json"
PROMPT_FILE = "prompt.json"
ANCHORS_FILE = "anchors.safetensors"
EMBEDDING_FILE = "embedding.json"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model_int8.onnx"
ONNX_OPSET = 17


class ExportError(TunebenchError):
    """An export cannot be written as asked (output directory in the way, a graph that does not match)."""


def weights_kind(strategy: str, params: dict | None = None) -> str:
    """``lora``, ``soft_prompt``, ``full``, ``head`` or ``prompt``: what a trial of ``strategy`` changed, as the
    strategy declares it (an unknown strategy: ``full``)."""
    try:
        cls = registry.get(strategy)
    except KeyError:
        return "full"
    return cls.weights_kind(params or {})


def check_format(strategy: str, params: dict | None, backend: str, fmt: str, trial: str = "this trial") -> None:
    """Raise ``CapabilityError`` (saying which format to use instead) when ``fmt`` cannot export the trial."""
    if fmt not in FORMATS:
        raise CapabilityError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    kind = weights_kind(strategy, params)
    what = f"{trial} ({strategy})"
    if strategy == "cascade":
        raise CapabilityError(f"{what} is two models and a threshold (a student with its teacher behind it), which no "
                              "export format holds; serve it with `tunebench serve STUDY --trial ID`, or run the "
                              "student's strategy as a trial of its own (or a distill trial) to export a student")
    if fmt == "hf" and kind == "full":
        raise CapabilityError(f"{what} changed the model's own weights, so there is no adapter to export alone; "
                              "use --format merged (the tuned weights, loadable by plain transformers)")
    if fmt == "merged" and kind == "soft_prompt":
        raise CapabilityError(f"{what} learned virtual tokens, which cannot be merged into the model's weights; "
                              "use --format hf (the PEFT adapter, loaded with PeftModel.from_pretrained)")
    if fmt == "merged" and kind == "prompt":
        raise CapabilityError(f"{what} changed no weights, so there is nothing to merge; use --format hf to "
                              "export its prompt (or class anchors) for the unchanged base model")
    if fmt == "onnx":
        if backend != "encoder":
            raise CapabilityError(f"{what}: ONNX export is for encoder classifiers (model.backend: encoder); this "
                                  f"trial runs on the '{backend}' backend; use --format merged or hf")
        if kind not in ("lora", "full", "head"):
            alt = "hf" if kind in ("soft_prompt", "prompt") else "merged"
            raise CapabilityError(f"{what}: ONNX export needs a trained classifier head on a plain encoder "
                                  f"(lora, full, gradual_unfreeze or linear_probe); use --format {alt}")


def default_out_dir(study: str, key: str, fmt: str) -> Path:
    """``exports/<study>-<key8>-<format>`` (relative to the working directory)."""
    return Path("exports") / f"{study}-{key[:8]}-{fmt}"


def check_out_dir(path: str | Path, force: bool = False) -> None:
    """Refuse an output path that holds anything, unless ``force`` and it is an earlier tunebench export."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out: {path} is a file; give a directory path")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not force:
        raise ExportError(f"--out: {path} is not empty; choose another directory, or pass --force to replace an "
                          "earlier export there")
    if not (path / MANIFEST).is_file():
        raise ExportError(f"--out: {path} holds files that are not a tunebench export (no {MANIFEST}); --force "
                          "only replaces an earlier export, so choose another directory")


@contextlib.contextmanager
def quiet():
    """Silence library chatter (PEFT's and the exporters' warnings, root-logger notes) during a step."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return False

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)  # only records logged on the root logger itself (onnxruntime's quantizer does that)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)


def merged_encoder(encoder: nn.Module) -> nn.Module:
    """A plain transformers model from a (possibly LoRA-wrapped) encoder; a LoRA is merged into a copy."""
    kind = adapter_kind(encoder)
    if kind == "soft_prompt":
        raise CapabilityError("a soft prompt cannot be merged into the model's weights; export it with --format hf")
    if kind == "lora":
        with quiet():
            return copy.deepcopy(encoder).merge_and_unload()
    return encoder
