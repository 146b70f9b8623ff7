"""ONNX export of an encoder classifier: the graph (encoder, masked mean pooling, head) in fp32, its dynamic
int8 quantization (onnxruntime), a numeric check against PyTorch, and :class:`OnnxClassifier` to run it."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CapabilityError
from ..strategies.base import Output, as_texts
from .common import CLASSIFIER_FILE, ONNX_FP32, ONNX_INT8, ONNX_OPSET, ExportError, merged_encoder, quiet


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
    with quiet():
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
            from torch.export import Dim  # missing from older torch: then this exporter fails like any other

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
    import onnx  # optional dependencies, heavy to import
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # stale intermediate shapes make the quantizer's shape inference fail
    plain = dst.with_name(dst.stem + ".noinfo.onnx")
    onnx.save(model, str(plain))
    try:
        with quiet():
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
    import onnxruntime as ort  # optional dependency, heavy to import

    say = say or (lambda _msg: None)
    d = Path(directory)
    if "onnx" not in predictor.export_formats():
        raise CapabilityError(f"ONNX export is for encoder classifiers; a {type(predictor).__name__} is not one")
    parts = predictor.export_parts()
    if parts.pooling != "mean" or parts.adapter == "soft_prompt":
        raise CapabilityError("ONNX export is for encoder classifiers with mean pooling and no soft prompt")
    size = sum(p.numel() * 4 for m in (parts.model, parts.head) for p in m.parameters())
    if size >= 2 * 10**9 - 10**8:
        raise CapabilityError(f"ONNX export holds models below 2 GB of fp32 weights (one protobuf file); this "
                              f"classifier has {size / 1e9:.1f} GB; use --format merged")
    say("preparing the graph")
    encoder = merged_encoder(parts.model)
    if encoder is parts.model:
        encoder = copy.deepcopy(encoder)
    encoder = encoder.float().cpu().eval()
    with contextlib.suppress(Exception):  # eager attention traces into the plain MatMul/Softmax pattern
        encoder.set_attn_implementation("eager")
    graph = _ClassifierGraph(encoder, copy.deepcopy(parts.head).float().cpu()).eval()
    limit = max_length or parts.max_length
    if parts.max_positions:
        limit = min(limit, parts.max_positions)
    sample = parts.batch(["an example input to trace the graph with", "short"], limit)
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
    tok = parts.tokenizer
    tok.save_pretrained(str(d))
    cls = {"labels": list(parts.labels), "pooling": "mean", "max_length": limit,
           "hidden_size": parts.head.in_features, "pad_token_id": int(tok.pad_token_id or 0), "fp32": ONNX_FP32,
           "int8": ONNX_INT8}
    (d / CLASSIFIER_FILE).write_text(json.dumps(cls, indent=2), encoding="utf-8")
    return {"classifier": cls, "onnx": {
        "exporter": exporter, "opset": ONNX_OPSET if exporter == "torchscript" else "torch default",
        "inputs": ["input_ids", "attention_mask"], "output": "logits", "dynamic_axes": ["batch", "sequence"],
        "quantization": {"method": "onnxruntime quantize_dynamic", "weights": "int8",
                         "granularity": "per channel" if per_channel else "per tensor",
                         "onnxruntime": ort.__version__},
        "check": {"probe_inputs": int(probe["input_ids"].shape[0]), "fp32_max_abs_logit_diff": diff,
                  "int8_max_abs_logit_diff": float(np.abs(got[ONNX_INT8] - ref).max()),
                  "int8_argmax_agreement": float((got[ONNX_INT8].argmax(1) == ref.argmax(1)).mean())}}}


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
        import onnxruntime as ort  # optional dependency, heavy to import
        from transformers import AutoTokenizer  # slow to import; only a loaded export needs it

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
        return self._scores(self._ids(texts))

    def run(self, inputs) -> Output:
        """Labels, logits and token counts for texts (or prompt records, by their ``input``), like a trial's own
        predictor: what ``tunebench serve --runtime onnx`` answers with."""
        ids = self._ids(as_texts(inputs))
        scores = self._scores(ids)
        return Output(scores.argmax(1), [len(x) for x in ids], [0] * len(ids), scores=scores)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def _scores(self, ids: list[list[int]]) -> np.ndarray:
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
