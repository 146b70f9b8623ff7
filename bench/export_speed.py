#!/usr/bin/env python
"""Serving speed and accuracy of an exported encoder classifier: PyTorch fp32 vs bf16 vs ONNX fp32 vs ONNX int8.

A classifier (default: ``full`` fine-tuning of all-MiniLM-L6-v2) is trained briefly on ``--train`` SST-2 train
sentences, exported with ``tunebench.export.write_onnx`` (fp32 graph + onnxruntime dynamic int8 quantization),
then all four paths classify the whole SST-2 dev set, side by side in one process:

- PyTorch fp32: the trained ``EncoderClassifier`` as tunebench serves it (``predict_logits``).
- PyTorch bf16: the same under ``torch.autocast("cpu", torch.bfloat16)``.
- ONNX fp32 / int8: ``tunebench.export.OnnxClassifier`` on onnxruntime's CPU provider.

Every path tokenizes inside the timed region with the same tokenizer and truncation, sorts inputs by length and
pads per batch of ``--batch-size``; PyTorch and onnxruntime get the same number of threads. The paths run in
rotating order for ``--rounds`` rounds; the median time of each is reported. Target: int8 >= 2.5x the fp32
PyTorch throughput with accuracy within 0.5 points. Nothing asserts on timing.

Usage:
    python bench/export_speed.py                      # 4,000 train sentences, 1 epoch, whole dev set
    python bench/export_speed.py --sweep 8,128 --profile   # also other batch sizes; onnxruntime op times
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, read_tsv  # noqa: E402

TARGET_RATIO = 2.5
TARGET_DELTA_PTS = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", type=int, default=4000, help="SST-2 train sentences to fine-tune on (fixed-seed sample)")
    p.add_argument("--strategy", default="full", choices=["full", "lora"], help="how the classifier is trained")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per input (training and inference)")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size of every path")
    p.add_argument("--threads", type=int, default=None, help="threads of PyTorch and onnxruntime (default: CPUs)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over the dev set per path; median reported")
    p.add_argument("--per-tensor", action="store_true", help="one int8 scale per weight tensor (default: per channel)")
    p.add_argument("--sweep", default="", help="extra batch sizes, e.g. 8,128: PyTorch fp32 vs ONNX int8 at each")
    p.add_argument("--profile", action="store_true", help="also print onnxruntime's time per operator type")
    p.add_argument("--keep", type=Path, default=None, help="write the ONNX export here instead of a temp dir")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def op_profile(model_path: Path, batches, threads: int, top: int = 8) -> list[tuple[str, float]]:
    """Share of kernel time per operator type of one pass over ``batches`` (onnxruntime's profiler)."""
    import collections
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        for ids, mask in batches:
            session.run(None, {"input_ids": ids, "attention_mask": mask})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return [(op, 100 * t / total) for op, t in per_op.most_common(top)]


def timed_rounds(paths: dict, texts: list[str], rounds: int) -> tuple[dict, dict]:
    """Seconds of each round per path (paths in rotating order, so none always runs first) and its outputs."""
    import numpy as np

    names = list(paths)
    times: dict[str, list[float]] = {k: [] for k in names}
    scores: dict = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            scores[name] = np.asarray(paths[name](texts), dtype=np.float32)
            times[name].append(time.perf_counter() - t0)
    return times, scores


def main(argv=None) -> int:
    args = parse_args(argv)
    sst2 = DATA.resolve() / "sst2"
    if not (sst2 / "dev.tsv").is_file() or not (sst2 / "train.tsv").is_file():
        print(f"SKIP: SST-2 data not found under {sst2} (expected train.tsv and dev.tsv); nothing to benchmark.")
        return 0

    import numpy as np
    import onnxruntime
    import torch
    import transformers

    from tunebench.backends import load_backend
    from tunebench.backends.base import cpu_supports_bf16
    from tunebench.config import LabelSpec, ModelConfig, TaskConfig
    from tunebench.data import Split, TaskData
    from tunebench.export import ONNX_FP32, ONNX_INT8, OnnxClassifier, write_onnx
    from tunebench.strategies import registry
    from tunebench.strategies.training import predict_logits

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    bs, max_len = args.batch_size, args.max_length

    print(f"{cpu_name()}; native bf16: {'yes' if cpu_supports_bf16() else 'no (AMX/AVX512-BF16 absent)'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__};"
          f" {threads} thread(s) for PyTorch and onnxruntime; batch {bs}, max_length {max_len}", flush=True)

    tr_texts, tr_labels = read_tsv(sst2 / "train.tsv")
    dv_texts, dv_labels = read_tsv(sst2 / "dev.tsv")
    y = np.asarray(dv_labels)
    pick = np.random.default_rng(args.seed).permutation(len(tr_texts))[: args.train + 500]
    pool = Split("train", [tr_texts[i] for i in pick], np.asarray([tr_labels[i] for i in pick], dtype=np.int64))
    train, select = pool.subset(range(args.train)), pool.subset(range(args.train, len(pool)))
    labels = [LabelSpec(value="0", name="negative"), LabelSpec(value="1", name="positive")]
    spec = TaskConfig(data={"train": str(sst2 / "train.tsv")}, text="sentence", label="label", labels=labels)
    task = TaskData(config=spec, labels=labels, train=train, dev=select, test=select)

    backend = load_backend(ModelConfig(path="default", precision="fp32"))
    cls = registry.get(args.strategy)
    cfg = cls.config_from_dict({"epochs": args.epochs, "max_length": max_len})
    print(f"\ntraining '{args.strategy}' on {len(train)} SST-2 train sentences ({args.epochs} epoch(s)) ...",
          flush=True)
    t0 = time.perf_counter()
    predictor = cls(cfg, seed=args.seed).adapt(backend, task, train=train, dev=select)
    print(f"  trained in {time.perf_counter() - t0:.0f}s", flush=True)

    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="tunebench-export-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = write_onnx(predictor, out_dir, per_channel=not args.per_tensor, max_length=max_len)
    sizes = {f: (out_dir / f).stat().st_size / 2**20 for f in (ONNX_FP32, ONNX_INT8)}
    q = info["onnx"]["quantization"]
    print(f"  exported to ONNX ({info['onnx']['exporter']} exporter) and quantized ({q['granularity']}) in "
          f"{time.perf_counter() - t0:.0f}s: {ONNX_FP32} {sizes[ONNX_FP32]:.1f} MB, {ONNX_INT8} "
          f"{sizes[ONNX_INT8]:.1f} MB", flush=True)

    model = predictor.model.eval()
    onnx32 = OnnxClassifier(out_dir, quantized=False, threads=threads, batch_size=bs)
    onnx8 = OnnxClassifier(out_dir, quantized=True, threads=threads, batch_size=bs)

    def torch_fp32(texts):
        return predict_logits(model, backend, backend.tokenize(texts, max_len), batch_size=bs)

    def torch_bf16(texts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return predict_logits(model, backend, backend.tokenize(texts, max_len), batch_size=bs)

    paths = {"PyTorch fp32": torch_fp32, "PyTorch bf16 (autocast)": torch_bf16,
             "ONNX fp32": onnx32.predict_scores, "ONNX int8 (dynamic)": onnx8.predict_scores}
    texts = dv_texts
    warm = texts[:: max(1, len(texts) // 512)]  # every length range once: allocators, kernels, first-run work
    for fn in paths.values():
        fn(warm)
    print(f"\ntiming {len(texts)} SST-2 dev sentences x {args.rounds} rounds (rotating order) ...", flush=True)
    times, scores = timed_rounds(paths, texts, args.rounds)
    names = list(paths)

    base = "PyTorch fp32"
    t_base = statistics.median(times[base])
    acc = {k: 100 * float((s.argmax(1) == y).mean()) for k, s in scores.items()}
    print(f"\n== SST-2 dev ({len(texts)} sentences), '{args.strategy}' classifier, batch {bs}, {threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} ==")
    header = (f"{'path':<26}{'examples/s':>11}{'spread':>15}{'vs fp32':>9}{'accuracy':>10}{'Δ pts':>8}"
              f"{'agree':>9}{'max|Δlogit|':>13}")
    print(header)
    print("-" * len(header))
    for name in names:
        t = statistics.median(times[name])
        eps = [len(texts) / x for x in times[name]]
        agree = 100 * float((scores[name].argmax(1) == scores[base].argmax(1)).mean())
        diff = float(np.abs(scores[name] - scores[base]).max())
        print(f"{name:<26}{len(texts) / t:>11.1f}{f'{min(eps):.0f}-{max(eps):.0f}':>15}{t_base / t:>8.2f}x"
              f"{acc[name]:>9.2f}%{acc[name] - acc[base]:>+8.2f}{agree:>8.2f}%{diff:>13.3g}")
    ratio = t_base / statistics.median(times["ONNX int8 (dynamic)"])
    delta = acc["ONNX int8 (dynamic)"] - acc[base]
    ok_speed, ok_acc = ratio >= TARGET_RATIO, abs(delta) <= TARGET_DELTA_PTS
    print(f"\ntarget: ONNX int8 >= {TARGET_RATIO}x PyTorch fp32 throughput: {ratio:.2f}x "
          f"{'PASS' if ok_speed else 'MISS'}; |Δ accuracy| <= {TARGET_DELTA_PTS} pt: {abs(delta):.2f} pt "
          f"{'PASS' if ok_acc else 'MISS'}  => {'MET' if ok_speed and ok_acc else 'NOT MET'}")
    print("(spread: slowest-fastest round; examples/s: median round. Timings include tokenization.)")

    sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    if sweep:
        print("\nother batch sizes (median of rounds, same protocol):")
    for b in sweep:
        int8_b = OnnxClassifier(out_dir, quantized=True, threads=threads, batch_size=b)
        pair = {"fp32": lambda t, b=b: predict_logits(model, backend, backend.tokenize(t, max_len), batch_size=b),
                "int8": int8_b.predict_scores}
        for fn in pair.values():
            fn(warm)
        t_b, s_b = timed_rounds(pair, texts, args.rounds)
        e32, e8 = (len(texts) / statistics.median(t_b[k]) for k in ("fp32", "int8"))
        a32, a8 = (100 * float((s_b[k].argmax(1) == y).mean()) for k in ("fp32", "int8"))
        print(f"batch {b:>4}: PyTorch fp32 {e32:7.1f}/s, ONNX int8 {e8:7.1f}/s = {e8 / e32:.2f}x; accuracy "
              f"{a32:.2f}% vs {a8:.2f}% ({a8 - a32:+.2f} pt)", flush=True)

    if args.profile:
        batches = []
        ids = onnx8.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), bs):
            chunk = [ids[i] for i in order[s : s + bs]]
            width = max(len(x) for x in chunk)
            a = np.zeros((len(chunk), width), dtype=np.int64)
            m = np.zeros_like(a)
            for i, x in enumerate(chunk):
                a[i, : len(x)], m[i, : len(x)] = x, 1
            batches.append((a, m))
        for f in (ONNX_FP32, ONNX_INT8):
            shares = ", ".join(f"{op} {pct:.0f}%" for op, pct in op_profile(out_dir / f, batches, threads))
            print(f"onnxruntime kernel time, {f}: {shares}")
    if args.keep is None:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
