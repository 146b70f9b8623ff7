#!/usr/bin/env python
"""Label scoring speed: the causal backend's prefix-KV-cache scoring vs naive scoring, side by side.

The workload is a few-shot classification study's scoring step, built on the product path:
``PromptBuilder`` + ``CLASSIFY_TEMPLATE`` render every test input after the same fixed demonstrations
(``--shots`` per class, picked by ``select_demonstrations``), ``CausalBackend.format_prompt`` /
``prompt_ids`` / ``answer_ids`` tokenize prompts and label names, and ``CausalBackend.score`` returns the
summed log-probability of every label after every prompt (all inputs x all labels), once with
``cache=False`` (each (prompt, label) pair a full forward pass) and once with ``cache=True`` (the prefix
shared by all prompts runs once, each prompt once, and the label continuations reuse that KV cache).
Both must give the same scores (``np.allclose``, atol 1e-3). Only ``score`` is timed; both sides get the
same token ids and batch size.

Inputs and labels are BANKING77 queries and intents (snake_case names read as words, e.g. "card
arrival") from ../shared/data when present, otherwise generated banking-style sentences. No pretrained
causal LM is needed: the script trains a byte-level BPE tokenizer on that text and builds a randomly
initialised Llama in a temporary directory, loaded through ``load_backend``; scoring speed does not
depend on the weights being trained. fp32 on the CPU (or the GPU when there is one).

Usage:
    python bench/prefix_cache.py                         # 200 inputs x 8 labels, 2 shots per class
    python bench/prefix_cache.py --shots 0 --labels 4    # zero-shot: little shared prefix
    python bench/prefix_cache.py --hidden 512 --layers 8 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_RATIO = 2.0
ATOL = 1e-3

# Fallback when ../shared/data/banking77 is absent: BANKING77-style intents and generated queries.
SYNTH_LABELS = ["card_arrival", "exchange_rate", "card_linking", "pending_cash_withdrawal", "automatic_top_up",
                "lost_or_stolen_card", "pin_blocked", "cancel_transfer", "top_up_limits", "age_limit",
                "card_not_working", "contactless_not_working", "extra_charge_on_statement", "fiat_currency_support",
                "exchange_via_app", "card_delivery_estimate"]
_OPENERS = ["Hi,", "Hello,", "Please help:", "Quick question:", "", "", "Hey there,", "Excuse me,"]
_ASKS = ["can you tell me", "I would like to know", "could you explain", "I need to find out", "please tell me",
         "I am confused about", "what is going on with", "how do I check"]
_OBJECTS = ["my card", "the transfer I made yesterday", "my account balance", "the exchange rate", "my top up",
            "the cash withdrawal", "my PIN", "the payment to a shop", "the fee on my statement", "the app",
            "my new debit card", "a refund from last week", "the money I sent to a friend", "my virtual card"]
_TAILS = ["as soon as possible?", "because it still has not arrived.", "since it looks wrong to me.",
          "after I travelled abroad last month.", "when I tried to pay online?", "and why it takes so long.",
          "before the weekend please.", "for my holiday in Spain?", "?", "."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--inputs", type=int, default=200, help="test inputs to score (each against every label)")
    p.add_argument("--labels", type=int, default=8, help="classes (the first N BANKING77 intents)")
    p.add_argument("--shots", type=int, default=2, help="fixed demonstrations per class, shared by every prompt")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per side, alternating (naive, cached, ...); the median is reported")
    p.add_argument("--hidden", type=int, default=256, help="Llama hidden size (intermediate = 2.6875 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="Llama layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads (and key/value heads)")
    p.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size")
    p.add_argument("--batch-size", type=int, default=16,
                   help="score() batch size, both sides (the CausalPredictor uses 16)")
    p.add_argument("--chat", action="store_true", help="give the tokenizer a chat template (prompts wrapped in it)")
    p.add_argument("--synthetic", action="store_true", help="generated text even when BANKING77 is present")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides (None: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_rows(args) -> tuple[list[tuple[str, str]], str]:
    """(text, snake_case label) rows restricted to the first ``--labels`` intents, and a description."""
    path = DATA.resolve() / "banking77" / "train.csv"
    if path.is_file() and not args.synthetic:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
        cats_file = path.parent / "categories.json"
        cats = json.loads(cats_file.read_text()) if cats_file.is_file() else list(dict.fromkeys(c for _, c in rows))
        keep = set(cats[: args.labels])
        return [r for r in rows if r[1] in keep], f"BANKING77 ({path.parent})"
    if args.labels > len(SYNTH_LABELS):
        raise SystemExit(f"error: generated data has {len(SYNTH_LABELS)} labels; --labels {args.labels} "
                         "needs BANKING77")
    rng = random.Random(args.seed)
    per_class = max(40, args.inputs // args.labels + args.shots + 10)
    rows = []
    for lab in SYNTH_LABELS[: args.labels]:
        topic = lab.replace("_", " ")
        for _ in range(per_class):
            text = " ".join(w for w in (rng.choice(_OPENERS), rng.choice(_ASKS), rng.choice(_OBJECTS), "and the",
                                        topic, rng.choice(_TAILS)) if w)
            rows.append((text.replace(" ?", "?").replace(" .", "."), lab))
    return rows, "generated banking-style queries (BANKING77 not found or --synthetic)"


def build_model(out: Path, corpus: list[str], args) -> None:
    """Train a byte-level BPE tokenizer on ``corpus`` and save it with a random Llama under ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if args.chat:
        fast.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(out)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=4096, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)


def system_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def shared_prefix(seqs: list[list[int]]) -> int:
    return len(os.path.commonprefix(seqs)) if seqs else 0


def main(argv=None) -> int:
    args = parse_args(argv)

    import numpy as np
    import torch
    import transformers

    from tunebench.backends import load_backend
    from tunebench.config import ModelConfig
    from tunebench.prompts import CLASSIFY_TEMPLATE, PromptBuilder, demo_record, select_demonstrations

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    rows, source = load_rows(args)
    names = list(dict.fromkeys(lab for _, lab in rows))
    if len(names) < args.labels:
        print(f"error: only {len(names)} labels available", file=sys.stderr)
        return 2
    label_id = {lab: i for i, lab in enumerate(names)}
    y = np.asarray([label_id[lab] for _, lab in rows], dtype=np.int64)
    demo_idx = select_demonstrations(y, args.shots, "balanced", args.seed, True) if args.shots else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(len(rows)), demo_idx)
    test_idx = np.random.default_rng(args.seed + 1).permutation(rest)[: args.inputs]
    if len(test_idx) < args.inputs:
        print(f"note: only {len(test_idx)} inputs available (asked for {args.inputs})")
    label_names = [n.replace("_", " ") for n in names]  # "card_arrival" -> "card arrival"

    builder = PromptBuilder(CLASSIFY_TEMPLATE, "classification", None,
                            [{"name": n, "description": None} for n in label_names],
                            [demo_record({"input": rows[i][0]}, label_names[int(y[i])]) for i in demo_idx])

    with tempfile.TemporaryDirectory(prefix="tunebench-prefix-cache-") as tmp:
        corpus = [t for t, _ in rows] + label_names + [builder.render({"input": rows[int(test_idx[0])][0]})]
        build_model(Path(tmp), corpus, args)
        backend = load_backend(ModelConfig(backend="causal", path=tmp, precision="fp32"))

    prompts = [backend.prompt_ids(backend.format_prompt(builder.render({"input": rows[int(i)][0]})))
               for i in test_idx]
    options = [backend.answer_ids(n) for n in label_names]
    conts = [options] * len(prompts)
    n, k, bs = len(prompts), len(options), args.batch_size
    lens = [len(p) for p in prompts]
    shared = max(0, min(shared_prefix(prompts), min(lens) - 1))
    opt_lens = [len(o) for o in options]
    # tokens each side feeds through the model, padding aside (the cached side: the shared prefix once, each
    # prompt's rest once, then every label after its prompt unless all labels are single tokens)
    naive_tokens = sum(lens) * k + n * sum(opt_lens)
    cached_tokens = shared + sum(lens) - n * shared + (n * sum(opt_lens) if max(opt_lens) > 1 else 0)
    params = sum(p.numel() for p in backend.model.parameters())

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"device {backend.device}, fp32; random Llama {args.layers} layers x {args.hidden} hidden, "
          f"{args.heads} heads, "
          f"{params / 1e6:.1f}M parameters, BPE vocab {len(backend.tokenizer)}; chat template "
          f"{'on' if backend.chat else 'off'}; data: {source}; score batch {bs}; median of {args.repeats} "
          f"alternating run(s)", flush=True)

    def run(cache: bool, upto: int | None = None):
        return backend.score(prompts[:upto], conts[:upto], cache=cache, batch_size=bs)

    threads = torch.get_num_threads()
    others: dict[bool, list[float]] = {False: [], True: []}  # cores other processes kept busy, per timed run

    def timed(cache: bool):
        b0, c0, t0 = system_busy_seconds(), time.process_time(), time.perf_counter()
        out = run(cache)
        wall = time.perf_counter() - t0
        b1 = system_busy_seconds()
        if b0 is not None and b1 is not None:
            others[cache].append(max(0.0, (b1 - b0) - (time.process_time() - c0)) / wall)
        return out, wall

    run(False, -(-bs // k))  # warm-up: one batch of each path (naive batches are input-label pairs)
    run(True, bs)
    t_naive, t_cached = [], []
    for r in range(max(1, args.repeats)):
        (tot_n, cnt_n), t = timed(False)
        t_naive.append(t)
        (tot_c, cnt_c), t = timed(True)
        t_cached.append(t)
        print(f"[{r + 1}] naive {t_naive[-1]:.2f}s, cached {t_cached[-1]:.2f}s", flush=True)
    sec_naive, sec_cached = statistics.median(t_naive), statistics.median(t_cached)
    ratio = sec_naive / sec_cached
    same = bool(np.array_equal(cnt_n, cnt_c) and np.allclose(tot_n, tot_c, atol=ATOL, rtol=0))
    max_diff = float(np.abs(tot_n - tot_c).max())
    agree = float(((tot_n / cnt_n).argmax(1) == (tot_c / cnt_c).argmax(1)).mean())
    busy = {c: f", other processes used {max(v):.2f} cores" if v else "" for c, v in others.items()}
    worst = max(others[False] + others[True], default=0.0)
    ok = ratio >= TARGET_RATIO

    print()
    print(f"== label scoring, {n} inputs x {k} labels ({args.shots} shot(s) per class, "
          f"{len(demo_idx)} demonstrations) ==")
    print(f"inputs:                       {n}")
    print(f"labels:                       {k}  (label tokens mean {statistics.mean(opt_lens):.2f}, "
          f"min {min(opt_lens)}, max {max(opt_lens)})")
    print(f"prompt tokens (mean):         {statistics.mean(lens):.1f}  (min {min(lens)}, max {max(lens)})")
    print(f"shared prefix tokens:         {shared}  ({100 * shared / statistics.mean(lens):.0f}% of the mean prompt)")
    print(f"tokens through the model:     naive {naive_tokens:,}, cached {cached_tokens:,} "
          f"({naive_tokens / max(cached_tokens, 1):.1f}x fewer)")
    print(f"seconds naive (cache=False):  {sec_naive:.2f}  ({n * k / sec_naive:.1f} input-label pairs/s"
          f"{busy[False]})")
    print(f"seconds cached (cache=True):  {sec_cached:.2f}  ({n * k / sec_cached:.1f} input-label pairs/s"
          f"{busy[True]})")
    print(f"same scores:                  {'yes' if same else 'NO'}  (max |diff| {max_diff:.2e}, atol {ATOL:g}; "
          f"argmax agreement {100 * agree:.1f}%)")
    print(f"speedup (naive / cached): {ratio:.2f}x   target >= {TARGET_RATIO:g}x: {'PASS' if ok else 'FAIL'}")
    if worst > 0.25:
        # with one torch thread per core, every parallel op waits for a preempted thread: that hurts the cached
        # path's many small ops far more than the naive path's few large ones
        hint = " or with --threads 1" if threads > 1 else ""
        print(f"warning: other processes kept {worst:.2f} of {os.cpu_count()} cores busy during a timed run, so "
              f"the timings (the cached side's especially) are inflated; rerun on an idle machine{hint}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
