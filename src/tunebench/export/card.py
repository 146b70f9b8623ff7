"""What an export says about itself: the machine-readable manifest (``tunebench_export.json``), the model card
(``README.md``: task, metrics, cost, configuration) and its usage snippets in plain transformers / peft /
onnxruntime code."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from .common import ANCHORS_FILE, CLASSIFIER_FILE, HEAD_FILE, MANIFEST, ONNX_FP32, ONNX_INT8, weights_kind


def json_default(o):
    """JSON for what ``json.dumps`` cannot write: NaN as null, numpy scalars as numbers, the rest as text."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def _base_model(loaded) -> dict:
    mc = loaded.model_config
    path = mc.path
    info = {"backend": mc.backend, "path": path, "id": getattr(loaded.backend, "model_id", path)}
    if mc.backend == "encoder" and path == "default":  # the embedded model: the backend knows its directory
        info.update(path=str(getattr(loaded.backend, "path", path)), hub_id="sentence-transformers/all-MiniLM-L6-v2")
    elif mc.backend == "openai":
        info["id"] = getattr(mc, "model", None) or path
    elif not Path(path).expanduser().exists() and path.count("/") == 1:
        info["hub_id"] = path
    return info


def manifest(loaded, fmt: str, info: dict) -> dict:
    """The facts of an export: trial, strategy, base model, task, metrics, cost, versions; ``info``: the writer's."""
    import onnxruntime  # optional dependencies, heavy to import: only for their versions
    import peft
    import transformers

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
                  "measure the int8 model on your data before serving it."]
        if c.get("recheck_margin") is not None:
            lines += [f"- Near ties: `OnnxClassifier` (and `tunebench serve --runtime onnx`) score an input again "
                      f"with the fp32 graph when its int8 top-2 logit gap is below {c['recheck_margin']:g} "
                      f"(`recheck_margin` in `classifier.json`: twice the 99th percentile of int8's logit error on "
                      f"{c['recheck_probes']} random-token probes); the onnxruntime-alone snippet below runs int8 "
                      "without it."]
        lines += [""]
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
def usage(m: dict, path: Path) -> str:
    """How to load and predict, in plain transformers / peft / onnxruntime code (tested)."""
    p = json.dumps(str(path))
    base = json.dumps(m["base_model"]["path"])
    if m["format"] == "onnx":
        return "\n".join([
            "With tunebench:", "", "```python", "from tunebench.export import OnnxClassifier", "",
            f"clf = OnnxClassifier({p})  # int8, near ties rechecked in fp32; quantized=False: fp32 only",
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
