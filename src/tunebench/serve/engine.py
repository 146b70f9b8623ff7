"""What a server runs: a stored trial as a task endpoint, or a causal LM as a plain completion model.

An engine receives *jobs* (one per HTTP request, each with one or more inputs) in micro-batches and runs
the jobs of a batch together: inputs with the same decoding options go through the model in one call.
Engines run in one worker thread; they never see HTTP.

A streamed request is a job like any other, with a ``sink``: the engine passes each of its inputs' text to it
while the model generates (in the worker thread), in pieces that add up to the input's ``Result.text``. It
shares its model call with the other jobs of its group. An engine that cannot stream an answer (a label, a
reasoning prompt's final answer) sends nothing to the sink; the text is then all in the result.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..textfmt import render

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as asked (becomes a 400 with ``param`` named)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Decode:
    """Per-request decoding options of a plain LM (a trial decodes as it was evaluated)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Job:
    """One request's work: ``op`` is classify, complete or logprobs; ``inputs`` are texts, records or prompts;
    ``tokens`` what its inputs count (the batcher's token budget). ``sink(k, text)``, for a streamed request,
    receives input ``k``'s generated text as it comes and returns whether its reader still wants it."""

    op: str
    inputs: list[Any]
    decode: Decode | None = None
    tokens: int = 0
    sink: Callable[[int, str], bool] | None = None
    size: int = field(init=False)
    sent: bool = field(default=False, init=False)  # text went to the sink: the job cannot be run again unseen

    def __post_init__(self) -> None:
        self.size = max(1, len(self.inputs))

    def send(self, k: int, text: str) -> bool:
        self.sent = True
        return self.sink(k, text)

    def group_key(self) -> tuple:
        d = self.decode
        return (self.op,) if d is None else (self.op, d.max_tokens, d.temperature, d.top_p, d.stop, d.seed)


@dataclass
class Result:
    """One input's answer: the text, token counts, and for classification the label and its scores."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    label: str | None = None
    label_id: int | None = None
    scores: dict[str, float] | None = None
    logprobs: dict | None = None


def counting_copy(tokenizer):
    """The counting thread's own tokenizer (a fast tokenizer's truncation settings are state the model thread
    changes; see ``Engine.count_tokens``). A tokenizer that cannot be copied (custom code) is loaded again from
    its files, and failing that shared, with a warning."""
    if tokenizer is None:
        return None
    try:
        return copy.deepcopy(tokenizer)
    except Exception as exc:  # noqa: BLE001 - any failure to copy: fall back, never fail to start
        try:
            return type(tokenizer).from_pretrained(tokenizer.name_or_path)
        except Exception:  # noqa: BLE001
            log.warning("could not copy the tokenizer for counting (%s); counting shares the model's", exc)
            return tokenizer


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Engine(ABC):
    """The served model. ``id`` is what clients put in ``model``."""

    id: str
    kind: str  # trial | lm
    task_type: str | None = None
    labels: list[str] | None = None
    max_positions: int | None = None
    completes_empty: bool = True  # whether an empty prompt can be completed (a plain LM needs at least one token)

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of a text as the model's tokenizer counts them. Called from a counting thread while the model
        runs in its own: engines count with their own copy of the tokenizer (a fast tokenizer's truncation
        settings are state that a concurrent call would change under the model)."""

    @abstractmethod
    def describe(self) -> dict:
        """Facts shown in ``/v1/models`` and ``/health``."""

    def chat_prompt(self, messages: list[dict]) -> Any:
        """What a chat request's messages become as one input."""
        raise NotImplementedError

    def run_batch(self, jobs: list[Job]) -> list[list[Result] | Exception]:
        """Run jobs together: one model call per group of compatible jobs. A group that fails is run again one job
        at a time, so that only the job that fails gets the error (and the others their answers); a streamed job
        that already sent text gets the error too (running it again would send its text twice)."""
        out: list[list[Result] | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(self.group_key(job), []).append(i)
        for idx in groups.values():
            self._run_group(jobs, idx, out)
        return out  # type: ignore[return-value]

    def _run_group(self, jobs: list[Job], idx: list[int], out: list) -> None:
        flat = [x for i in idx for x in jobs[i].inputs]
        stream: dict[int, Callable[[str], bool]] = {}
        pos = 0
        for i in idx:
            if jobs[i].sink is not None:
                stream.update({pos + k: partial(jobs[i].send, k) for k in range(len(jobs[i].inputs))})
            pos += len(jobs[i].inputs)
        t0 = time.perf_counter()
        try:
            results = self._run(jobs[idx[0]], flat, stream or None)
            if len(results) != len(flat):
                raise RuntimeError(f"{len(results)} results for {len(flat)} inputs")
        except Exception as exc:
            if len(idx) > 1:  # find the job that failed; the others still get their answers
                log.warning("a batch of %d requests failed (%s); running them one by one", len(idx), exc)
                for i in idx:
                    if jobs[i].sent:
                        out[i] = exc
                    else:
                        self._run_group(jobs, [i], out)
                return
            if not isinstance(exc, RequestError):  # logged here; the client gets a 500 without internals
                log.exception("a request of %d inputs failed", len(flat))
            out[idx[0]] = exc
            return
        log.debug("ran %d inputs (%s) in %.1f ms", len(flat), jobs[idx[0]].op, 1000 * (time.perf_counter() - t0))
        pos = 0
        for i in idx:
            n = len(jobs[i].inputs)
            out[i] = results[pos : pos + n]
            pos += n

    def group_key(self, job: Job) -> tuple:
        """Jobs with the same key run in one model call."""
        return job.group_key()

    @abstractmethod
    def _run(self, job: Job, inputs: list[Any], stream: dict[int, Callable[[str], bool]] | None = None
             ) -> list[Result]:
        """Answer ``inputs`` (all with ``job``'s op and options). ``stream`` maps the positions of streamed inputs
        to callbacks for their text as it is generated (an engine that cannot stream ignores it)."""


class TrialEngine(Engine):
    """A stored trial as a task endpoint: the input goes through the trial's own prompt, demonstrations and
    weights, and the answer is the task's output (a label name, or the generated text). What was measured
    is what is served: decoding follows the trial's configuration."""

    kind = "trial"

    def __init__(self, loaded, *, runtime: str = "torch", export: Path | None = None):
        self.loaded = loaded
        self.runtime, self.export = runtime, export  # what runs the model: torch, or onnx-int8 from an export
        self.predictor = loaded.predictor
        self.id = loaded.name
        self.task_type = loaded.task_type
        self.labels = loaded.labels if loaded.task_type == "classification" else None
        self.fields: list[str] = list(loaded.task.get("text") or ["text"])
        self.text_template: str | None = loaded.task.get("text_template")
        self.tokenizer = loaded.backend.tokenizer  # None for a remote endpoint
        self._counter = counting_copy(self.tokenizer)
        self.max_positions = getattr(loaded.backend, "max_positions", None)

    def count_tokens(self, text: str) -> int:
        if self._counter is None:  # a trial on a remote endpoint: estimate (about 4 characters per token)
            return max(1, len(text) // 4)
        return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        row = self.loaded.row
        return {"kind": "trial", "study": self.loaded.study, "trial": row["key"], "strategy": row["strategy"],
                "label": row["label"], "family": row["family"], "task": self.task_type, "labels": self.labels,
                "base_model": self.loaded.backend.model_id, "runtime": self.runtime,
                **({"export": str(self.export)} if self.export is not None else {}),
                **({"onnx_recheck": {"margin": self.predictor.recheck_margin, "rechecked": self.predictor.rechecked,
                                     "scored": self.predictor.scored}}
                   if hasattr(self.predictor, "recheck_margin") else {}),
                **({"cascade": self.cascade_counts()} if hasattr(self.predictor, "fallbacks") else {}),
                "metrics": {k: v for k, v in row["metrics"].items() if isinstance(v, (int, float))}}

    def cascade_counts(self) -> dict:
        """A cascade's routing since the server started: inputs answered, those sent to the teacher, their share."""
        p = self.predictor
        teacher = (self.loaded.row["record"].get("cascade") or {}).get("teacher") or {}
        return {"threshold": p.threshold, "teacher": {"strategy": teacher.get("strategy"), "model": p.teacher_model,
                                                      "base_model": getattr(p.teacher.backend, "model_id", None)},
                "requests": p.requests, "fallbacks": p.fallbacks,
                "fallback_rate": round(p.fallbacks / p.requests, 6) if p.requests else None}

    def record(self, x: Any, where: str) -> dict:
        """A request input as a prompt record: a text, or (tasks with several fields) an object of the fields."""
        if isinstance(x, dict):
            missing = [f for f in self.fields if f not in x]
            if missing:
                raise RequestError(f"{where}: missing field(s) {missing}; this task's inputs have {self.fields}", where)
            rec = {f: str(x[f]) for f in self.fields}
            rec["input"] = render(self.text_template, rec) if self.text_template else rec[self.fields[0]]
            return rec
        if not isinstance(x, str):
            raise RequestError(f"{where}: an input is a string" + (" or an object" if len(self.fields) > 1 else ""),
                               where)
        if len(self.fields) > 1:
            try:
                obj = json.loads(x)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise RequestError(f"{where}: this task's inputs have several fields {self.fields}; send them as a "
                                   "JSON object", where)
            return self.record(obj, where)
        return {"input": x}

    def chat_prompt(self, messages: list[dict]) -> Any:
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise RequestError("messages: a trial answers the last user message; there is none", "messages")
        return users[-1]["content"]

    def group_key(self, job: Job) -> tuple:
        return (job.op == "logprobs",)  # classify and complete both run the predictor as evaluated

    def _run(self, job: Job, inputs: list[Any], stream: dict[int, Callable[[str], bool]] | None = None
             ) -> list[Result]:
        """A generation trial on a local causal model streams its answers (as they are served: stripped); a
        classification trial, or a reasoning prompt, streams nothing (its answer is known at the end)."""
        if job.op == "logprobs":
            raise RequestError("logprobs: a trial endpoint answers its task; prompt log-probabilities come from a "
                               "plain model (`tunebench serve --model PATH`, or --raw for a tuned causal trial)",
                               "logprobs")
        if stream and getattr(self.predictor, "streams", False):  # (an ONNX classifier is no Predictor)
            out = self.predictor.run(inputs, stream=stream)
        else:
            out = self.predictor.run(inputs)
        results = []
        for i in range(len(inputs)):
            p, c = int(out.prompt_tokens[i]), int(out.completion_tokens[i])
            if self.task_type != "classification":
                results.append(Result(str(out.predictions[i]), p, c))
                continue
            lid = int(out.predictions[i])
            label = self.labels[lid] if lid >= 0 else None
            scores = None
            if out.scores is not None:
                scores = dict(zip(self.labels, softmax(out.scores[i]).round(6).tolist()))
            # a generated answer that names no label (-1) is returned as generated, with no label
            text = label if label is not None else (out.generated[i].strip() if out.generated else "")
            results.append(Result(text, p, c, label=label, label_id=lid if lid >= 0 else None, scores=scores))
        return results


class LMEngine(Engine):
    """A causal LM (base, or a tuned trial's weights with ``--raw``) completing whatever prompt it is sent.

    Chat messages go through the tokenizer's chat template. ``/v1/completions`` with ``echo`` and
    ``logprobs`` (and ``max_tokens`` 0) returns each prompt token's log-probability: how a remote client
    scores label continuations.
    """

    kind = "lm"

    def __init__(self, backend, model=None, model_id: str = "model", info: dict | None = None):
        self.backend, self.model, self.id = backend, model, model_id
        self.tokenizer = backend.tokenizer
        self._counter = counting_copy(self.tokenizer)
        self.max_positions = backend.max_positions
        self.info = info or {}
        self.completes_empty = bool(backend.prompt_ids(""))  # a BOS token, where the tokenizer adds one

    def count_tokens(self, text: str) -> int:
        return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        return {"kind": "lm", "base_model": self.backend.model_id, "chat_template": bool(self.backend.chat), **self.info}

    def chat_prompt(self, messages: list[dict]) -> Any:
        tok = self._counter  # called in the counting thread, like count_tokens
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _run(self, job: Job, inputs: list[Any], stream: dict[int, Callable[[str], bool]] | None = None
             ) -> list[Result]:
        if job.op == "classify":
            raise RequestError("/v1/classify needs a classification trial; this server runs a plain LM", "input")
        if job.op == "logprobs":
            return self._logprobs(inputs)
        d = job.decode
        gens = self.backend.generate(inputs, max_new_tokens=d.max_tokens, temperature=d.temperature, top_p=d.top_p,
                                     stop=list(d.stop), seed=d.seed, model=self.model, batch_size=len(inputs),
                                     stream=stream)
        results = []
        for g in gens:
            finish = "length" if g.completion_tokens >= d.max_tokens else "stop"
            results.append(Result(g.text, g.prompt_tokens, g.completion_tokens, finish))
        return results

    @torch.inference_mode()
    def _logprobs(self, prompts: list[str]) -> list[Result]:
        """Each prompt's tokens with their log-probabilities (the first has none) and character offsets."""
        tok = self.tokenizer
        # tokenized as the backend tokenizes prompts (BOS where the tokenizer adds one, unless a chat template is used)
        enc = [tok(p, add_special_tokens=not self.backend.chat, return_offsets_mapping=True) for p in prompts]
        ids = [e["input_ids"] or [tok.eos_token_id] for e in enc]
        model = self.model if self.model is not None else self.backend.model
        batch = self.backend.collate(ids)
        with self.backend.autocast():
            logits = model(**batch).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        results = []
        for r, (e, x) in enumerate(zip(enc, ids)):
            t = torch.tensor(x[1:], device=logp.device)
            lps = logp[r, torch.arange(len(x) - 1, device=logp.device), t].tolist() if len(x) > 1 else []
            offsets = [o[0] for o in e.get("offset_mapping", [])] or [0] * len(x)
            lp = {"tokens": [tok.decode([i]) for i in x], "token_logprobs": [None] + [round(v, 6) for v in lps],
                  "text_offset": offsets, "top_logprobs": None}
            results.append(Result(prompts[r], len(x), 0, "length", logprobs=lp))
        return results
