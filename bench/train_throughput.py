#!/usr/bin/env python
"""Training throughput and quality: tunebench full fine-tuning vs the Hugging Face Trainer reference recipe.

Both sides fine-tune the default model (all-MiniLM-L6-v2) on the same SST-2 training subset (the first
``--n-train`` examples of train.tsv after a fixed-seed shuffle) with the same epochs, batch size, learning
rate and max_length, in one process, one after the other:

* tunebench: the ``full`` strategy (``tunebench.strategies.training.fit``), precision ``auto``.
  ``fit`` keeps the best epoch on a dev split; to keep the SST-2 dev set unseen until scoring, that
  selection split is ``--n-select`` further examples of the shuffled train file (disjoint from the
  training subset).
* reference: ``transformers.Trainer`` in fp32 with ``DataCollatorWithPadding`` on
  ``AutoModelForSequenceClassification`` (Trainer defaults otherwise: no warm-up, no weight decay,
  no eval, no saving, logging only at the end, CPU).

Throughput is training examples/s = examples x epochs / training wall time (tunebench:
``TrainResult.train_seconds``, the timed optimisation loop; reference: Trainer's ``train_runtime``).
Both models are then scored on the SST-2 dev set.

Usage:
    python bench/train_throughput.py                       # 2,000 examples, 2 epochs, full dev set
    python bench/train_throughput.py --dev-limit 2000      # fixed 2,000-example dev subset
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, read_tsv, task_config  # noqa: E402

TARGET_RATIO = 2.5
TARGET_ACC_POINTS = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000, help="training examples (after a fixed-seed shuffle)")
    p.add_argument("--epochs", type=int, default=2, help="epochs, both sides")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size, both sides")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, both sides")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per input, both sides")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="score on a fixed-seed subset of this many dev examples (None: the full dev set)")
    p.add_argument("--n-select", type=int, default=500,
                   help="held-out train examples tunebench's fit uses to pick its best epoch")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="tunebench precision")
    p.add_argument("--eval-batch-size", type=int, default=128, help="reference's batch size when scoring dev")
    p.add_argument("--repeats", type=int, default=1,
                   help="train each side this many times, alternating (tunebench, reference, ...); the median "
                        "examples/s is reported; dev scoring runs on the first repeat only (runs are seeded)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides (None: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_tunebench(args, train, select, dev, *, score: bool = True):
    import torch
    import transformers

    from tunebench.backends import load_backend
    from tunebench.config import LabelSpec, ModelConfig
    from tunebench.data import TaskData
    from tunebench.strategies import registry
    from tunebench.strategies.full import FullConfig

    transformers.utils.logging.disable_progress_bar()
    backend = load_backend(ModelConfig(path="default", precision=args.precision))
    labels = [LabelSpec(value="0", name="negative"), LabelSpec(value="1", name="positive")]
    task = TaskData(config=task_config(), labels=labels, train=train, dev=select, test=dev)
    cfg = FullConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, max_length=args.max_length)
    torch.manual_seed(args.seed)  # the head's initialisation happens before fit seeds itself
    t0 = time.perf_counter()
    predictor = registry.get("full")(cfg, seed=args.seed).adapt(backend, task, train=train, dev=select)
    adapt_s = time.perf_counter() - t0
    result = predictor.train_result
    acc = score_s = float("nan")
    if score:
        t0 = time.perf_counter()
        pred = predictor.predict(dev.texts)
        score_s = time.perf_counter() - t0
        acc = float((pred == dev.labels).mean())
    return {"eps": result.examples_per_s, "train_s": result.train_seconds, "adapt_s": adapt_s,
            "acc": acc, "score_s": score_s, "precision": backend.describe()["precision"],
            "best_epoch": result.best_epoch, "history": result.history}


def run_reference(args, train, dev, *, score: bool = True):
    import datasets
    import numpy as np
    import transformers
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    from tunebench.backends.encoder import default_model_dir

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    path = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    transformers.set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def encode(texts, labels):
        ds = Dataset.from_dict({"sentence": texts, "label": [int(y) for y in labels]})
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=args.max_length),
                      batched=True, remove_columns=["sentence"])

    train_ds, dev_ds = encode(train.texts, train.labels), encode(dev.texts, dev.labels)
    outdir = tempfile.mkdtemp(prefix="tunebench-bench-trainer-")  # nothing is saved; removed below
    targs = TrainingArguments(
        output_dir=outdir, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=args.seed,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    out = trainer.train()
    wall_s = time.perf_counter() - t0
    runtime = float(out.metrics["train_runtime"])
    acc = score_s = float("nan")
    if score:
        t0 = time.perf_counter()
        logits = trainer.predict(dev_ds).predictions
        score_s = time.perf_counter() - t0
        acc = float((np.asarray(logits).argmax(-1) == dev.labels).mean())
    shutil.rmtree(outdir, ignore_errors=True)
    return {"eps": len(train) * args.epochs / runtime, "train_s": runtime, "wall_s": wall_s, "acc": acc,
            "score_s": score_s, "optim": str(targs.optim), "train_loss": float(out.metrics.get("train_loss", "nan"))}


def scored(res: dict) -> str:
    if res["acc"] != res["acc"]:  # nan: not scored on this repeat
        return "dev not scored on this repeat"
    return f"dev acc {res['acc']:.4f} (scored in {res['score_s']:.1f}s)"


def main(argv=None) -> int:
    args = parse_args(argv)
    sst2 = DATA.resolve() / "sst2"
    if not ((sst2 / "train.tsv").is_file() and (sst2 / "dev.tsv").is_file()):
        print(f"SKIP: SST-2 data not found under {sst2} (expected train.tsv and dev.tsv); nothing to benchmark.")
        return 0

    import numpy as np
    import torch

    from tunebench.data import Split

    if args.threads:
        torch.set_num_threads(args.threads)
    tr_texts, tr_labels = read_tsv(sst2 / "train.tsv")
    dv_texts, dv_labels = read_tsv(sst2 / "dev.tsv")
    if args.n_train + args.n_select > len(tr_texts):
        print(f"error: --n-train + --n-select exceeds the {len(tr_texts)} training examples", file=sys.stderr)
        return 2
    full_train = Split("train", tr_texts, np.asarray(tr_labels, dtype=np.int64))
    order = np.random.default_rng(args.seed).permutation(len(full_train))
    train = full_train.subset(order[: args.n_train])
    select = full_train.subset(order[args.n_train : args.n_train + args.n_select])
    select.name = "select"
    dev = Split("dev", dv_texts, np.asarray(dv_labels, dtype=np.int64))
    if args.dev_limit and args.dev_limit < len(dev):
        dev = dev.subset(np.sort(np.random.default_rng(args.seed + 1).permutation(len(dev))[: args.dev_limit]))
        dev_desc = f"fixed-seed subset of {len(dev)} of {len(dv_texts)} dev examples"
    else:
        dev_desc = f"full dev set ({len(dev)} examples)"

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SST-2 train subset {len(train)} "
          f"(+{len(select)} held out for tunebench's epoch selection), epochs {args.epochs}, batch {args.batch_size}, "
          f"lr {args.lr:g}, max_length {args.max_length}; scoring on the {dev_desc}", flush=True)

    tb_eps, ref_eps = [], []
    tb = ref = {}  # the first repeat's results (scored); later repeats add only their speed
    for r in range(max(1, args.repeats)):
        first = r == 0
        res = run_tunebench(args, train, select, dev, score=first)
        tb = res if first else tb
        tb_eps.append(res["eps"])
        print(f"[{r + 1}] tunebench done: {res['eps']:.1f} ex/s ({res['train_s']:.1f}s training, {res['adapt_s']:.1f}s "
              f"adapt incl. tokenization and per-epoch selection eval), best epoch {res['best_epoch']}, "
              f"{scored(res)}", flush=True)
        res = run_reference(args, train, dev, score=first)
        ref = res if first else ref
        ref_eps.append(res["eps"])
        print(f"[{r + 1}] reference done: {res['eps']:.1f} ex/s ({res['train_s']:.1f}s train_runtime, {res['wall_s']:.1f}s "
              f"wall), optim {res['optim']}, final train loss {res['train_loss']:.4f}, {scored(res)}", flush=True)
    tb["eps"], ref["eps"] = statistics.median(tb_eps), statistics.median(ref_eps)
    runs = f" (median of {len(tb_eps)})" if len(tb_eps) > 1 else ""

    ratio = tb["eps"] / ref["eps"]
    diff = 100.0 * (tb["acc"] - ref["acc"])
    ok_ratio = ratio >= TARGET_RATIO
    ok_acc = abs(diff) <= TARGET_ACC_POINTS
    print()
    print(f"== training throughput, full fine-tuning, SST-2 ({len(train)} examples x {args.epochs} epochs) ==")
    print(f"tunebench precision:          {tb['precision']} (requested {args.precision})")
    print(f"tunebench examples/s:         {tb['eps']:.1f}{runs}")
    print(f"reference examples/s:         {ref['eps']:.1f}{runs}  (HF Trainer, fp32)")
    print(f"ratio tunebench/reference:    {ratio:.2f}x   target >= {TARGET_RATIO}: {'PASS' if ok_ratio else 'FAIL'}")
    print(f"dev accuracy ({dev_desc}):")
    print(f"  tunebench:                  {100 * tb['acc']:.2f}")
    print(f"  reference:                  {100 * ref['acc']:.2f}")
    print(f"  difference (points):        {diff:+.2f}   target |diff| <= {TARGET_ACC_POINTS:g}: "
          f"{'PASS' if ok_acc else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
