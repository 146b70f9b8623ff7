#!/usr/bin/env python
"""Load on `tunebench serve`: N concurrent clients for a bounded time, two server settings side by side.

1. Trains (once, into a temporary store) the served trial: an encoder classifier on the default
   all-MiniLM-L6-v2 from ``--train`` SST-2 train sentences (toy data when ../shared is absent): ``linear_probe``
   for ``--compare batching`` (serving cost is the same as a fully fine-tuned one's: the whole encoder runs on
   every request), ``full`` fine-tuning (3 epochs) for ``--compare runtime``, whose int8 agreement is what a user
   shipping a fine-tuned classifier meets (a frozen encoder's probe has small logit margins that int8 flips more).
2. Starts ``tunebench serve STUDY --best`` on loopback twice, one after the other, with the same trial:
   * ``--compare batching`` (default): micro-batching on (``--max-batch 32 --batch-window-ms 5``) and off
     (``--max-batch 1 --batch-window-ms 0``);
   * ``--compare runtime``: PyTorch fp32 (``--runtime torch``) and the ONNX int8 graph (``--runtime onnx``, which
     exports the trial on its first start) with its near ties rechecked in fp32 and alone
     (``--onnx-recheck-margin 0``), all micro-batching.
3. Each time, ``--clients`` asyncio clients (httpx, one connection each) send ``/v1/classify`` requests (one
   SST-2 dev sentence each, bearer key) back to back for ``--seconds``; every answer is checked (HTTP 200 and
   a label). Prints requests/s, p50/p95 latency and the error count for both, and the ratio; ``runtime`` also
   prints the label agreement of the two servers on the inputs both answered.

Targets: zero errors at 64 concurrent clients; micro-batching >= 2x the requests/s of batch-size-1 (issue 5);
ONNX int8 >= 2x the requests/s of PyTorch fp32 with >= 99.5% label agreement (issue 20).

``--stream``: streamed generation instead. Serves a causal LM (``tunebench serve --model``; ``--stream-model
DIR``, default a tiny random Llama built here as the tests build it, since no small causal LM is available
offline) with micro-batching on; clients send ``/v1/completions`` with ``stream: true`` and time the first
content chunk (first-token latency) and the whole answer, then the same requests unstreamed for reference (where
the first text is the whole answer). Prints p50/p95 of both, requests/s, generated tokens/s and errors.

Usage:
    python bench/serve_load.py                     # 64 clients, 20 s per mode
    python bench/serve_load.py --compare runtime
    python bench/serve_load.py --clients 16 --seconds 10
    python bench/serve_load.py --stream --clients 8 --seconds 10 [--stream-model DIR] [--stream-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, read_tsv  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_trial(root: Path, n_train: int, strategy: str = "linear_probe") -> tuple[str, list[str]]:
    """A finished study with one encoder classifier; returns its name and the texts clients send."""
    import yaml

    sst = DATA / "sst2"
    if (sst / "train.tsv").is_file():
        texts, labels = read_tsv(sst / "train.tsv")
        dev_texts, dev_labels = read_tsv(sst / "dev.tsv")
        names = ["negative", "positive"]
        source = "SST-2"
    else:  # a fresh clone without ../shared: toy sentiment data
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import toy_rows

        rows = toy_rows(n_train + 400, 0)
        texts, labels = [t for t, _ in rows[:n_train]], [int(y == "pos") for _, y in rows[:n_train]]
        dev_texts, dev_labels = [t for t, _ in rows[n_train:]], [int(y == "pos") for _, y in rows[n_train:]]
        names = ["negative", "positive"]
        source = "toy data (../shared/data absent)"
    rng = np.random.default_rng(0)
    pick = rng.choice(len(texts), size=min(n_train, len(texts)), replace=False)

    def write(path: Path, xs, ys):
        with open(path, "w", encoding="utf-8") as f:
            f.write("text\tlabel\n")
            for x, y in zip(xs, ys):
                f.write(x.replace("\t", " ") + "\t" + names[int(y)] + "\n")
        return str(path)

    data = {"train": write(root / "train.tsv", [texts[i] for i in pick], [labels[i] for i in pick]),
            "dev": write(root / "dev.tsv", dev_texts[:200], dev_labels[:200]),
            "test": write(root / "test.tsv", dev_texts[200:600], dev_labels[200:600])}
    study = {"name": "serve-load", "task": {"data": data, "text": "text", "label": "label"},
             "model": {"path": "default"},
             "strategies": [{strategy: {"epochs": 3, "batch_size": 32}}],
             "consistency": {"perturbations": []}, "store": "runs"}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    print(f"training the served trial ({strategy}, {len(pick)} {source} sentences) ...", flush=True)
    subprocess.run([sys.executable, "-m", "tunebench", "run", str(path)], check=True, stdout=subprocess.DEVNULL)
    return str(path), dev_texts


def start_server(study: str, batching: bool, runtime: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    args = ["--max-batch", "32", "--batch-window-ms", "5"] if batching else ["--max-batch", "1",
                                                                              "--batch-window-ms", "0"]
    args += list(runtime)
    return launch(["serve", study, "--best", *args], tries=3000)  # an ONNX runtime exports on its first start


def launch(serve_args: list[str], tries: int = 600) -> tuple[subprocess.Popen, str]:
    """``tunebench SERVE_ARGS --port P --threads T`` on loopback, once ``/health`` answers (``tries`` x 0.2 s)."""
    import httpx

    port = free_port()
    # the load generator runs on the same machine: leave it a core (the same for every mode)
    threads = str(max(1, (os.cpu_count() or 2) - 1))
    proc = subprocess.Popen([sys.executable, "-m", "tunebench", *serve_args, "--port", str(port), "--threads", threads],
                            env={**os.environ, "TUNEBENCH_API_KEY": KEY, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        if proc.poll() is not None:
            raise SystemExit("the server exited while starting")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def drive(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    answers: dict[str, str] = {}  # input -> the label served for it
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            k = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    text = texts[k % len(texts)]
                    r = await c.post("/v1/classify", json={"input": text})
                    ok = r.status_code == 200 and r.json()["data"][0]["label"] is not None
                    if ok:
                        answers[text] = r.json()["data"][0]["label"]
                    else:
                        errors.append(f"{r.status_code}: {r.text[:120]}")
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                k += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "errors": len(errors), "first_errors": errors[:3],
            "answers": answers}


# ---- streamed generation: first-token latency ---------------------------------------------------------------
STREAM_PROMPTS = ["The river", "Once upon a time", "A red apple", "The weather today", "My favourite film",
                  "In the garden", "The castle stood", "Tell me about the ocean"]


def tiny_causal_lm(root: Path) -> Path:
    """A random 2-layer, 64-wide Llama with a byte-level BPE tokenizer trained here (the tests' model): its
    latencies measure the serving path (HTTP, micro-batching, streaming), not a real model's compute."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import _bpe_tokenizer

    out = root / "tiny-llama"
    out.mkdir()
    tok = _bpe_tokenizer(out, chat=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def start_lm_server(model: Path | str) -> tuple[subprocess.Popen, str]:
    """``tunebench serve --model`` with micro-batching on (``--max-batch 32 --batch-window-ms 5``)."""
    return launch(["serve", "--model", str(model), "--name", "lm", "--precision", "fp32", "--max-batch", "32",
                   "--batch-window-ms", "5"])


async def drive_stream(url: str, clients: int, seconds: float, max_tokens: int, stream: bool) -> dict:
    """Clients send completions back to back; each answer's time to its first text and to its end."""
    import json

    import httpx

    first: list[float] = []
    total: list[float] = []
    tokens = 0
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    body = {"model": "lm", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}

    async def one(c, prompt: str) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        if not stream:
            r = await c.post("/v1/completions", json={**body, "prompt": prompt})
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:120]}")
            first.append(time.perf_counter() - t0)
            total.append(first[-1])
            tokens += r.json()["usage"]["completion_tokens"]
            return
        t_first = None
        async with c.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread())[:120]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if t_first is None and event["choices"] and event["choices"][0]["text"]:
                    t_first = time.perf_counter() - t0
                if event.get("usage"):
                    tokens += event["usage"]["completion_tokens"]
        total.append(time.perf_counter() - t0)
        first.append(t_first if t_first is not None else total[-1])  # an empty answer: its end

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            k = i
            while time.perf_counter() < stop_at:
                try:
                    await one(c, STREAM_PROMPTS[k % len(STREAM_PROMPTS)])
                except (httpx.HTTPError, RuntimeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                k += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")

    return {"requests": len(total), "rps": len(total) / elapsed, "tps": tokens / elapsed,
            "first_p50": pct(first, 50), "first_p95": pct(first, 95), "total_p50": pct(total, 50),
            "total_p95": pct(total, 95), "errors": len(errors), "first_errors": errors[:3]}


def stream_main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="tunebench-stream-") as tmp:
        model = args.stream_model
        if model is None:
            print("building a tiny random Llama (2 layers, 64 wide; no small causal LM is available offline): "
                  "figures measure the serving path, not a real model", flush=True)
            model = tiny_causal_lm(Path(tmp))
        proc, url = start_lm_server(model)
        results = {}
        try:
            asyncio.run(drive_stream(url, args.clients, 2.0, args.stream_tokens, True))  # warm-up
            for name, stream in (("streamed", True), ("not streamed", False)):
                print(f"{name}: {args.clients} clients for {args.seconds:g} s, max_tokens {args.stream_tokens} ...",
                      flush=True)
                results[name] = asyncio.run(drive_stream(url, args.clients, args.seconds, args.stream_tokens, stream))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    print()
    print(f"{'mode':<14}{'requests':>9}{'req/s':>8}{'tok/s':>8}{'first p50':>11}{'first p95':>11}"
          f"{'end p50':>9}{'end p95':>9}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['requests']:>9}{r['rps']:>8.1f}{r['tps']:>8.0f}{r['first_p50']:>11.1f}"
              f"{r['first_p95']:>11.1f}{r['total_p50']:>9.1f}{r['total_p95']:>9.1f}{r['errors']:>8}")
        for e in r["first_errors"]:
            print(f"    e.g. {e}")
    print("(ms; 'first': the first text a client receives, which unstreamed is the whole answer)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--train", type=int, default=2000, help="SST-2 train sentences for the served trial")
    ap.add_argument("--compare", choices=("batching", "runtime"), default="batching",
                    help="batching: micro-batching on/off; runtime: PyTorch fp32 against ONNX int8")
    ap.add_argument("--stream", action="store_true", help="streamed generation: first-token latency of a causal LM")
    ap.add_argument("--stream-model", help="--stream: the causal LM directory (default: a tiny random Llama)")
    ap.add_argument("--stream-tokens", type=int, default=32, help="--stream: max_tokens per request")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stream:
        stream_main(args)
        return
    import httpx

    with tempfile.TemporaryDirectory(prefix="tunebench-load-") as tmp:
        study, texts = train_trial(Path(tmp), args.train, "full" if args.compare == "runtime" else "linear_probe")
        if args.compare == "runtime":
            onnx = ("--runtime", "onnx", "--onnx-dir", str(Path(tmp) / "onnx"))
            modes = {"pytorch fp32": (True, ("--runtime", "torch")),
                     "onnx int8": (True, onnx),  # near ties rechecked in fp32 (the export's calibrated margin)
                     "onnx int8 alone": (True, (*onnx, "--onnx-recheck-margin", "0"))}
        else:
            modes = {"micro-batching": (True, ()), "batch size 1": (False, ())}
        results = {}
        for name, (batching, runtime) in modes.items():
            proc, url = start_server(study, batching, runtime)
            try:
                asyncio.run(drive(url, texts, args.clients, 2.0))  # warm-up
                print(f"{name}: {args.clients} clients for {args.seconds:g} s ...", flush=True)
                results[name] = asyncio.run(drive(url, texts, args.clients, args.seconds))
                info = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
                results[name]["recheck"] = info["data"][0]["tunebench"].get("onnx_recheck")
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
    print()
    print(f"{'mode':<16}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<16}{r['requests']:>10}{r['rps']:>10.1f}{r['p50']:>10.1f}{r['p95']:>10.1f}{r['errors']:>8}")
        for e in r["first_errors"]:
            print(f"    e.g. {e}")
    for name, r in results.items():
        if r.get("recheck") and r["recheck"]["margin"]:
            c = r["recheck"]
            print(f"{name}: {c['rechecked']:,} of {c['scored']:,} inputs ({c['rechecked'] / max(1, c['scored']):.1%}) "
                  f"rechecked in fp32 (int8 top-2 logit gap below {c['margin']:g})")
    if args.compare == "runtime":
        base_name, base = "pytorch fp32", results["pytorch fp32"]
        pairs = [(n, results[n]) for n in results if n != base_name]
    else:
        (fast_name, fast), (base_name, base) = results.items()
        pairs = [(fast_name, fast)]
    for fast_name, fast in pairs:
        ratio = fast["rps"] / base["rps"] if base["rps"] else float("inf")
        errors = fast["errors"] + base["errors"]
        print(f"\n{fast_name} / {base_name}: {ratio:.2f}x requests/s (target >= 2x): "
              f"{'met' if ratio >= 2 else 'NOT met'}")
        print(f"errors at {args.clients} concurrent clients: {errors} (target 0): {'met' if errors == 0 else 'NOT met'}")
        if args.compare == "runtime":
            both = sorted(set(fast["answers"]) & set(base["answers"]))
            same = sum(fast["answers"][t] == base["answers"][t] for t in both)
            share = same / len(both) if both else float("nan")
            print(f"label agreement on the {len(both)} inputs both served: {share:.2%} (target >= 99.5%): "
                  f"{'met' if share >= 0.995 else 'NOT met'}")

if __name__ == "__main__":
    main()
