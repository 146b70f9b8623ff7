"""The causal backend: any Hugging Face causal LM (Llama, Qwen, SmolLM, GPT-2, Mistral ...).

It generates (batched, left padding, greedy or sampled, stop sequences), scores the log-likelihood of
continuations (reusing the KV cache of prompt prefixes that continuations, and inputs, share) and is
trainable. Prompts are formatted with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import Backend, Generation, load_pretrained
from .encoder import EncoderClassifier
from .streaming import RowStreamer

log = logging.getLogger(__name__)

__all__ = ["CausalBackend", "Generation"]


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


class CausalBackend(Backend):
    """A Hugging Face causal LM from a local directory (or a hub id when online).

    Example:
        >>> backend = CausalBackend(ModelConfig(backend="causal", path="./my-llama"))  # doctest: +SKIP
        >>> backend.generate([backend.format_prompt("Say hi")], max_new_tokens=8)[0].text
    """

    name: ClassVar[str] = "causal"
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate", "score", "train"})
    lm: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, *, model: nn.Module | None = None, tokenizer=None):
        super().__init__(config)
        self.path = config.path
        self._model, self._tokenizer = model, tokenizer
        if model is None:
            self._load()
        tok = self._tokenizer
        if tok.pad_token_id is None:  # many causal tokenizers have none; padding is always masked anyway
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        has_chat = bool(getattr(tok, "chat_template", None))
        if config.chat_template == "on" and not has_chat:
            raise ConfigError(f"model.chat_template is 'on' but {self.path}'s tokenizer has no chat template; "
                              "use auto or off")
        self.chat = has_chat and config.chat_template != "off"
        self._model.to(self.device).eval()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM  # heavy (seconds to import): only when a model is loaded

        self._tokenizer, self._model = load_pretrained(self.path, AutoModelForCausalLM, "causal model")
        log.info("loaded causal LM %s (%d parameters)", self.path, sum(p.numel() for p in self._model.parameters()))

    # ---- model facts -------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def max_positions(self) -> int | None:
        cfg = self._model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def lm_copy(self) -> nn.Module:
        """A fresh trainable copy of the pretrained LM (the backend's own stays untouched)."""
        return copy.deepcopy(self._model).train()

    # ---- text <-> tokens ---------------------------------------------------------------------------------
    def format_prompt(self, text: str) -> str:
        """The rendered user prompt as the model sees it: inside the chat template when one is used."""
        if not self.chat:
            return text
        messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        messages.append({"role": "user", "content": text})
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: str, max_length: int | None = None) -> list[int]:
        """Token ids of a formatted prompt; a prompt longer than ``max_length`` keeps its end (where the input is)."""
        ids = self._tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]
        if max_length and len(ids) > max_length:
            ids = ids[len(ids) - max_length:]
        return ids

    def answer_text(self, answer: str) -> str:
        """How an answer follows its prompt: after a space in plain prompts, directly after a chat header."""
        return answer if self.chat or answer[:1].isspace() else " " + answer

    def answer_ids(self, answer: str, eos: bool = False) -> list[int]:
        ids = self._tokenizer(self.answer_text(answer), add_special_tokens=False)["input_ids"]
        if eos and self._tokenizer.eos_token_id is not None:
            ids = ids + [self._tokenizer.eos_token_id]
        return ids

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Plain inputs (no prompt), for heads on the LM's features (linear probe)."""
        if self.max_positions:
            max_length = min(max_length, self.max_positions)
        return self._tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    def collate(self, ids: list[list[int]], left: bool = False) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest member (right padding; left for generation)."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self._tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(width - len(x), width) if left else slice(0, len(x))
            input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def build_classifier(self, num_labels: int, dropout: float = 0.1) -> EncoderClassifier:
        """The LM's transformer (no LM head) + last-token pooling + a linear head."""
        body = copy.deepcopy(self._model.base_model).train()
        return EncoderClassifier(body, self.hidden_size, num_labels, dropout, pool="last").to(self.device)

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]], *, model: nn.Module | None = None,
              batch_size: int = 16, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probability and token count of each continuation after its prompt.

        ``continuations[i]`` lists the continuations of prompt ``i`` (the same number for every prompt).
        With ``cache`` the prefix shared by all prompts is run once, each prompt once, and the continuations
        reuse that KV cache; without it every (prompt, continuation) pair is a full forward pass.
        Returns arrays of shape (n_prompts, n_continuations).
        """
        model = self._model if model is None else model
        was_training = model.training
        model.eval()
        try:
            if cache:
                return self._score_cached(model, prompts, continuations, batch_size)
            return self._score_naive(model, prompts, continuations, batch_size)
        finally:
            model.train(was_training)

    def _forward(self, model, **kw):
        with self.autocast():
            return model(**kw)

    @staticmethod
    def _logits(out, n_positions: int) -> torch.Tensor:
        logits = out.logits
        if logits.shape[1] > n_positions:  # PEFT prompt tuning prepends virtual tokens to the outputs
            logits = logits[:, logits.shape[1] - n_positions:]
        return torch.log_softmax(logits.float(), dim=-1)

    def _score_naive(self, model, prompts, continuations, batch_size):
        k = len(continuations[0])
        pairs = [(i, j) for i in range(len(prompts)) for j in range(k)]
        seqs = [prompts[i] + continuations[i][j] for i, j in pairs]
        order = sorted(range(len(seqs)), key=lambda p: len(seqs[p]))
        total = np.zeros((len(prompts), k))
        count = np.zeros((len(prompts), k))
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = self.collate([seqs[p] for p in chunk])
            logp = self._logits(self._forward(model, **batch), batch["input_ids"].shape[1])
            for row, p in enumerate(chunk):
                i, j = pairs[p]
                start, cont = len(prompts[i]), continuations[i][j]
                pos = torch.arange(start - 1, start - 1 + len(cont), device=logp.device)
                tgt = torch.tensor(cont, device=logp.device)
                total[i, j] = float(logp[row, pos, tgt].sum())
                count[i, j] = len(cont)
        return total, count

    def _score_cached(self, model, prompts, continuations, batch_size):
        n, k = len(prompts), len(continuations[0])
        # the shared prefix leaves at least one token per prompt: its logits predict the first continuation token
        shared = max(0, min(_common_prefix(prompts), min(len(p) for p in prompts) - 1))
        prefix_cache = None
        dev = self.device
        if shared:
            ids = torch.tensor([prompts[0][:shared]], device=dev)
            out = self._forward(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            prefix_cache = out.past_key_values
        total = np.zeros((n, k))
        count = np.zeros((n, k))
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        for s in range(0, n, batch_size):
            chunk = order[s : s + batch_size]
            b = len(chunk)
            suffix = [prompts[i][shared:] for i in chunk]
            width = max(len(x) for x in suffix)
            batch = self.collate(suffix)
            mask = torch.cat([torch.ones((b, shared), dtype=torch.long, device=dev), batch["attention_mask"]], 1)
            pos = (shared + torch.arange(width, device=dev)).expand(b, width)
            past = None
            if prefix_cache is not None:
                past = copy.deepcopy(prefix_cache)
                past.batch_repeat_interleave(b)
            out = self._forward(model, input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                                past_key_values=past, use_cache=True)
            logp = self._logits(out, width)
            lens = torch.tensor([len(x) for x in suffix], device=dev)
            last = logp[torch.arange(b, device=dev), lens - 1]  # (b, vocab): next-token distribution per prompt
            conts = [[continuations[i][j] for j in range(k)] for i in chunk]
            first = torch.tensor([[c[0] for c in row] for row in conts], device=dev)
            first_lp = last.gather(1, first)  # (b, k)
            for r, i in enumerate(chunk):
                total[i] = first_lp[r].cpu().numpy()
                count[i] = [len(c) for c in conts[r]]
            longest = max(len(c) for row in conts for c in row)
            if longest == 1:
                continue
            # continuations of several tokens: feed them after each prompt, reusing its cache k times
            cache = out.past_key_values
            if k > 1:
                cache.batch_repeat_interleave(k)
            flat = [c for row in conts for c in row]
            cb = self.collate(flat)
            cwidth = cb["input_ids"].shape[1]
            mask_k = mask.repeat_interleave(k, 0)
            full_mask = torch.cat([mask_k, cb["attention_mask"]], 1)
            start = (shared + lens).repeat_interleave(k)
            cpos = start[:, None] + torch.arange(cwidth, device=dev)[None, :]
            out2 = self._forward(model, input_ids=cb["input_ids"], attention_mask=full_mask, position_ids=cpos,
                                 past_key_values=cache, use_cache=False)
            logp2 = self._logits(out2, cwidth)
            for f, c in enumerate(flat):
                if len(c) > 1:
                    tgt = torch.tensor(c[1:], device=dev)
                    lp = float(logp2[f, torch.arange(len(c) - 1, device=dev), tgt].sum())
                    total[chunk[f // k], f % k] += lp
        return total, count

    # ---- generation --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int = 0, model: nn.Module | None = None,
                 batch_size: int = 16, max_length: int | None = None,
                 stream: dict[int, Callable[[str], bool]] | None = None) -> list[Generation]:
        """Complete formatted prompts: greedy when ``temperature`` is 0, sampled (seeded) otherwise.

        Generation stops at EOS, at any ``stop`` string (cut from the text) or after ``max_new_tokens``.
        ``stream`` maps prompt indices to callbacks that receive that prompt's text while it is generated (in
        this thread, in pieces that add up to the returned text; see :mod:`.streaming`); a callback that returns
        False ends its prompt's generation early. Streaming changes no result.
        """
        model = self._model if model is None else model
        was_training = model.training
        model.eval()
        tok = self._tokenizer
        ids = [self.prompt_ids(p, max_length) for p in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        kw = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        if stop:
            kw.update(stop_strings=list(stop), tokenizer=tok)
        try:
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                batch = self.collate([ids[i] for i in chunk], left=True)
                streamer, step_kw = None, kw
                if stream and any(i in stream for i in chunk):
                    streamer = RowStreamer(tok, [stream.get(i) for i in chunk], list(stop or ()), tok.eos_token_id,
                                           lambda toks: self._completion(toks, stop)[0])
                    step_kw = {**kw, "streamer": streamer, "stopping_criteria": streamer.criteria()}
                torch.manual_seed(seed + s)
                with self.autocast():
                    seqs = model.generate(**batch, **step_kw)
                new = seqs[:, batch["input_ids"].shape[1]:].cpu()
                for r, i in enumerate(chunk):
                    text, n_gen = self._completion(new[r].tolist(), stop)
                    out[i] = Generation(text, len(ids[i]), n_gen)
                    if streamer is not None:
                        streamer.close(r, text)
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _completion(self, toks: list[int], stop: list[str] | None) -> tuple[str, int]:
        """A row's text and generated-token count from its new ids: up to EOS (counted), without the padding that
        follows a row that finished before the others (a stop string), and cut before the first stop string."""
        tok = self._tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        if eos is not None and eos in toks:
            n_gen = toks.index(eos) + 1
        else:
            n_gen = len(toks)
            while n_gen and toks[n_gen - 1] == pad and pad != eos:
                n_gen -= 1
        text = tok.decode(toks[:n_gen], skip_special_tokens=True)
        cuts = [i for i in (text.find(st) for st in stop or ()) if i >= 0]
        return (text[: min(cuts)] if cuts else text), n_gen
