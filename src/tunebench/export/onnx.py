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


INT8_OPS = ("MatMul",)  # the embedding table (Gather) stays fp32: int8 there moved 0.6% of SST-2 labels


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = True) -> None:
    """Dynamic int8 quantization (onnxruntime) of the MatMuls: int8 weights, activations quantized on the fly.

    On a fully fine-tuned all-MiniLM-L6-v2 (SST-2, 2,000 dev sentences), quantizing onnxruntime's default op set
    (MatMul and the embedding Gather) kept 98.35% of fp32's labels; MatMul alone 98.95%, at the same speed and
    accuracy (0.844 against fp32's 0.8435). Keeping the FFN output or attention MatMuls in fp32 changed nothing.
    """
    import onnx  # optional dependencies, heavy to import
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # stale intermediate shapes make the quantizer's shape inference fail
    plain = dst.with_name(dst.stem + ".noinfo.onnx")
    onnx.save(model, str(plain))
    try:
        with quiet():
            quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=list(INT8_OPS),
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


RECHECK_PROBES = 128  # random-token inputs that calibrate the near-tie margin (a fixed seed: the same each time)


def recheck_margin(fp32: np.ndarray, int8: np.ndarray) -> float:
    """The int8 top-2 logit gap under which an input is scored again in fp32: twice the 99th percentile of the
    per-input largest |logit difference| between the two graphs. A label can flip only where int8's gap is
    below the two top logits' errors together, so inputs with a wider gap keep fp32's label unless their error
    is in the top 1%. Measured on a 3-epoch fully fine-tuned MiniLM (SST-2 dev, 6,735 sentences): random-token
    probes gave 0.87, rechecking 6.5% of the sentences and raising agreement with fp32 from 98.81% to 99.96%."""
    err = np.abs(fp32.astype(np.float64) - int8).max(axis=1)
    return round(2.0 * float(np.percentile(err, 99)), 4)


def _recheck_probes(vocab_size: int, max_length: int, special: tuple[int | None, int | None], seed: int = 1,
                    n: int = RECHECK_PROBES) -> list[dict[str, np.ndarray]]:
    """Batches of random token ids of varied lengths, framed by the tokenizer's [CLS]/[SEP] where it has them."""
    rng = np.random.default_rng(seed)
    first, last = special
    out = []
    for start in range(0, n, 16):
        lengths = rng.integers(3, max(4, min(max_length, 64)), size=min(16, n - start))
        ids = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, k in enumerate(lengths):
            ids[i, :k] = rng.integers(min(1000, vocab_size // 2), vocab_size, size=k)
            if first is not None:
                ids[i, 0] = first
            if last is not None:
                ids[i, k - 1] = last
            mask[i, :k] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


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
    sessions = {name: ort.InferenceSession(str(d / name), opts, providers=["CPUExecutionProvider"])
                for name in (ONNX_FP32, ONNX_INT8)}
    got = {name: sess.run(None, probe)[0] for name, sess in sessions.items()}
    diff = float(np.abs(got[ONNX_FP32] - ref).max())
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        raise ExportError(f"the exported ONNX graph does not reproduce the PyTorch model (max |logit difference| "
                          f"{diff:.3g} > {tol:.3g}); please report this with the model's name")
    tok = parts.tokenizer
    say("calibrating the int8 near-tie margin")
    calib = _recheck_probes(int(encoder.config.vocab_size), limit, (tok.cls_token_id, tok.sep_token_id))
    margin = recheck_margin(*(np.concatenate([sessions[name].run(None, b)[0] for b in calib])
                              for name in (ONNX_FP32, ONNX_INT8)))
    tok.save_pretrained(str(d))
    cls = {"labels": list(parts.labels), "pooling": "mean", "max_length": limit,
           "hidden_size": parts.head.in_features, "pad_token_id": int(tok.pad_token_id or 0), "fp32": ONNX_FP32,
           "int8": ONNX_INT8, "recheck_margin": margin}
    (d / CLASSIFIER_FILE).write_text(json.dumps(cls, indent=2), encoding="utf-8")
    return {"classifier": cls, "onnx": {
        "exporter": exporter, "opset": ONNX_OPSET if exporter == "torchscript" else "torch default",
        "inputs": ["input_ids", "attention_mask"], "output": "logits", "dynamic_axes": ["batch", "sequence"],
        "quantization": {"method": "onnxruntime quantize_dynamic", "weights": "int8", "ops": list(INT8_OPS),
                         "granularity": "per channel" if per_channel else "per tensor",
                         "onnxruntime": ort.__version__},
        "check": {"probe_inputs": int(probe["input_ids"].shape[0]), "fp32_max_abs_logit_diff": diff,
                  "int8_max_abs_logit_diff": float(np.abs(got[ONNX_INT8] - ref).max()),
                  "int8_argmax_agreement": float((got[ONNX_INT8].argmax(1) == ref.argmax(1)).mean()),
                  "recheck_margin": margin, "recheck_probes": RECHECK_PROBES}}}


class OnnxClassifier:
    """An exported ONNX classifier run by onnxruntime: texts in, class scores (logits) or labels out.

    Example:
        >>> clf = OnnxClassifier("exports/sst2-1a2b3c4d-onnx")  # doctest: +SKIP
        >>> clf.predict_labels(["a gripping, funny film"])
        ['positive']

    ``quantized`` picks ``model_int8.onnx`` (default) or ``model.onnx``; ``threads`` sets onnxruntime's
    intra-op threads (default: onnxruntime's choice); inputs are tokenized, sorted by length and padded per
    batch of ``batch_size``, as tunebench's own predictors do.

    Near ties are scored again in fp32: an input whose int8 top-2 logit gap is below ``recheck_margin`` gets the
    fp32 graph's logits, so int8 keeps fp32's label where its rounding could flip it. The default is the margin
    calibrated at export (``classifier.json``; exports without one recheck nothing); 0 turns it off.
    ``rechecked`` / ``scored`` count inputs since loading.
    """

    def __init__(self, path: str | Path, *, quantized: bool = True, threads: int | None = None,
                 batch_size: int = 32, recheck_margin: float | None = None):
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
        margin = self.config.get("recheck_margin", 0.0) if recheck_margin is None else recheck_margin
        if not 0 <= float(margin) < float("inf"):
            raise ExportError(f"recheck margin: {margin!r} is not a number >= 0 (0 turns the fp32 recheck off)")
        self.recheck_margin = float(margin) if quantized else 0.0
        self.fp32_session = None  # the fp32 graph for near ties, loaded only when there is a margin
        if self.recheck_margin > 0:
            fp32_file = self.path / self.config["fp32"]
            if not fp32_file.is_file():
                raise ExportError(f"{fp32_file}: missing (the near-tie recheck runs it); export the trial again "
                                  f"with --format onnx, or set the recheck margin to 0")
            self.fp32_session = ort.InferenceSession(str(fp32_file), opts, providers=["CPUExecutionProvider"])
        self.scored = self.rechecked = 0
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
        out = self._run(self.session, ids, range(len(ids)))
        self.scored += len(ids)
        if self.fp32_session is not None and len(self.labels) > 1 and len(ids):
            top2 = np.sort(out, axis=1)[:, -2:]
            near = np.flatnonzero(top2[:, 1] - top2[:, 0] < self.recheck_margin)
            if len(near):
                out[near] = self._run(self.fp32_session, ids, near)[near]
                self.rechecked += len(near)
        return out

    def _run(self, session, ids: list[list[int]], which) -> np.ndarray:
        """Logits of the inputs ``which`` (the other rows stay 0), in batches of similar length."""
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        order = sorted(which, key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for r, i in enumerate(chunk):
                input_ids[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            out[chunk] = session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        return out

    def predict(self, texts: list[str]) -> np.ndarray:
        """Label ids."""
        return self.predict_scores(texts).argmax(1)

    def predict_labels(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.predict(texts)]
