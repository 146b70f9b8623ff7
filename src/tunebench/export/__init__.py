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
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CapabilityError, TunebenchError

log = logging.getLogger(__name__)

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

# what a strategy leaves behind: an adapter (lora, soft_prompt), every weight (full), a head, or a prompt
_WEIGHTS = {"lora": "lora", "soft_prompt": "soft_prompt", "full": "full", "gradual_unfreeze": "full",
            "linear_probe": "head", "zero_shot": "prompt", "few_shot": "prompt", "chain_of_thought": "prompt"}


class ExportError(TunebenchError):
    """An export cannot be written as asked (output directory in the way, a graph that does not match)."""


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote: the directory, its format and files, and the manifest."""

    path: Path
    fmt: str
    files: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


# ---- what can be exported -------------------------------------------------------------------------------
def weights_kind(strategy: str, params: dict | None = None) -> str:
    """``lora``, ``soft_prompt``, ``full``, ``head`` or ``prompt``: what a trial of ``strategy`` changed."""
    if strategy == "hybrid":
        return _WEIGHTS.get((params or {}).get("tune", "lora"), "full")
    if strategy in _WEIGHTS:
        return _WEIGHTS[strategy]
    from ..strategies import registry  # a strategy added later: its family says whether weights changed

    try:
        return "prompt" if registry.get(strategy).family == "prompting" else "full"
    except KeyError:
        return "full"


def check_format(strategy: str, params: dict | None, backend: str, fmt: str, trial: str = "this trial") -> None:
    """Raise ``CapabilityError`` (saying which format to use instead) when ``fmt`` cannot export the trial."""
    if fmt not in FORMATS:
        raise CapabilityError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    kind = weights_kind(strategy, params)
    what = f"{trial} ({strategy})"
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


# ---- the entry point ------------------------------------------------------------------------------------
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        writer = {"hf": _write_hf, "merged": _write_merged, "onnx": _write_onnx}[fmt]
        info = writer(loaded, staging, say, per_channel=per_channel)
        say("writing the model card")
        final = out_dir.resolve()
        manifest = _manifest(loaded, fmt, info, staging)
        (staging / CARD).write_text(model_card(manifest, _usage(manifest, final)), encoding="utf-8")
        manifest["files"] = _files(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n",
                                        encoding="utf-8")
        _swap_into_place(staging, out_dir, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported trial %s as %s to %s", loaded.key[:8], fmt, out_dir)
    return ExportResult(out_dir, fmt, _files(out_dir), manifest)


def _swap_into_place(staging: Path, out_dir: Path, force: bool) -> None:
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


def _files(directory: Path) -> list[dict]:
    return [{"path": str(p.relative_to(directory)), "bytes": p.stat().st_size}
            for p in sorted(directory.rglob("*")) if p.is_file()]


# ---- the writers ----------------------------------------------------------------------------------------
def _predictor_classes():
    from ..strategies.causal import CausalPredictor
    from ..strategies.prompting import EmbeddingPredictor
    from ..strategies.training import ClassifierPredictor

    return ClassifierPredictor, CausalPredictor, EmbeddingPredictor


def peft_kind(model: nn.Module | None) -> str | None:
    """``lora`` or ``soft_prompt`` for a PEFT-wrapped model, None for a plain one."""
    cfgs = getattr(model, "peft_config", None)
    if not cfgs:
        return None
    cfg = next(iter(cfgs.values()))
    return "soft_prompt" if getattr(cfg, "is_prompt_learning", False) else "lora"


@contextlib.contextmanager
def _quiet():
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


def _unexpected(loaded, fmt: str) -> CapabilityError:
    return CapabilityError(f"trial {loaded.key[:8]} ({loaded.row['strategy']}): its predictor "
                           f"({type(loaded.predictor).__name__}) cannot be exported as {fmt}")


def _write_hf(loaded, d: Path, say, **_) -> dict:
    ClassifierPredictor, CausalPredictor, EmbeddingPredictor = _predictor_classes()
    pred = loaded.predictor
    if isinstance(pred, ClassifierPredictor):
        kind = peft_kind(pred.model.encoder)
        if kind is not None:
            say("saving the adapter")
            with _quiet():
                pred.model.encoder.save_pretrained(str(d))
        info = _write_classifier_files(loaded, d)
        info.update(contents="adapter" if kind else "head", adapter=kind)
        return info
    if isinstance(pred, CausalPredictor):
        kind = peft_kind(pred.model)
        if pred.model is not None and kind is None:
            raise _unexpected(loaded, "hf")
        if kind is not None:
            say("saving the adapter")
            with _quiet():
                pred.model.save_pretrained(str(d))
        _save_tokenizer(loaded, d)
        return {"contents": "adapter" if kind else "prompt", "adapter": kind, "prompt": _write_prompt(loaded, d)}
    if isinstance(pred, EmbeddingPredictor):
        from safetensors.torch import save_file

        save_file(pred.tensors(), str(d / ANCHORS_FILE))
        emb = {"labels": list(pred.labels), "mode": pred.mode, "k": pred.k, "tau": pred.tau,
               "label_weight": pred.label_weight, "max_length": pred.max_length, "pooling": "mean",
               "normalize": True, "centered": pred.center is not None}
        (d / EMBEDDING_FILE).write_text(json.dumps(emb, indent=2), encoding="utf-8")
        _save_tokenizer(loaded, d)
        return {"contents": "anchors", "adapter": None, "embedding": emb}
    raise _unexpected(loaded, "hf")


def merged_encoder(encoder: nn.Module) -> nn.Module:
    """A plain transformers model from a (possibly LoRA-wrapped) encoder; a LoRA is merged into a copy."""
    kind = peft_kind(encoder)
    if kind == "soft_prompt":
        raise CapabilityError("a soft prompt cannot be merged into the model's weights; export it with --format hf")
    if kind == "lora":
        with _quiet():
            return copy.deepcopy(encoder).merge_and_unload()
    return encoder


def _write_merged(loaded, d: Path, say, **_) -> dict:
    ClassifierPredictor, CausalPredictor, _ = _predictor_classes()
    pred = loaded.predictor
    if isinstance(pred, ClassifierPredictor):
        say("merging and saving the weights")
        encoder = merged_encoder(pred.model.encoder)
        with _quiet():
            encoder.save_pretrained(str(d))
        info = _write_classifier_files(loaded, d)
        info.update(contents="merged", adapter=peft_kind(pred.model.encoder))
        return info
    if isinstance(pred, CausalPredictor) and pred.model is not None:
        say("merging and saving the weights")
        lm = merged_encoder(pred.model)
        with _quiet():
            lm.save_pretrained(str(d))
        _save_tokenizer(loaded, d)
        return {"contents": "merged", "adapter": peft_kind(pred.model), "prompt": _write_prompt(loaded, d)}
    raise _unexpected(loaded, "merged")


def _save_tokenizer(loaded, d: Path) -> None:
    tok = getattr(loaded.backend, "tokenizer", None) if not getattr(loaded.backend, "remote", False) else None
    if tok is not None:
        tok.save_pretrained(str(d))


def _write_classifier_files(loaded, d: Path) -> dict:
    """Head weights, labels and pooling of an encoder classifier (and the tokenizer)."""
    from safetensors.torch import save_file

    pred = loaded.predictor
    head = pred.model.head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(d / HEAD_FILE))
    cls = {"labels": list(pred.labels), "pooling": pred.model.pool, "max_length": _max_length(loaded),
           "hidden_size": head.in_features, "head": HEAD_FILE}
    (d / CLASSIFIER_FILE).write_text(json.dumps(cls, indent=2), encoding="utf-8")
    _save_tokenizer(loaded, d)
    return {"classifier": cls}


def _max_length(loaded) -> int:
    """Tokens kept per input, as the backend truncates them."""
    n = int(getattr(loaded.predictor.config, "max_length", 512))
    limit = getattr(loaded.backend, "max_positions", None)
    return min(n, limit) if limit else n


def _write_prompt(loaded, d: Path) -> dict:
    """``prompt.json``: what the causal model reads: template and its variables, chat formatting, decoding."""
    pred, backend = loaded.predictor, loaded.backend
    b = pred.builder
    dec = pred.decode
    prompt = {
        "template": b.template, "task_type": b.task_type, "mode": pred.mode,
        "variables": {**b.variables, "demonstrations": b.demos},
        "input_fields": list(loaded.task.get("text") or []), "text_template": loaded.task.get("text_template"),
        "labels": list(pred.labels) if b.task_type == "classification" else [],
        "chat_template": bool(getattr(backend, "chat", False)),
        "system_prompt": getattr(backend.config, "system_prompt", None),
        "answer_prefix": "" if getattr(backend, "chat", False) else " ",
        "max_length": pred.max_length,
        "decode": {k: getattr(dec, k, None) for k in ("max_new_tokens", "temperature", "top_p", "stop")},
        "seed": pred.seed, "retrieval": None,
    }
    if pred.retrieval is not None:
        r = pred.retrieval
        prompt["retrieval"] = {"retriever": r.retriever, "k": r.k, "pool": r.pool,
                               "note": "demonstrations are the k pool examples nearest to the input by the "
                                       "retriever's mean-pooled, normalised embeddings, most similar last"}
    (d / PROMPT_FILE).write_text(json.dumps(prompt, indent=2, ensure_ascii=False), encoding="utf-8")
    return {k: prompt[k] for k in ("mode", "chat_template", "max_length")} | {
        "demonstrations": "retrieved" if pred.retrieval is not None else len(b.demos)}


# ---- ONNX -----------------------------------------------------------------------------------------------
class _ClassifierGraph(nn.Module):
    """input_ids + attention_mask -> logits: encoder, masked mean pooling, head (dropout is off at inference)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1e-6))


def _export_graph(graph: nn.Module, sample: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``graph`` as ONNX with dynamic batch and sequence axes; returns the exporter used.

    The TorchScript exporter comes first: its graph quantizes into the faster int8 model (measured with
    ``bench/export_speed.py``); the torch.export-based exporter is the fallback where it is unavailable.
    """
    args = (sample["input_ids"], sample["attention_mask"])
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    errors = []
    with _quiet():
        try:
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"}}
            torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=ONNX_OPSET, dynamic_axes=axes,
                              do_constant_folding=True, **names)
            return "torchscript"
        except Exception as exc:  # gone from this torch, or a model it cannot trace
            errors.append(f"torchscript: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            path.unlink(missing_ok=True)
        try:
            from torch.export import Dim

            batch, seq = Dim("batch"), Dim("sequence")
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            torch.onnx.export(graph, args, str(path), dynamo=True, external_data=False, dynamic_shapes=shapes,
                              optimize=True, **names)
            return "dynamo"
        except Exception as exc:
            errors.append(f"dynamo: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise ExportError("the model could not be exported to ONNX: " + "; ".join(errors))


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = True) -> None:
    """Dynamic int8 quantization (onnxruntime): int8 weights, activations quantized on the fly."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # stale intermediate shapes make the quantizer's shape inference fail
    plain = dst.with_name(dst.stem + ".noinfo.onnx")
    onnx.save(model, str(plain))
    try:
        with _quiet():
            quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        plain.unlink(missing_ok=True)


def _probe_batch(vocab_size: int, max_length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids of varied lengths, right-padded: a numeric check of the exported graph."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 5, 9, 17, max(3, min(max_length, 40)), 12, 7]
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, vocab_size, size=n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def write_onnx(predictor, directory: str | Path, *, per_channel: bool = True, max_length: int | None = None,
               say: Callable[[str], None] | None = None) -> dict:
    """Write ``model.onnx`` (fp32), ``model_int8.onnx``, the tokenizer and ``classifier.json`` of an encoder
    classifier predictor into ``directory``; check the fp32 graph against PyTorch. Returns the facts."""
    import onnxruntime as ort

    say = say or (lambda _msg: None)
    d = Path(directory)
    backend = predictor.backend
    model = predictor.model
    if getattr(model, "pool", "mean") != "mean" or peft_kind(model.encoder) == "soft_prompt":
        raise CapabilityError("ONNX export is for encoder classifiers with mean pooling and no soft prompt")
    size = sum(p.numel() * 4 for p in model.parameters())
    if size >= 2 * 10**9 - 10**8:
        raise CapabilityError(f"ONNX export holds models below 2 GB of fp32 weights (one protobuf file); this "
                              f"classifier has {size / 1e9:.1f} GB; use --format merged")
    say("preparing the graph")
    encoder = merged_encoder(model.encoder)
    if encoder is model.encoder:
        encoder = copy.deepcopy(encoder)
    encoder = encoder.float().cpu().eval()
    with contextlib.suppress(Exception):  # eager attention traces into the plain MatMul/Softmax pattern
        encoder.set_attn_implementation("eager")
    graph = _ClassifierGraph(encoder, copy.deepcopy(model.head).float().cpu()).eval()
    limit = max_length or int(getattr(predictor.config, "max_length", 512))
    if getattr(backend, "max_positions", None):
        limit = min(limit, backend.max_positions)
    sample = backend.collate(backend.tokenize(["an example input to trace the graph with", "short"], limit))
    sample = {k: v.cpu() for k, v in sample.items()}
    say("exporting to ONNX")
    exporter = _export_graph(graph, sample, d / ONNX_FP32)
    say("quantizing to int8")
    quantize_int8(d / ONNX_FP32, d / ONNX_INT8, per_channel=per_channel)
    say("checking the ONNX graphs against PyTorch")
    probe = _probe_batch(int(encoder.config.vocab_size), limit)
    with torch.inference_mode():
        ref = graph(**{k: torch.from_numpy(v) for k, v in probe.items()}).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    got = {name: ort.InferenceSession(str(d / name), opts, providers=["CPUExecutionProvider"]).run(None, probe)[0]
           for name in (ONNX_FP32, ONNX_INT8)}
    diff = float(np.abs(got[ONNX_FP32] - ref).max())
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        raise ExportError(f"the exported ONNX graph does not reproduce the PyTorch model (max |logit difference| "
                          f"{diff:.3g} > {tol:.3g}); please report this with the model's name")
    tok = backend.tokenizer
    tok.save_pretrained(str(d))
    head = model.head
    cls = {"labels": list(predictor.labels), "pooling": "mean", "max_length": limit, "hidden_size": head.in_features,
           "pad_token_id": int(tok.pad_token_id or 0), "fp32": ONNX_FP32, "int8": ONNX_INT8}
    (d / CLASSIFIER_FILE).write_text(json.dumps(cls, indent=2), encoding="utf-8")
    import onnxruntime

    return {"classifier": cls, "onnx": {
        "exporter": exporter, "opset": ONNX_OPSET if exporter == "torchscript" else "torch default",
        "inputs": ["input_ids", "attention_mask"], "output": "logits", "dynamic_axes": ["batch", "sequence"],
        "quantization": {"method": "onnxruntime quantize_dynamic", "weights": "int8",
                         "granularity": "per channel" if per_channel else "per tensor",
                         "onnxruntime": onnxruntime.__version__},
        "check": {"probe_inputs": int(probe["input_ids"].shape[0]), "fp32_max_abs_logit_diff": diff,
                  "int8_max_abs_logit_diff": float(np.abs(got[ONNX_INT8] - ref).max()),
                  "int8_argmax_agreement": float((got[ONNX_INT8].argmax(1) == ref.argmax(1)).mean())}}}


def _write_onnx(loaded, d: Path, say, *, per_channel: bool = True) -> dict:
    ClassifierPredictor, _, _ = _predictor_classes()
    if not isinstance(loaded.predictor, ClassifierPredictor) or loaded.backend.name != "encoder":
        raise _unexpected(loaded, "onnx")
    info = write_onnx(loaded.predictor, d, per_channel=per_channel, max_length=_max_length(loaded), say=say)
    info.update(contents="onnx", adapter=peft_kind(loaded.predictor.model.encoder))
    return info


class OnnxClassifier:
    """An exported ONNX classifier run by onnxruntime: texts in, class scores (logits) or labels out.

    Example:
        >>> clf = OnnxClassifier("exports/sst2-1a2b3c4d-onnx")  # doctest: +SKIP
        >>> clf.predict_labels(["a gripping, funny film"])
        ['positive']

    ``quantized`` picks ``model_int8.onnx`` (default) or ``model.onnx``; ``threads`` sets onnxruntime's
    intra-op threads (default: onnxruntime's choice); inputs are tokenized, sorted by length and padded per
    batch of ``batch_size``, as tunebench's own predictors do.
    """

    def __init__(self, path: str | Path, *, quantized: bool = True, threads: int | None = None,
                 batch_size: int = 32):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path)
        cfg_path = self.path / CLASSIFIER_FILE
        if not cfg_path.is_file():
            raise ExportError(f"{self.path}: not an ONNX export of tunebench ({CLASSIFIER_FILE} missing)")
        self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_file = self.path / self.config["int8" if quantized else "fp32"]
        if not model_file.is_file():
            raise ExportError(f"{model_file}: missing; export the trial again with --format onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.labels: list[str] = list(self.config["labels"])
        self.max_length = int(self.config["max_length"])
        self.pad_id = int(self.config.get("pad_token_id", 0))
        self.batch_size = batch_size

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        """Logits, shape (n, n_labels), in input order."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for r, i in enumerate(chunk):
                input_ids[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            out[chunk] = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        return out

    def predict(self, texts: list[str]) -> np.ndarray:
        """Label ids."""
        return self.predict_scores(texts).argmax(1)

    def predict_labels(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.predict(texts)]


# ---- manifest and model card ----------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def _base_model(loaded) -> dict:
    mc = loaded.model_config
    path = mc.path
    info = {"backend": mc.backend, "path": path, "id": getattr(loaded.backend, "model_id", path)}
    if mc.backend == "encoder" and path == "default":
        from ..backends.encoder import default_model_dir

        info.update(path=str(default_model_dir()), hub_id="sentence-transformers/all-MiniLM-L6-v2")
    elif mc.backend == "openai":
        info["id"] = getattr(mc, "model", None) or path
    elif not Path(path).expanduser().exists() and path.count("/") == 1:
        info["hub_id"] = path
    return info


def _manifest(loaded, fmt: str, info: dict, staging: Path) -> dict:
    import onnxruntime
    import peft
    import transformers

    from ..version import __version__

    row = loaded.row
    record = row.get("record") or {}
    metrics = row.get("metrics") or {}
    cost = {k: v for k, v in (row.get("cost") or {}).items() if k != "latency_ms_samples"}
    task = {"type": loaded.task_type, "text": loaded.task.get("text"), "instruction": loaded.task.get("instruction")}
    if loaded.task_type == "classification":
        task["labels"] = [{"name": lab["name"], "description": lab.get("description")}
                          for lab in (loaded.task.get("labels") or [])] or [{"name": n} for n in loaded.labels]
    else:
        task["target"] = loaded.task.get("target")
    finished = row.get("finished_at")
    return {
        "tunebench_export": 1, "format": fmt, **info,
        "study": loaded.study, "trial": row["key"], "name": loaded.name, "label": row["label"],
        "strategy": row["strategy"], "family": row.get("family"), "params": row.get("params"),
        "seed": row.get("seed"), "train_size": row.get("train_size"), "weights": weights_kind(row["strategy"],
                                                                                              row.get("params")),
        "base_model": _base_model(loaded), "backend": record.get("backend"), "task": task,
        "metrics": {"test": {k: v for k, v in metrics.items() if not k.startswith("dev_")},
                    "dev": {k[4:]: v for k, v in metrics.items() if k.startswith("dev_")},
                    "n_test": record.get("n_test"), "best_epoch": record.get("best_epoch")},
        "history": row.get("history"), "cost": cost,
        "trained_with": record.get("versions"),
        "exported_with": {"tunebench": __version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "onnxruntime": onnxruntime.__version__},
        "trained_at": datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds")
        if finished else None,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v) -> str:
    """Metrics: four decimals."""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    return "-" if v is None else str(v)


def _qty(v) -> str:
    """Costs: three significant digits (whole numbers above 1000)."""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def model_card(m: dict, usage: str) -> str:
    """The ``README.md`` of an export: what was tuned, how well, at what cost, and how to use it."""
    base = m["base_model"]
    lines = ["---", f"library_name: {_library(m)}", "tags:", "- tunebench", f"- {m['strategy']}"]
    if base.get("hub_id"):
        lines.append(f"base_model: {base['hub_id']}")
    lines += ["---", "", f"# {m['study']}: {m['label']} (trial {m['trial'][:8]})", ""]
    contents = {"adapter": f"the {m.get('adapter') or ''} adapter alone (PEFT format)",
                "head": "the trained classification head (the base model is unchanged)",
                "prompt": "the prompt (template and demonstrations) for the unchanged base model",
                "anchors": "the class anchors (embeddings) for the unchanged base encoder",
                "merged": "the tuned weights merged into the base model (safetensors, plain transformers)",
                "onnx": "an ONNX graph (fp32) and its int8 dynamic quantization (onnxruntime)"}[m["contents"]]
    lines += [f"Exported by tunebench as `{m['format']}`: {contents}.", "",
              "| | |", "|---|---|",
              f"| study | `{m['study']}` |", f"| trial | `{m['trial']}` (seed {m['seed']}, {m['train_size']} "
              f"training examples) |",
              f"| strategy | `{m['strategy']}` ({m['family']}) |",
              f"| base model | `{base['id']}` ({base['backend']} backend"
              + (f"; `{base['path']}`" if base["path"] != base["id"] else "") + ") |",
              f"| task | {m['task']['type']}" + (f": {', '.join(lab['name'] for lab in m['task'].get('labels', []))}"
                                                 if m['task'].get('labels') else
                                                 f", target field `{m['task'].get('target')}`") + " |",
              f"| trained | {m.get('trained_at') or '-'} |", f"| exported | {m['exported_at']} |", ""]
    if m["task"].get("instruction"):
        lines += [f"Instruction: {m['task']['instruction']}", ""]
    lines += ["## Configuration", "", "```json", json.dumps(m["params"], indent=2), "```", ""]
    lines += _metrics_section(m)
    lines += _cost_section(m)
    if m.get("onnx"):
        o, c = m["onnx"], m["onnx"]["check"]
        q = o["quantization"]
        lines += ["## ONNX", "",
                  f"- `{ONNX_FP32}`: fp32, exported with the {o['exporter']} exporter (opset {o['opset']}); inputs "
                  "`input_ids`, `attention_mask` (int64, dynamic batch and sequence), output `logits`.",
                  f"- `{ONNX_INT8}`: {q['method']}, {q['weights']} weights {q['granularity']}, activations "
                  "quantized at run time.",
                  f"- Check on {c['probe_inputs']} probe inputs: fp32 max |logit difference| vs PyTorch "
                  f"{c['fp32_max_abs_logit_diff']:.2e}; int8 {c['int8_max_abs_logit_diff']:.3f}, same argmax on "
                  f"{100 * c['int8_argmax_agreement']:.0f}%. The test metrics above are the PyTorch model's; "
                  "measure the int8 model on your data before serving it.", ""]
    lines += ["## Usage", "", usage.rstrip(), ""]
    lines += ["## Versions", "", f"- trained with: {_versions(m.get('trained_with'))}",
              f"- exported with: {_versions(m.get('exported_with'))}", "",
              f"Machine-readable facts: `{MANIFEST}`.", ""]
    return "\n".join(lines)


def _library(m: dict) -> str:
    if m["format"] == "onnx":
        return "onnx"
    return "peft" if m["contents"] == "adapter" else "transformers"


def _versions(v: dict | None) -> str:
    return ", ".join(f"{k} {val}" for k, val in (v or {}).items()) or "-"


def _metrics_section(m: dict) -> list[str]:
    test, dev = m["metrics"]["test"], m["metrics"]["dev"]
    scalars = [k for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = ["## Metrics", "", f"On the study's test split ({m['metrics'].get('n_test') or '?'} examples)"
             + (f"; dev: the epoch kept (epoch {m['metrics']['best_epoch']})" if dev else "") + ".", "",
             "| metric | test |" + (" dev |" if dev else ""), "|---|---|" + ("---|" if dev else "")]
    for k in scalars:
        lines.append(f"| {k} | {_fmt(test[k])} |" + (f" {_fmt(dev.get(k))} |" if dev else ""))
    per_class = test.get("per_class") or {}
    if per_class and len(per_class) <= 30:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, s in per_class.items():
            lines.append(f"| {name} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | {_fmt(s['f1'])} | "
                         f"{s['support']} |")
    return lines + [""]


def _cost_section(m: dict) -> list[str]:
    c = m["cost"]
    rows = [("train seconds", c.get("train_seconds")), ("trainable parameters", c.get("trainable_params")),
            ("latency p50 / p95 (ms, one input)", f"{_qty(c.get('latency_ms_p50'))} / {_qty(c.get('latency_ms_p95'))}"),
            ("throughput (inputs/s, test set)", c.get("throughput_per_s")),
            ("tokens per request", c.get("tokens_per_request")), ("peak memory (MB)", c.get("peak_memory_mb"))]
    backend = m.get("backend") or {}
    lines = ["## Cost", "", f"Measured by tunebench on {backend.get('device', '?')} ({backend.get('precision', '?')})"
             " with the PyTorch model.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_qty(v)} |" for k, v in rows if v is not None]
    return lines + [""]


# ---- usage snippets -------------------------------------------------------------------------------------
def _usage(m: dict, path: Path) -> str:
    """How to load and predict, in plain transformers / peft / onnxruntime code (tested)."""
    p = json.dumps(str(path))
    base = json.dumps(m["base_model"]["path"])
    if m["format"] == "onnx":
        return "\n".join([
            "With tunebench:", "", "```python", "from tunebench.export import OnnxClassifier", "",
            f"clf = OnnxClassifier({p})  # quantized=False runs the fp32 graph",
            'print(clf.predict_labels(["an example to classify"]))', "```", "",
            "With onnxruntime alone (inputs padded on the right; the graph pools and applies the head):", "",
            "```python", "import json", "import onnxruntime as ort", "from transformers import AutoTokenizer", "",
            f"path = {p}", 'cfg = json.load(open(f"{path}/classifier.json"))',
            "tok = AutoTokenizer.from_pretrained(path)",
            'session = ort.InferenceSession(f"{path}/model_int8.onnx", providers=["CPUExecutionProvider"])', "",
            "", "def predict(texts):",
            '    batch = tok(texts, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="np")',
            '    feed = {k: batch[k].astype("int64") for k in ("input_ids", "attention_mask")}',
            "    logits = session.run(None, feed)[0]",
            '    return [cfg["labels"][i] for i in logits.argmax(-1)]', "", "",
            'print(predict(["an example to classify"]))', "```"])
    if m.get("classifier"):
        return _classifier_usage(m, p, base)
    if m.get("embedding"):
        return _embedding_usage(m, p, base)
    return _causal_usage(m, p, base)


def _classifier_usage(m: dict, p: str, base: str) -> str:
    cls = m["classifier"]
    if m["contents"] == "merged":
        load = ["encoder = AutoModel.from_pretrained(path).eval()"]
        imports = ["from transformers import AutoModel, AutoTokenizer"]
    elif m["contents"] == "adapter":
        load = [f"encoder = PeftModel.from_pretrained(AutoModel.from_pretrained({base}), path).eval()"]
        imports = ["from peft import PeftModel", "from transformers import AutoModel, AutoTokenizer"]
    else:
        load = [f"encoder = AutoModel.from_pretrained({base}).eval()  # the unchanged base model"]
        imports = ["from transformers import AutoModel, AutoTokenizer"]
    if cls["pooling"] == "mean":
        pool = ["    if hidden.shape[1] > mask.shape[1]:  # a soft prompt's virtual tokens count as real tokens",
                "        mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], 1)",
                "    m = mask.unsqueeze(-1).to(hidden.dtype)",
                "    features = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)"]
        if m.get("adapter") != "soft_prompt":
            pool = pool[2:]
        padding = []
    else:  # last real token (a causal LM's body); right padding
        pool = ["    last = mask.sum(1) - 1 + hidden.shape[1] - mask.shape[1]",
                "    features = hidden[torch.arange(hidden.shape[0]), last]"]
        padding = ['tok.padding_side = "right"']
    pooling = "Mean pooling" if cls["pooling"] == "mean" else "Last-token pooling"
    lines = [f"{pooling} of the encoder's last hidden states, then the linear head in `{HEAD_FILE}` (labels in "
             f"`{CLASSIFIER_FILE}`):", "", "```python", "import json", "",
             "import torch", "from safetensors.torch import load_file", *imports, "",
             f"path = {p}", 'cfg = json.load(open(f"{path}/classifier.json"))',
             "tok = AutoTokenizer.from_pretrained(path)", *padding, *load,
             'head = torch.nn.Linear(cfg["hidden_size"], len(cfg["labels"]))',
             'head.load_state_dict(load_file(f"{path}/classifier_head.safetensors"))', "", "",
             "@torch.no_grad()", "def predict_scores(texts):",
             '    batch = tok(texts, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="pt")',
             '    ids, mask = batch["input_ids"], batch["attention_mask"]',
             "    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state",
             *pool, "    return head(features.float())", "", "",
             "def predict(texts):",
             '    return [cfg["labels"][i] for i in predict_scores(texts).argmax(-1)]', "", "",
             'print(predict(["an example to classify"]))', "```"]
    return "\n".join(lines)


def _embedding_usage(m: dict, p: str, base: str) -> str:
    return "\n".join([
        "Cosine similarity between the input's embedding (mean-pooled, L2-normalised, base encoder; minus `center` "
        f"where a prompt search calibrated it) and the class anchors in `{ANCHORS_FILE}` (`prototype`: one anchor "
        "per class; `knn`: the k nearest anchors vote; `kernel`: a soft nearest neighbour per class, plus the "
        "weighted similarity to each label prompt):", "",
        "```python", "import json", "", "import torch", "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer", "",
        f"path = {p}", 'cfg = json.load(open(f"{path}/embedding.json"))',
        'anchors = load_file(f"{path}/anchors.safetensors")',
        "tok = AutoTokenizer.from_pretrained(path)", f"encoder = AutoModel.from_pretrained({base}).eval()",
        "normalize = torch.nn.functional.normalize", "", "",
        "@torch.no_grad()", "def predict_scores(texts):",
        '    batch = tok(texts, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="pt")',
        '    ids, mask = batch["input_ids"], batch["attention_mask"]',
        "    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state",
        "    m = mask.unsqueeze(-1).to(hidden.dtype)",
        "    emb = normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-6), dim=-1)",
        '    if "center" in anchors:', '        emb = normalize(emb - anchors["center"], dim=-1)',
        '    sims = emb @ anchors["anchors"].T', '    owner = anchors["anchor_labels"].long()',
        '    n = len(cfg["labels"])',
        '    if cfg["mode"] == "prototype":', "        scores = torch.full((len(texts), n), -2.0)",
        "        scores[:, owner] = sims",
        '    elif cfg["mode"] == "kernel":', '        tau = cfg["tau"]',
        "        mass = torch.zeros(len(texts), n).index_add_(1, owner, torch.exp((sims - 1) / tau))",
        "        scores = tau * torch.log(mass + 1e-30)",
        "    else:", '        top, idx = sims.topk(min(cfg["k"], sims.shape[1]), dim=1)',
        "        scores = torch.zeros(len(texts), n).scatter_add_(1, owner[idx], top + 1.0)",
        '    if "label_anchors" in anchors and cfg.get("label_weight"):',
        '        scores = scores + cfg["label_weight"] * (emb @ anchors["label_anchors"].T)',
        "    return scores", "", "",
        'print([cfg["labels"][i] for i in predict_scores(["an example to classify"]).argmax(-1)])', "```"])


def _causal_usage(m: dict, p: str, base: str) -> str:
    pr = m.get("prompt") or {}
    remote = m["base_model"]["backend"] == "openai"
    intro = ["The model expects the prompt it was tuned with: `prompt.json` holds the Jinja2 template, its variables "
             "(instruction, labels, demonstrations) and whether the tokenizer's chat template wraps it."]
    if pr.get("demonstrations") == "retrieved":
        intro.append("Its demonstrations are retrieved per input (see `retrieval` in `prompt.json`); the code below "
                     "renders the prompt without them, so use tunebench to reproduce the trial exactly.")
    if remote:
        return "\n".join(intro + ["", f"Send the rendered prompt to `{m['base_model']['id']}` "
                                       "(the endpoint the trial used)."])
    if m["contents"] == "merged":
        imports, load = [], ["model = AutoModelForCausalLM.from_pretrained(path).eval()"]
    elif m["contents"] == "adapter":
        imports = ["from peft import PeftModel"]
        load = [f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), path).eval()"]
    else:
        imports, load = [], [f"model = AutoModelForCausalLM.from_pretrained({base}).eval()  # the unchanged base"]
    lines = [*intro, "", "```python", "import json", "", "import torch",
             "from jinja2.sandbox import SandboxedEnvironment", *imports,
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"path = {p}", 'p = json.load(open(f"{path}/prompt.json", encoding="utf-8"))',
             "tok = AutoTokenizer.from_pretrained(path)", *load,
             'template = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(p["template"])', "", "",
             "def prompt_ids(text, **fields):",
             '    """Prompt tokens of one input (a task with several input fields: pass them by name too)."""',
             '    values = {**{f: text for f in p["input_fields"][:1]}, **fields, "input": text}',
             '    body = template.render(**p["variables"], **values).strip()',
             '    if p["chat_template"]:',
             '        system = [{"role": "system", "content": p["system_prompt"]}] if p["system_prompt"] else []',
             '        body = tok.apply_chat_template(system + [{"role": "user", "content": body}], tokenize=False,',
             "                                       add_generation_prompt=True)",
             '    return tok(body, add_special_tokens=not p["chat_template"])["input_ids"][-p["max_length"]:]', "", ""]
    if pr.get("mode") == "score":
        lines += ["@torch.no_grad()", "def label_scores(text):",
                  '    """Mean log-probability per token of each label after the prompt (higher: more likely)."""',
                  "    ids, scores = prompt_ids(text), []",
                  '    for name in p["labels"]:',
                  '        answer = tok(p["answer_prefix"] + name, add_special_tokens=False)["input_ids"]',
                  "        logits = model(torch.tensor([ids + answer])).logits[0, -len(answer) - 1:-1].float()",
                  "        logp = logits.log_softmax(-1)[torch.arange(len(answer)), answer]",
                  "        scores.append(logp.mean().item())", "    return scores", "", "",
                  "def predict(texts):",
                  '    return [p["labels"][int(torch.tensor(label_scores(t)).argmax())] for t in texts]']
    else:
        lines += ["@torch.no_grad()", "def generate(text):",
                  '    """Greedy completion cut at the stop strings (sampling options: p["decode"])."""',
                  "    ids = torch.tensor([prompt_ids(text)])",
                  '    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,',
                  '                         max_new_tokens=p["decode"]["max_new_tokens"],',
                  "                         pad_token_id=tok.pad_token_id)",
                  "    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)",
                  '    for stop in p["decode"]["stop"] or []:', "        text = text.split(stop)[0]",
                  "    return text.strip()", "", "",
                  "def predict(texts):", "    return [generate(t) for t in texts]"]
    lines += ["", "", 'print(predict(["an example input"]))', "```"]
    if pr.get("mode") != "score" and m["task"]["type"] == "classification":
        lines += ["", "tunebench maps a generated answer to the label it names (exact name after lower-casing and "
                      "removing punctuation, else the one label name it contains" +
                      ("; with chain of thought, the text after the last `Answer:`" if pr.get("mode") == "reason"
                       else "") + ")."]
    return "\n".join(lines)
