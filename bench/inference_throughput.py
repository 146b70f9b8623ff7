#!/usr/bin/env python
"""Inference throughput and fidelity: tunebench's encoder paths vs a plain fp32 PyTorch forward.

1. Embeddings: ``EncoderBackend.embed(texts)`` (bf16 autocast where the CPU/GPU supports it,
   length-sorted dynamically padded batches) vs ``AutoModel`` + ``AutoTokenizer`` in fp32, batches of the
   same size in the original order with ``padding=True``, mean pooling, ``torch.inference_mode``.
   Quality check: mean cosine similarity between the two sets of embeddings.
2. Classifier predict (skip with ``--no-classifier``): a ``full``-strategy predictor (briefly fine-tuned
   on ``--clf-train`` SST-2 train examples so its predictions mean something) ``.predict_scores(texts)``
   vs a plain fp32 forward of the same classifier module on the same batches as in 1.
   Quality check: label agreement and max |logit difference|.

Both sides tokenize inside the timed region. A short warm-up of each path runs first.

Usage:
    python bench/inference_throughput.py                  # 4,000 SST-2 dev sentences
    python bench/inference_throughput.py --n 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, read_tsv  # noqa: E402

TARGET_RATIO = 2.5
TARGET_COS = 0.99


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="SST-2 dev sentences to encode (first N of a fixed-seed shuffle)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of both sides (embed's default is 128)")
    p.add_argument("--max-length", type=int, default=256, help="truncation length for embeddings (embed's default)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="tunebench precision")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per side (alternating); median reported")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier predict comparison")
    p.add_argument("--clf-train", type=int, default=500, help="train examples for the quick classifier fine-tune")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides (None: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def alternate(fn_a, fn_b, repeats: int):
    """Run a, b, a, b ...; returns (out_a, median_a, out_b, median_b)."""
    ta, tb, oa, ob = [], [], None, None
    for _ in range(repeats):
        oa, t = timed(fn_a, 1)
        ta.append(t)
        ob, t = timed(fn_b, 1)
        tb.append(t)
    return oa, statistics.median(ta), ob, statistics.median(tb)


def main(argv=None) -> int:
    args = parse_args(argv)
    sst2 = DATA.resolve() / "sst2"
    if not (sst2 / "dev.tsv").is_file() or (not args.no_classifier and not (sst2 / "train.tsv").is_file()):
        print(f"SKIP: SST-2 data not found under {sst2} (expected dev.tsv and train.tsv); nothing to benchmark.")
        return 0

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from tunebench.backends import load_backend
    from tunebench.backends.encoder import default_model_dir
    from tunebench.config import ModelConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dv_texts, dv_labels = read_tsv(sst2 / "dev.tsv")
    order = np.random.default_rng(args.seed).permutation(len(dv_texts))[: args.n]
    texts = [dv_texts[i] for i in order]
    bs = args.batch_size

    backend = load_backend(ModelConfig(path="default", precision=args.precision))
    precision = backend.describe()["precision"]
    path = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def plain_embed(batch_texts):
        out = []
        for s in range(0, len(batch_texts), bs):
            enc = tok(batch_texts[s : s + bs], padding=True, truncation=True, max_length=args.max_length,
                      return_tensors="pt")
            hidden = plain(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
        return torch.cat(out)

    def tb_embed(batch_texts):
        return backend.embed(batch_texts, batch_size=bs, max_length=args.max_length)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(texts)} SST-2 dev sentences, "
          f"batch {bs}, max_length {args.max_length}; tunebench precision {precision} (requested {args.precision}); "
          f"median of {args.repeats} alternating run(s)", flush=True)
    plain_embed(texts[:bs])  # warm-up
    tb_embed(texts[:bs])
    e_tb, t_tb, e_pl, t_pl = alternate(lambda: tb_embed(texts), lambda: plain_embed(texts), args.repeats)
    cos = torch.nn.functional.cosine_similarity(e_tb.float(), e_pl.float(), dim=-1)
    eps_tb, eps_pl = len(texts) / t_tb, len(texts) / t_pl
    ratio = eps_tb / eps_pl

    print()
    print(f"== encoder inference (embeddings), {len(texts)} sentences ==")
    print(f"tunebench embed examples/s:   {eps_tb:.1f}  ({t_tb:.2f}s, precision {precision}, length-sorted batches)")
    print(f"plain fp32 examples/s:        {eps_pl:.1f}  ({t_pl:.2f}s, original order, padding=True)")
    print(f"ratio tunebench/plain:        {ratio:.2f}x   target >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"mean cosine similarity:       {cos.mean().item():.6f} (min {cos.min().item():.6f})   "
          f"target > {TARGET_COS}: {'PASS' if cos.mean().item() > TARGET_COS else 'FAIL'}")

    if args.no_classifier:
        return 0

    from tunebench.config import LabelSpec
    from tunebench.data import Split, TaskData
    from tunebench.strategies import registry
    from tunebench.strategies.full import FullConfig

    tr_texts, tr_labels = read_tsv(sst2 / "train.tsv")
    pick = np.random.default_rng(args.seed).permutation(len(tr_texts))[: args.clf_train + 200]
    full_train = Split("train", [tr_texts[i] for i in pick], np.asarray([tr_labels[i] for i in pick], dtype=np.int64))
    train = full_train.subset(range(args.clf_train))
    select = full_train.subset(range(args.clf_train, len(full_train)))
    labels = [LabelSpec(value="0", name="negative"), LabelSpec(value="1", name="positive")]
    task = TaskData(config=None, labels=labels, train=train, dev=select, test=select)
    cfg = FullConfig(epochs=1)
    torch.manual_seed(args.seed)
    print(f"\nfine-tuning a 'full' classifier on {len(train)} train examples (1 epoch) for the predict comparison ...",
          flush=True)
    predictor = registry.get("full")(cfg, seed=args.seed).adapt(backend, task, train=train, dev=select)
    clf = predictor.model.eval()

    @torch.inference_mode()
    def plain_logits(batch_texts):
        out = []
        for s in range(0, len(batch_texts), bs):
            enc = tok(batch_texts[s : s + bs], padding=True, truncation=True, max_length=cfg.max_length,
                      return_tensors="pt")
            out.append(clf(enc["input_ids"], enc["attention_mask"]).float())
        return torch.cat(out).numpy()

    plain_logits(texts[:bs])
    predictor.predict_scores(texts[:bs])
    s_tb, t_tb, s_pl, t_pl = alternate(lambda: predictor.predict_scores(texts), lambda: plain_logits(texts),
                                       args.repeats)
    eps_tb, eps_pl = len(texts) / t_tb, len(texts) / t_pl
    ratio = eps_tb / eps_pl
    agree = float((s_tb.argmax(1) == s_pl.argmax(1)).mean())
    y = np.asarray([dv_labels[i] for i in order])
    print()
    print(f"== classifier predict ('full' predictor), {len(texts)} sentences ==")
    print(f"tunebench predict examples/s: {eps_tb:.1f}  ({t_tb:.2f}s, precision {precision})")
    print(f"plain fp32 examples/s:        {eps_pl:.1f}  ({t_pl:.2f}s, original order, padding=True)")
    print(f"ratio tunebench/plain:        {ratio:.2f}x   target >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"label agreement:              {100 * agree:.2f}%   max |logit diff| {np.abs(s_tb - s_pl).max():.2e}")
    print(f"dev accuracy (these {len(texts)}): tunebench {100 * float((s_tb.argmax(1) == y).mean()):.2f}, "
          f"plain {100 * float((s_pl.argmax(1) == y).mean()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
