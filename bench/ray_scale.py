#!/usr/bin/env python
"""Ray executor vs local executor on one tiny study, and a study that survives losing a node mid-run.

Everything is built offline in a temporary directory: a random 2-layer, 32-wide BERT with a WordPiece tokenizer
trained here, small train/dev/test CSV files, and the 14-trial toy ladder (2 zero-shot templates, few-shot, linear
probe, full fine-tuning; 2 seeds x 2 train sizes). A private two-node Ray cluster (``ray.cluster_utils.Cluster``,
1 CPU per node, free ports, its own RAY_TMPDIR so a cluster already running here is left alone) runs it.

Output, in order:

1. Wall time of the same study run by ``LocalExecutor`` (in this process, one trial after another) and by
   ``RayExecutor`` (one Ray task per trial, two in flight), with the ratio ray/local (> 1: Ray slower).
2. Whether every trial's quality metrics (accuracy, macro_f1, per_class, confusion_matrix) are identical, trial key
   by trial key, and which worker processes (host, pid from ``record.ran_on``) ran how many trials.
3. Node failure: the study again on Ray into a fresh store; after a few trials are committed the second node is
   killed (``cluster.remove_node``, raylet and its workers gone) while a trial runs on it, and a fresh node is added
   (``--no-replace``: carry on with the head node only). Ray reruns the lost task (``max_retries``) elsewhere; the
   script checks every trial is stored exactly once, nothing failed and the metrics still equal the local run's.

Exit code 1 when metrics differ or a trial is missing, duplicated or failed. On 2 cores expect Ray to be slower.

Usage:
    python bench/ray_scale.py                 # all three runs, about a minute on 2 cores
    python bench/ray_scale.py --no-kill       # timings and metric check only
"""

from __future__ import annotations

import argparse
import collections
import csv
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tunebench.progress import StudyReporter  # noqa: E402  (light: no torch)

QUALITY = ("accuracy", "macro_f1", "per_class", "confusion_matrix")
POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful", "brilliant"]
NEGATIVE = ["awful", "terrible", "dreadful", "boring", "horrible", "poor", "dull", "bad"]
FILLER = ["the", "movie", "was", "plot", "acting", "really", "quite", "story", "film", "and", "a", "very"]


def toy_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentiment rows: the label is decided by one cue word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    return rows


def write_csv(path: Path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return str(path)


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide random BERT and a WordPiece tokenizer trained here: no download."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [t for t, _ in toy_rows(400, 0)] + POSITIVE + NEGATIVE + [str(i) for i in range(1000)]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=400, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(out)
    return out


def toy_study(tmp: Path, model_dir: Path, n_train: int, **extra) -> dict:
    """The 14-trial toy ladder (2 zero-shot templates, few-shot, linear probe, full; 2 seeds x 2 sizes)."""
    files = {"train": write_csv(tmp / "train.csv", toy_rows(n_train, 1)),
             "dev": write_csv(tmp / "dev.csv", toy_rows(16, 2)), "test": write_csv(tmp / "test.csv", toy_rows(16, 3))}
    return {"name": "toy-ladder",
            "task": {"type": "classification", "data": files, "text": "text", "label": "label",
                     "labels": {"neg": "negative", "pos": "positive"}},
            "model": {"backend": "encoder", "path": str(model_dir), "precision": "fp32"},
            "training": {"epochs": 2, "batch_size": 16, "max_length": 32},
            "strategies": [{"zero_shot": {"label_templates": ["{{ label }}", "it was {{ label }}"]}},
                           {"few_shot": {"shots": 2}}, {"linear_probe": {}}, {"full": {"epochs": 1}}],
            "seeds": [0, 1], "train_sizes": [16, "all"], **extra}


def run_study(doc: dict, tmp: Path, executor=None, reporter=None) -> tuple[list[dict], list, float]:
    from tunebench.config import StudyConfig
    from tunebench.runner import Study

    study = Study(StudyConfig.model_validate(doc), base_dir=tmp, reporter=reporter)
    t0 = time.perf_counter()
    rows = study.run(executor=executor)
    return rows, study.failures, time.perf_counter() - t0


def compare(reference: list[dict], rows: list[dict], title: str) -> bool:
    """Print whether quality metrics are identical, trial key by trial key; True when they all are."""
    by_key, bad = {r["key"]: r for r in rows}, []
    for ref in reference:
        other = by_key.get(ref["key"])
        diff = ["missing"] if other is None else [
            f"{m}: {ref['metrics'].get(m)!r} != {other['metrics'].get(m)!r}"
            for m in QUALITY if other["metrics"].get(m) != ref["metrics"].get(m)]
        if diff:
            bad.append(f"  MISMATCH {ref['label']} [{ref['key'][:12]}]: " + "; ".join(diff))
    print(f"{title}: {len(reference) - len(bad)}/{len(reference)} trials", *bad, sep="\n" if bad else "")
    return not bad and len(reference) == len(rows)


def where(rows: list[dict]) -> str:
    counts = collections.Counter(f"{r['record']['ran_on']['host']}:{r['record']['ran_on']['pid']}" for r in rows)
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def trials_on(procs: dict[int, str]) -> list[str]:
    return [t for t in procs.values() if t.startswith("ray::trial:")]


def parent(pid: int | str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children(raylet_pid: int) -> dict[int, str]:
    """Ray worker processes started by ``raylet_pid``, with their titles (ray::trial:NAME while running a trial)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and parent(pid) == raylet_pid:
            out[int(pid)] = cmd
    return out


class RayNoise:
    """stdout that shortens what Ray's driver prints from the cluster (``(raylet) ...``, with raylet log dumps) to
    its first line, once each; everything else passes through."""

    def __init__(self, stream):
        self.stream, self.seen, self.skip_newline = stream, set(), False

    def write(self, text: str) -> int:
        if self.skip_newline and text == "\n":
            self.skip_newline = False
            return 1
        if "(raylet)" in text:
            self.skip_newline = True
            line = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()[0]
            line = " ".join(re.split(r"(?<=\.)\s+", line)[:2])  # its first two sentences
            if line in self.seen:
                return len(text)
            self.seen.add(line)
            text = f"  [ray] {line}\n"
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Counting(StudyReporter):
    """A study reporter that logs each committed trial (the driver commits them as they arrive)."""

    def __init__(self):
        self.finished, self.log = 0, []

    def trial_finished(self, row: dict) -> None:
        self.finished += 1
        self.log.append((time.perf_counter(), row["label"], row["record"]["ran_on"]["pid"]))


def node_failure(cluster, second, doc: dict, tmp: Path, local: list[dict], args) -> bool:
    """Run ``doc`` on Ray in a thread; kill ``second`` while a trial runs there; check the study still completes."""
    print("\n-- node failure --")
    reporter, out = Counting(), {}

    def background():
        try:
            out["rows"], out["failures"], out["wall"] = run_study(doc, tmp, reporter=reporter)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    while thread.is_alive() and reporter.finished < args.kill_after:
        time.sleep(0.2)
    raylet, deadline = second.all_processes["raylet"][0].process.pid, time.time() + 60
    while thread.is_alive() and time.time() < deadline and not trials_on(children(raylet)):
        time.sleep(0.2)
    time.sleep(0.5)  # let the trial get into its work
    committed, workers = reporter.finished, children(raylet)
    cluster.remove_node(second, allow_graceful=False)  # SIGKILL: raylet, object store, agents; workers follow
    t_kill = time.perf_counter()
    print(f"killed node 2 (raylet pid {raylet}) after {committed} committed trials; running there: "
          f"{trials_on(workers) or 'no trial'}")
    nodes = {cluster.head_node.all_processes["raylet"][0].process.pid: "head", raylet: "killed node 2"}
    if not args.no_replace:
        fresh = cluster.add_node(num_cpus=1, object_store_memory=200_000_000)
        nodes[fresh.all_processes["raylet"][0].process.pid] = "fresh node 3"
        print("added a fresh node (1 CPU), as an autoscaler would: queued trials can use it once its worker "
              "has started")
    thread.join()
    if "error" in out:
        raise out["error"]
    rows, fails = out["rows"], out["failures"]
    for t, label, pid in reporter.log:
        if t > t_kill:
            node = "killed node 2" if pid in workers else nodes.get(parent(pid), "?")
            print(f"  committed {t - t_kill:5.1f} s after the kill: {label} (pid {pid} on {node})")
    print(f"node 2's processes still alive: {[w for w in workers if Path(f'/proc/{w}').exists()] or 'none'}")
    keys = [r["key"] for r in rows]
    once = len(keys) == len(set(keys)) == len(local)
    print(f"study finished {time.perf_counter() - t_kill:.1f} s after the kill; wall {out['wall']:.1f} s")
    print(f"trials stored: {len(rows)} of {len(local)} planned; each key exactly once: {once}")
    print(f"failures: {[(n, str(e)[:200]) for n, e in fails] or 'none'}")
    same = compare(local, rows, "metrics equal to the local run's")
    print(f"ran on: {where(rows)}")
    return same and once and not fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-train", type=int, default=64, help="training rows (the 'all' train size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the local run (Ray workers: 1 each)")
    p.add_argument("--max-retries", type=int, default=2, help="execution.max_retries for the Ray runs")
    p.add_argument("--kill-after", type=int, default=3, help="committed trials before the second node is killed")
    p.add_argument("--no-kill", action="store_true", help="skip the node-failure run")
    p.add_argument("--no-replace", action="store_true", help="after the kill, do not add a fresh node")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sys.stdout = RayNoise(sys.stdout)
    tmp = Path(tempfile.mkdtemp(prefix="tb-rayscale-"))
    os.environ["RAY_TMPDIR"] = str(tmp / "r")  # sessions and ray_current_cluster apart from /tmp/ray
    (tmp / "r").mkdir()
    cluster = None
    ok = True
    try:
        import ray
        from ray.cluster_utils import Cluster

        from tunebench.runner.executors import LocalExecutor

        doc = toy_study(tmp, tiny_model(tmp / "tiny-bert"), args.n_train)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 200_000_000})
        second = cluster.add_node(num_cpus=1, object_store_memory=200_000_000)
        ray.init(address=cluster.address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
        print(f"Ray cluster at {cluster.address}: {len(ray.nodes())} nodes, {ray.cluster_resources().get('CPU')} CPUs")
        on_ray = {"executor": "ray", "address": cluster.address, "max_retries": args.max_retries}

        local, local_fail, t_local = run_study({**doc, "store": str(tmp / "local")}, tmp, LocalExecutor())
        rayed, ray_fail, t_ray = run_study({**doc, "store": str(tmp / "ray"), "execution": on_ray}, tmp)
        print(f"\n{'executor':<10}{'trials':>8}{'wall s':>10}{'failed':>8}")
        print(f"{'local':<10}{len(local):>8}{t_local:>10.1f}{len(local_fail):>8}")
        print(f"{'ray':<10}{len(rayed):>8}{t_ray:>10.1f}{len(ray_fail):>8}")
        print(f"ratio ray/local: {t_ray / t_local:.2f}  (2 nodes x 1 CPU, {args.threads} torch thread(s) locally)")
        same = compare(local, rayed, "metrics identical")
        print(f"ran on (local): {where(local)}\nran on (ray):   {where(rayed)}")
        ok &= same and not local_fail and not ray_fail and len(rayed) == len(local) >= 12

        if not args.no_kill:
            ok &= node_failure(cluster, second, {**doc, "store": str(tmp / "ray-kill"), "execution": on_ray}, tmp,
                               local, args)

        print("\nNote: on this 2-core machine expect no speed-up from Ray. Each worker process starts Python, imports "
              "torch and transformers and loads the model once; data and results cross the object store; the two "
              "nodes share the same 2 cores with the driver and Ray's own processes; and these trials last seconds. "
              "On a real cluster the trials run in parallel across nodes and GPUs, so once a trial is long compared "
              "with a worker's start-up (minutes of fine-tuning vs ~10 s), wall time approaches total trial time "
              "divided by the parallel width. A lost node costs only the trials it was running: Ray reruns them as "
              "soon as it sees the node gone (at once when the worker's connection drops, or after the GCS health "
              "check gives up on the node, ~15 s by default); a fresh node helps only once its worker has started.")
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            sys.stdout = sys.stdout.stream
    print(f"\n{'OK' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
