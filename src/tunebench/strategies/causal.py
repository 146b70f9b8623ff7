"""Strategies on a causal LM: prompts, demonstrations (fixed or retrieved), label scoring, generation, and
supervised fine-tuning with the loss on the answer tokens only.

Every causal strategy returns a :class:`CausalPredictor`: a prompt builder plus, for tuned strategies,
the trained weights. Classification predicts by the log-likelihood of each label's verbalisation (mean
per token; always a valid label) or by generating and parsing; generation tasks generate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..backends import Backend, NoLogprobs, load_backend
from ..config import ModelConfig
from ..data import Split, TaskData
from ..evaluation.metrics import classification_metrics
from ..prompts import PromptBuilder, default_template, demo_record, final_answer, parse_label, select_demonstrations
from .base import ExportParts, Output, Predictor, PromptConfig, adapter_kind, as_records, registry

log = logging.getLogger(__name__)

PROMPT_FILE = "prompt.json"
INFER_BATCH = 16
REQUEST_TOKENS = 32  # the most tokens an endpoint adds to one request besides the text sent (BOS, chat roles)


def answers(task: TaskData, split: Split) -> list[str]:
    """The expected output text of each example: its label name or its target."""
    if split.targets is not None:
        return list(split.targets)
    names = task.label_names
    return [names[int(y)] for y in split.labels]


def make_builder(cfg: PromptConfig, task: TaskData, *, reasoning: bool = False,
                 demos: list[dict] | None = None) -> PromptBuilder:
    task_type = task.type
    template = cfg.template if isinstance(cfg.template, str) else default_template(task_type, reasoning)
    labels = [{"name": lab.name, "description": lab.description} for lab in task.labels]
    where = "template" if cfg.template else f"built-in {task_type} template"
    return PromptBuilder(template, task_type, task.config.instruction, labels, demos or [], where)


class Retrieval:
    """Demonstrations retrieved per input: the ``k`` training examples nearest by encoder embedding."""

    def __init__(self, encoder, pool: list[dict], embeddings: torch.Tensor, k: int, retriever: str):
        self.encoder, self.pool, self.embeddings, self.k, self.retriever = encoder, pool, embeddings, k, retriever

    @classmethod
    def build(cls, retriever: str, pool: list[dict], k: int, backend: Backend | None = None) -> Retrieval:
        """Embed ``pool`` with the ``retriever`` encoder (``backend``'s, kept with it, when given)."""
        encoder = load_retriever(retriever, backend)
        emb = encoder.embed([r["input"] for r in pool])
        return cls(encoder, pool, emb, k, retriever)

    def demos_for(self, records: list[dict], exclude_self: bool = False) -> list[list[dict]]:
        emb = self.encoder.embed([r["input"] for r in records])
        sims = emb @ self.embeddings.T
        if exclude_self:  # while training on the pool, an example (or a copy) must not be its own demonstration
            pos: dict[str, list[int]] = {}
            for i, r in enumerate(self.pool):
                pos.setdefault(r["input"], []).append(i)
            for row, r in enumerate(records):
                sims[row, pos.get(r["input"], [])] = -2.0
        k = min(self.k, len(self.pool))
        idx = sims.topk(k, dim=1).indices.flip(1)  # most similar last: closest to the input
        return [[self.pool[int(j)] for j in row] for row in idx]

    def save(self, directory: Path) -> dict:
        save_file({"embeddings": self.embeddings.contiguous()}, str(directory / "retrieval.safetensors"))
        return {"retriever": self.retriever, "k": self.k, "pool": self.pool}

    @classmethod
    def load(cls, directory: Path, meta: dict, backend: Backend | None = None) -> Retrieval:
        emb = load_file(str(directory / "retrieval.safetensors"))["embeddings"]
        return cls(load_retriever(meta["retriever"], backend), meta["pool"], emb, meta["k"], meta["retriever"])


def load_retriever(path: str, backend: Backend | None = None) -> Backend:
    """The encoder backend used for retrieval: ``backend``'s (loaded once, kept on that backend), or a fresh
    one when no backend is given."""
    if backend is not None:
        return backend.retriever(path)
    return load_backend(ModelConfig(path=path))


def is_prompt_tuned(model: nn.Module | None) -> bool:
    """PEFT prompt tuning prepends virtual tokens, so the prefix KV cache cannot be reused."""
    cfg = getattr(model, "peft_config", None)
    return bool(cfg) and any(getattr(c, "is_prompt_learning", False) for c in cfg.values())


class _Stripped:
    """A stream of text passed on as its ``strip()``: leading whitespace dropped, whitespace held back until more
    text follows it (so that whitespace at the end is never sent)."""

    def __init__(self, send: Callable[[str], bool]):
        self.send, self.started, self.held = send, False, ""

    def __call__(self, text: str) -> bool:
        if not self.started:
            text = text.lstrip()
            if not text:
                return True
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return self.send(body) if body else True


class CausalPredictor(Predictor):
    """A prompt (template + demonstrations) on the backend's LM, or on a tuned copy of it."""

    kind: ClassVar[str] = "causal"

    def __init__(self, strategy, config, labels, *, backend, builder: PromptBuilder, mode: str = "score",
                 model: nn.Module | None = None, trained: list[str] | None = None,
                 retrieval: Retrieval | None = None, seed: int = 0, decode: PromptConfig | None = None):
        super().__init__(strategy, config, labels)
        self.backend, self.builder, self.mode, self.model = backend, builder, mode, model
        self.decode = decode if decode is not None else config  # prompt length and decoding options
        self.trained, self.retrieval, self.seed = trained or [], retrieval, seed
        self.task_type = builder.task_type
        self.fallback: str | None = None  # why a remote endpoint could not score labels

    @property
    def max_length(self) -> int:
        return int(getattr(self.decode, "max_length", 1024))

    def prompts(self, inputs, exclude_self: bool = False) -> list[str]:
        records = as_records(inputs)
        demo_sets = self.retrieval.demos_for(records, exclude_self) if self.retrieval else [None] * len(records)
        return [self.backend.format_prompt(self.builder.render(r, d)) for r, d in zip(records, demo_sets)]

    def _options(self) -> list[list[int]]:
        return [self.backend.answer_ids(name) for name in self.labels]

    def label_scores(self, prompt_ids: list[list[int]]) -> np.ndarray:
        """Mean log-probability per token of each label's verbalisation after each prompt."""
        opts = self._options()
        total, count = self.backend.score(prompt_ids, [opts] * len(prompt_ids), model=self.model,
                                          cache=not is_prompt_tuned(self.model), batch_size=INFER_BATCH)
        return total / np.maximum(count, 1)

    def _score(self, prompts: list[str]) -> tuple[np.ndarray, list[int], list[int]] | None:
        """Label scores, prompt tokens and answer tokens per prompt; None when a remote endpoint cannot score
        (the predictor then generates and parses, and says so in its prompt info)."""
        if not self.backend.remote:
            ids = [self.backend.prompt_ids(p, self.max_length) for p in prompts]
            scores = self.label_scores(ids)
            opts = self._options()
            return scores, [len(x) for x in ids], [len(opts[int(p)]) for p in scores.argmax(1)]
        try:
            total, count, billed = self.backend.score_texts(prompts, [self.backend.answer_text(n) for n in self.labels])
        except NoLogprobs as exc:
            log.warning("%s: %s; predicting by generation and parsing instead", self.strategy, exc)
            self.mode, self.fallback = "generate", str(exc)
            return None
        return total / np.maximum(count, 1), [b[0] for b in billed], [b[1] for b in billed]

    def predict_scores(self, inputs) -> np.ndarray:
        if self.task_type != "classification":
            raise TypeError("a generation predictor has no class scores; use predict()")
        if self.mode == "score":
            scored = self._score(self.prompts(inputs))
            if scored is not None:
                return scored[0]
        pred = self.run(inputs).predictions
        scores = np.zeros((len(pred), len(self.labels)))
        for i, p in enumerate(pred):
            if p >= 0:
                scores[i, p] = 1.0
        return scores

    def predict(self, inputs):
        return self.run(inputs).predictions

    @property
    def streams(self) -> bool:
        """A generation task's answer is the generated text (stripped), so it can be passed on while it is
        generated, on a local model; a label or a reasoning prompt's final answer is known only at the end."""
        return self.task_type != "classification" and self.mode != "reason" and not self.backend.remote

    def run(self, inputs, stream: dict[int, Callable[[str], bool]] | None = None) -> Output:
        """Predictions and token counts. With :attr:`streams`, ``stream`` maps input indices to callbacks that
        receive each input's answer while it is generated (pieces that add up to its prediction; see
        ``CausalBackend.generate``); otherwise it is ignored."""
        prompts = self.prompts(inputs)
        if self.task_type == "classification" and self.mode == "score":
            scored = self._score(prompts)
            if scored is not None:
                scores, prompt_tokens, answer_tokens = scored
                return Output(scores.argmax(1), prompt_tokens, answer_tokens, scores=scores)
        cfg = self.decode
        extra = {"stream": {i: _Stripped(f) for i, f in stream.items()}} if stream and self.streams else {}
        gens = self.backend.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, stop=cfg.stop, seed=self.seed, model=self.model,
                                     batch_size=INFER_BATCH, max_length=self.max_length, **extra)
        texts = [g.text for g in gens]
        answers_ = [final_answer(t) for t in texts] if self.mode == "reason" else [t.strip() for t in texts]
        if self.task_type == "classification":
            pred = np.asarray([parse_label(a, self.labels) for a in answers_], dtype=np.int64)
        else:
            pred = ["" if a is None else a for a in answers_]
        return Output(pred, [g.prompt_tokens for g in gens], [g.completion_tokens for g in gens], texts)

    def reference_nll(self, inputs, targets: list[str]) -> np.ndarray | None:
        """Mean negative log-likelihood per token of each reference answer (perplexity = exp of the mean); None
        from an endpoint that returns no log-probabilities."""
        if self.backend.remote:
            try:
                total, count, _ = self.backend.score_texts_paired(self.prompts(inputs),
                                                                  [self.backend.answer_text(t) for t in targets])
            except NoLogprobs:
                return None
            return -(total / np.maximum(count, 1))
        ids = [self.backend.prompt_ids(p, self.max_length) for p in self.prompts(inputs)]
        conts = [[self.backend.answer_ids(t, eos=True)] for t in targets]
        total, count = self.backend.score(ids, conts, model=self.model, cache=not is_prompt_tuned(self.model),
                                          batch_size=INFER_BATCH)
        return -(total[:, 0] / np.maximum(count[:, 0], 1))

    def request_tokens(self, inputs) -> tuple[list[int], int] | None:
        """Prompt tokens per input as :meth:`run` counts them, and the most answer tokens: the longest label when
        scoring, ``max_new_tokens`` when generating. On a remote endpoint, whose tokenizer is not here, upper
        bounds (:meth:`_remote_bounds`)."""
        if self.backend.remote:
            return self._remote_bounds(inputs)
        prompt = [len(self.backend.prompt_ids(p, self.max_length)) for p in self.prompts(inputs)]
        if self.task_type == "classification" and self.mode == "score":
            return prompt, max(len(o) for o in self._options())
        return prompt, int(self.decode.max_new_tokens)

    def _remote_bounds(self, inputs) -> tuple[list[int], int]:
        """What an endpoint can bill at most per input, counted before the call: every token is at least one UTF-8
        byte of the text sent (byte-level BPE, WordPiece and character tokenizers alike), plus ``REQUEST_TOKENS``
        per request for what the endpoint adds (BOS, a chat template's role markers). Scoring sends the prompt
        once per label (on the very first call, once per request shape tried); an endpoint that refuses to score is
        then asked to generate, so both are counted. Not bounded: a request the client retries after a timeout that
        the endpoint had billed."""
        cfg = self.backend.config
        system = len((cfg.system_prompt or "").encode("utf-8")) if self.backend.chat else 0
        sent = [len(p.encode("utf-8")) + system + REQUEST_TOKENS for p in self.prompts(inputs)]
        answer = int(self.decode.max_new_tokens)
        if self.task_type != "classification" or self.mode != "score":
            return sent, answer
        labels = [len(self.backend.answer_text(n).encode("utf-8")) for n in self.labels]
        k = len(labels)
        bounds = [(k + 1) * b + sum(labels) for b in sent]
        attempts = self.backend.echo_attempts() if hasattr(self.backend, "echo_attempts") else 1
        if bounds:  # the endpoint's first scoring request may be tried in every request shape
            bounds[0] += (attempts - 1) * (k * sent[0] + sum(labels))
        return bounds, attempts * k + answer

    def prompt_info(self, record: dict | None = None) -> dict:
        info = {"template": self.builder.template, "instruction": self.builder.instruction, "mode": self.mode,
                "chat_template": self.backend.chat,
                "demonstrations": "retrieved" if self.retrieval else len(self.builder.demos)}
        if self.fallback:
            info["fallback"] = f"predicted by generation: {self.fallback}"
        if record is not None:
            info["example"] = self.prompts([record])[0]
        return info

    def export_formats(self) -> tuple[str, ...]:
        if self.model is None:  # the base model, prompted: the prompt alone
            return ("hf",)
        return ("hf", "merged") if adapter_kind(self.model) else ("merged",)  # tuned weights: no adapter alone

    def export_parts(self):
        """The tuned LM (PEFT-wrapped or not; None: the base unchanged), the tokenizer and the prompt it reads."""
        b, dec, backend = self.builder, self.decode, self.backend
        chat = bool(getattr(backend, "chat", False))
        prompt = {
            "template": b.template, "task_type": b.task_type, "mode": self.mode,
            "variables": {**b.variables, "demonstrations": b.demos},
            "labels": list(self.labels) if b.task_type == "classification" else [],
            "chat_template": chat, "system_prompt": getattr(backend.config, "system_prompt", None),
            "answer_prefix": "" if chat else " ", "max_length": self.max_length,
            "decode": {k: getattr(dec, k, None) for k in ("max_new_tokens", "temperature", "top_p", "stop")},
            "seed": self.seed, "retrieval": None,
        }
        if self.retrieval is not None:
            r = self.retrieval
            prompt["retrieval"] = {"retriever": r.retriever, "k": r.k, "pool": r.pool,
                                   "note": "demonstrations are the k pool examples nearest to the input by the "
                                           "retriever's mean-pooled, normalised embeddings, most similar last"}
        return ExportParts("causal", list(self.labels), model=self.model, adapter=adapter_kind(self.model),
                           tokenizer=self.export_tokenizer(), max_length=self.max_length,
                           max_positions=getattr(backend, "max_positions", None), prompt=prompt)

    def _save(self, directory: Path) -> None:
        meta = {"builder": self.builder.to_dict(), "mode": self.mode, "seed": self.seed, "retrieval": None}
        if self.retrieval is not None:
            meta["retrieval"] = self.retrieval.save(directory)
        if self.model is not None:
            state = self.model.state_dict()
            # clone: tied weights (GPT-2's embeddings and LM head) share storage, which safetensors refuses
            save_file({k: state[k].detach().cpu().clone().contiguous() for k in self.trained},
                      str(directory / "weights.safetensors"))
        (directory / PROMPT_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def _load(cls, directory, backend, strategy, config, labels):
        meta = json.loads((directory / PROMPT_FILE).read_text(encoding="utf-8"))
        model, trained = None, None
        strat = registry.get(strategy)(config)
        weights_path = directory / "weights.safetensors"
        if weights_path.is_file():
            model = strat.build_lm(backend)
            weights = load_file(str(weights_path), device=str(backend.device))
            unknown = set(weights) - set(model.state_dict())
            if unknown:
                raise ValueError(f"{directory}: artifact weights do not fit the model: {sorted(unknown)[:3]}")
            model.load_state_dict(weights, strict=False)
            model.eval()
            trained = sorted(weights)
        retrieval = Retrieval.load(directory, meta["retrieval"], backend) if meta.get("retrieval") else None
        return cls(strategy, config, labels, backend=backend, builder=PromptBuilder.from_dict(meta["builder"]),
                   mode=meta["mode"], model=model, trained=trained, retrieval=retrieval, seed=meta["seed"],
                   decode=strat.decode_config())


class CausalLMObjective:
    """Supervised fine-tuning: prompt + answer + EOS, with the loss on the answer tokens only.

    Dev evaluation: label scoring accuracy / macro-F1 (classification) or mean answer-token loss (generation).
    It follows the ``training.Objective`` protocol (duck-typed: the training loop imports this module).
    """

    def __init__(self, predictor: CausalPredictor, task: TaskData, cfg, train: Split, dev: Split):
        self.predictor, self.cfg, self.task = predictor, cfg, task
        self.model = predictor.model
        self.backend = predictor.backend
        max_len = cfg.max_length
        train_prompts = predictor.prompts(train.records(), exclude_self=True)
        self.examples = []
        for p, a in zip(train_prompts, answers(task, train)):
            ans = self.backend.answer_ids(a, eos=True)[:max_len // 2]
            ids = self.backend.prompt_ids(p, max_len - len(ans))
            self.examples.append((ids, ans))
        self.lengths = [len(i) + len(a) for i, a in self.examples]
        self.dev_prompt_ids = [self.backend.prompt_ids(p, max_len) for p in predictor.prompts(dev.records())]
        self.dev, self.classification = dev, task.type == "classification"
        self.dev_answers = answers(task, dev)
        self.dev_labels = dev.labels if self.classification else None
        self.score_key = cfg.metric if self.classification else "loss"

    def setup(self, trainable) -> float:
        return 0.0

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, model: nn.Module, idx: list[int]) -> torch.Tensor:
        seqs = [self.examples[i][0] + self.examples[i][1] for i in idx]
        batch = self.backend.collate(seqs)
        labels = torch.full_like(batch["input_ids"], -100)
        for r, i in enumerate(idx):
            p, a = self.examples[i]
            labels[r, len(p): len(p) + len(a)] = torch.tensor(a, device=labels.device)
        with self.backend.autocast():
            out = model(**batch, labels=labels)
        return out.loss.float()

    def evaluate(self) -> dict[str, float]:
        if self.classification:
            pred = self.predictor.label_scores(self.dev_prompt_ids).argmax(1)
            m = classification_metrics(self.dev.labels, pred, self.task.label_names)
            return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        conts = [[self.backend.answer_ids(t, eos=True)] for t in self.dev_answers]
        total, count = self.backend.score(self.dev_prompt_ids, conts, model=self.model,
                                          cache=not is_prompt_tuned(self.model), batch_size=INFER_BATCH)
        return {"loss": float(-total.sum() / max(1, count.sum()))}


def select_demos(task: TaskData, train: Split, shots: int, selection: str, seed: int) -> list[dict]:
    idx = select_demonstrations(train.labels, shots, selection, seed, task.type == "classification")
    records, outs = train.records(), answers(task, train)
    return [demo_record(records[int(i)], outs[int(i)]) for i in idx]


def demo_pool(task: TaskData, train: Split) -> list[dict]:
    return [demo_record(r, a) for r, a in zip(train.records(), answers(task, train))]
