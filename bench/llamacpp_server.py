#!/usr/bin/env python
"""The openai backend against llama-cpp-python's OpenAI-compatible server, side by side with the local model.

1. (``--install``) installs ``llama-cpp-python[server]`` and ``gguf`` into this Python with pip, timed: pip
   builds llama.cpp from source with cmake and the C/C++ compiler (``CMAKE_BUILD_PARALLEL_LEVEL`` = the cores).
2. Builds the tests' tiny Llama (2 layers, 64 wide, byte-level BPE tokenizer adding ``<s>``, chat template) and
   writes it as an all-f32 GGUF file (tests/llamacpp.py), plus a twin whose tokenizer adds no ``<s>``.
3. Starts ``python -m llama_cpp.server`` on loopback (``--logits_all true``, f32 KV cache) and measures:
   - what the server does with the requests the backend used to send (a list of prompts, ``max_tokens: 0`` with
     echo, the default ``repeat_penalty`` at temperature 0) and what the backend now sends;
   - per-token agreement of the echoed prompt log-probabilities with the local model (HF transformers, fp32),
     with the f32 and with llama.cpp's default f16 KV cache, and on the twin without ``<s>``;
   - a tunebench study over HTTP (``tunebench run``): zero-shot and few-shot label scoring and a prompt search
     through the completions API, chain of thought through the chat API, against the same study run locally by
     the causal backend: predictions, label scores, the search's choice, requests, tokens and seconds.
4. Stops every server it started (also on errors and Ctrl-C).

Usage:
    python bench/llamacpp_server.py              # needs llama-cpp-python[server] and gguf in this Python
    python bench/llamacpp_server.py --install    # installs them first (a from-source build: 20 CPU-minutes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [f"Name the colour.\nWord: {w}\nColour:" for w in ("river", "stone", "piano", "candle", "ocean", "tiger")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--install", action="store_true", help="pip install 'llama-cpp-python[server]' gguf first")
    p.add_argument("--workdir", type=Path, default=None, help="where models, studies and logs go (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--test", type=int, default=12, help="test examples of the study")
    return p.parse_args(argv)


def install() -> float:
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python[server]", "gguf"], env=env, check=True)
    return time.perf_counter() - t0


def requests_in(log: str) -> dict[str, int]:
    """HTTP requests the server answered, by route and status (uvicorn's access log)."""
    out: dict[str, int] = {}
    for route, status in re.findall(r'"POST (/v1/\S+) HTTP/1\.1" (\d+)', log):
        out[f"{route} {status}"] = out.get(f"{route} {status}", 0) + 1
    return out


def echo_agreement(url: str, llama_dir: Path, prompts: list[str], model: str) -> float:
    """Largest per-token difference between the server's echoed log-probabilities and the local model's."""
    from openai import OpenAI

    from tests.llamacpp import echo_difference, local_logprobs

    client = OpenAI(base_url=url, api_key="unused")
    worst = 0.0
    for text, (ids, values) in zip(prompts, local_logprobs(llama_dir, prompts)):
        r = client.completions.create(model=model, prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                      extra_body={"repeat_penalty": 1.0})
        worst = max(worst, echo_difference(r.choices[0], len(ids), values))
    return worst


def quirks(url: str, model: str) -> dict:
    """What llama-cpp-python does with the requests the openai backend sent before this work."""
    import httpx

    out = {}
    r = httpx.post(f"{url}/completions", json={"model": model, "prompt": PROMPTS[:2], "echo": True, "logprobs": 1,
                                               "max_tokens": 1, "temperature": 0}, timeout=120)
    out["list of 2 prompts"] = f"HTTP {r.status_code} {r.json().get('error', {}).get('message', '')!r}"
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/completions", json={"model": model, "prompt": PROMPTS[0], "echo": True, "logprobs": 1,
                                               "max_tokens": 0, "temperature": 0}, timeout=300).json()
    out["echo with max_tokens 0"] = (f"generated {r['usage']['completion_tokens']} tokens in "
                                     f"{time.perf_counter() - t0:.1f} s")
    same = 0
    for p in PROMPTS:
        texts = [httpx.post(f"{url}/completions", json={"model": model, "prompt": p, "max_tokens": 24,
                                                        "temperature": 0, **extra}, timeout=120).json()
                 ["choices"][0]["text"] for extra in ({}, {"repeat_penalty": 1.0})]
        same += texts[0] == texts[1]
    out["greedy, default repeat_penalty vs 1.0"] = f"{len(PROMPTS) - same} of {len(PROMPTS)} 24-token outputs differ"
    return out


def backend_probe(url: str, model: str, extra_body: dict | None = None) -> str:
    """What the openai backend finds on this server (the echo request shape, or why it predicts by generation)."""
    from tunebench.backends import NoLogprobs
    from tunebench.backends.openai_api import OpenAIBackend
    from tunebench.config import ModelConfig

    b = OpenAIBackend(ModelConfig(backend="openai", base_url=url, model=model, api_key_env=None, api="completions",
                                  extra_body=extra_body))
    try:
        b.score_texts(PROMPTS[:1], [" red", " blue"])
    except NoLogprobs as exc:
        return f"no log-probabilities: {exc}"
    return f"scores by echo, {b.echo_shape}"


def run_studies(root: Path, url: str, llama_dir: Path, n_test: int, model: str) -> dict:
    import yaml

    from tests.conftest import write_csv
    from tests.test_causal import colour_rows
    from tests.test_remote import TEMPLATE
    from tunebench.analysis.selection import load_trial
    from tunebench.store import Store

    files = {k: str(write_csv(root / f"{k}.csv", colour_rows(n, s))) for k, n, s in
             (("train", 32, 1), ("dev", 8, 2), ("test", n_test, 3))}
    scored = [{"zero_shot": {"template": TEMPLATE}}, {"few_shot": {"shots": 1, "template": TEMPLATE}},
              {"prompt_search": {"trials": 4, "minibatch": 8, "propose": 0, "shots": 1, "demo_sets": 1,
                                 "template": TEMPLATE}}]
    reasoned = [{"chain_of_thought": {"max_new_tokens": 8}}]
    local = {"backend": "causal", "path": str(llama_dir), "precision": "fp32"}
    remote = {"name": "llamacpp", "backend": "openai", "base_url": url, "model": model, "api_key_env": None,
              "max_concurrency": 4, "extra_body": {"repeat_penalty": 1.0}}
    studies = {"local": ({**local, "chat_template": "off"}, scored), "http": ({**remote, "api": "completions"}, scored),
               "local-chat": ({**local, "chat_template": "on"}, reasoned),
               "http-chat": ({**remote, "api": "chat"}, reasoned)}
    seconds = {}
    for name, (model_cfg, strategies) in studies.items():
        doc = {"name": name, "task": {"data": files, "text": "text", "label": "label",
                                      "instruction": "Name the colour."},
               "model": model_cfg, "strategies": strategies, "store": "runs"}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tunebench", "run", str(path), "--json"], capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds[name] = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"tunebench run {name} failed:\n{r.stderr[-3000:]}")
    store = Store(root / "runs")
    by = {name: {t["strategy"]: t for t in store.trials(name)} for name in studies}
    rows = []
    for here, there, strategy in [("local", "http", s) for s in ("zero_shot", "few_shot", "prompt_search")] + [
            ("local-chat", "http-chat", "chain_of_thought")]:
        a, b = by[here][strategy], by[there][strategy]
        items = store.items([a["key"], b["key"]])
        pa, pb = items[a["key"]]["predictions"], items[b["key"]]["predictions"]
        row = {"strategy": strategy, "same predictions": f"{sum(x == y for x, y in zip(pa, pb))}/{len(pa)}",
               "accuracy local": a["metrics"]["accuracy"], "accuracy http": b["metrics"]["accuracy"],
               "prompt tokens/example (http)": b["cost"]["prompt_tokens_mean"],
               "completion tokens/example (http)": b["cost"]["completion_tokens_mean"]}
        if strategy in ("zero_shot", "few_shot"):  # the label scores themselves, on the test words
            words = [r["text"] for r in csv.DictReader(open(files["test"], encoding="utf-8"))]
            sa, sb = (load_trial(root / "runs", name, t["key"]).predictor.run(words).scores
                      for name, t in ((here, a), (there, b)))
            row["largest label-score difference"] = f"{np.abs(sa - sb).max():.1e}"
        if strategy == "prompt_search":
            row["same choice"] = (a["record"]["prompt_search"]["chosen"] == b["record"]["prompt_search"]["chosen"])
        rows.append(row)
    return {"rows": rows, "seconds": seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install:
        print(f"installed llama-cpp-python[server] and gguf in {install() / 60:.1f} min", flush=True)
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        print("SKIP: llama-cpp-python and gguf are not installed here; run with --install (pip builds llama.cpp "
              "from source: 20 CPU-minutes), or pip install 'llama-cpp-python[server]' gguf")
        return 0
    from tests.llamacpp import MODEL_ID, LlamaCppServer, build_tiny_llama, write_gguf

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="tb-llamacpp-")
    root = args.workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    print(f"llama-cpp-python {llama_cpp.__version__}; work in {root}", flush=True)
    t0 = time.perf_counter()
    llama_dir = build_tiny_llama(root / "tiny-llama")
    gguf_file = write_gguf(llama_dir, root / "tiny-llama-f32.gguf")
    nobos_dir = build_tiny_llama(root / "tiny-llama-nobos", bos=False)  # the same weights, no <s> added
    nobos_file = write_gguf(nobos_dir, root / "tiny-llama-nobos-f32.gguf")
    print(f"built the HF models and wrote both GGUF files ({gguf_file.stat().st_size / 1e3:.0f} kB each) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    figures: dict = {}
    try:
        t0 = time.perf_counter()
        with LlamaCppServer(gguf_file, log_path=root / "server.log") as srv:
            figures["server ready (s)"] = round(time.perf_counter() - t0, 1)
            figures["quirks"] = quirks(srv.url, MODEL_ID)
            figures["backend finds"] = backend_probe(srv.url, MODEL_ID, {"repeat_penalty": 1.0})
            figures["per-token difference, f32 KV cache"] = echo_agreement(srv.url, llama_dir, PROMPTS, MODEL_ID)
            before = requests_in(srv.log_path.read_text(encoding="utf-8", errors="replace"))
            studies = run_studies(root, srv.url, llama_dir, args.test, MODEL_ID)
            after = requests_in(srv.log_path.read_text(encoding="utf-8", errors="replace"))
            figures["requests of the two studies over HTTP"] = {k: n - before.get(k, 0) for k, n in after.items()
                                                                if n > before.get(k, 0)}
        with LlamaCppServer(gguf_file, log_path=root / "server-f16.log", f32_cache=False) as srv:
            figures["per-token difference, default f16 KV cache"] = echo_agreement(srv.url, llama_dir, PROMPTS,
                                                                                  MODEL_ID)
        with LlamaCppServer(nobos_file, log_path=root / "server-nobos.log") as srv:
            figures["per-token difference, tokenizer without <s>"] = echo_agreement(srv.url, nobos_dir, PROMPTS,
                                                                                   MODEL_ID)
            figures["backend finds (without <s>)"] = backend_probe(srv.url, MODEL_ID, {"repeat_penalty": 1.0})
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n== llama-cpp-python server vs the local causal backend (same tiny Llama, f32)")
    for k, v in figures.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"    {kk}: {vv}")
        elif isinstance(v, float):
            print(f"{k}: {v:.1e}" if v < 0.01 else f"{k}: {v:.2f}")
        else:
            print(f"{k}: {v}")
    print("\nstudy, strategy by strategy (local causal backend vs openai backend over HTTP):")
    for row in studies["rows"]:
        print("    " + json.dumps(row))
    print("seconds per `tunebench run`: " + ", ".join(f"{k} {v:.1f}" for k, v in studies["seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
