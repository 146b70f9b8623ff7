"""A real third-party OpenAI-compatible server for the openai backend: llama-cpp-python's, on the tiny Llama.

Used by tests/test_llamacpp.py and bench/llamacpp_server.py:

* :func:`build_tiny_llama`: the tests' 2-layer random Llama (conftest's byte-level BPE tokenizer and chat
  template), whose tokenizer starts inputs with ``<s>`` like Llama's own;
* :func:`write_gguf`: that model as a GGUF file llama.cpp reads (every tensor f32: nothing is quantised), with
  the tokenizer as llama.cpp's ``gpt2`` BPE (tokens, merges, the ``gpt-2`` pre-tokenizer, ``<s>`` added) and
  the chat template;
* :class:`LlamaCppServer`: ``python -m llama_cpp.server`` on that file, on a free loopback port, stopped on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODEL_ID = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_llama(out: Path, bos: bool = True) -> Path:
    """The conftest tiny Llama (same shape, seed and chat template), its tokenizer adding ``<s>`` to inputs
    (``bos``: as Llama's own do)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _bpe_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(out, chat=True, bos=bos)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def local_logprobs(llama_dir: Path, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """Each text's token ids (without ``<s>``) and the log-probability of every one of them the local HF model
    (fp32) gives after what precedes it: one value per token with ``<s>`` in front, none for the first without."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            values = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy().astype(float)
            out.append((tok(t, add_special_tokens=False)["input_ids"], values))
    return out


def echo_difference(choice, n_tokens: int, values: np.ndarray) -> float:
    """Largest difference between an echoed choice's log-probabilities of the text's ``n_tokens`` tokens and the
    local ``values`` (:func:`local_logprobs`). The first echoed token carries none (OpenAI's convention)."""
    theirs = np.asarray(choice.logprobs.token_logprobs[1:n_tokens], dtype=float)
    return float(np.abs(theirs - values[len(values) - len(theirs):]).max())


def _rope_rows(w, heads: int):
    """Hugging Face Llama rotates the two halves of each head's query/key vector as pairs (i, i + d/2); llama.cpp's
    ``llama`` architecture rotates neighbours (2i, 2i + 1). Reorder each head's rows so GGUF computes the same."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """``hf_dir`` (a LlamaForCausalLM and its byte-level BPE tokenizer) as an all-f32 GGUF file at ``out``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, LlamaConfig

    cfg = LlamaConfig.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    state = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tunebench tiny llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    # the tokenizer: llama.cpp's byte-level BPE ("gpt2") with GPT-2's pre-tokenizer split, which is what
    # tokenizers' ByteLevel(use_regex=True) applies
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be 0..n-1"
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(tok("x")["input_ids"][:1] == [tok.bos_token_id])
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in state.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            t = np.ascontiguousarray(_rope_rows(t, heads))
        elif name.endswith("k_proj.weight"):
            t = np.ascontiguousarray(_rope_rows(t, kv_heads))
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{name}: no GGUF name for this tensor")
        w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


class LlamaCppServer:
    """``python -m llama_cpp.server`` on ``gguf_path`` on a free loopback port (``url``: its ``/v1`` base URL).

    ``logits_all`` keeps every position's logits (prompt log-probabilities with ``echo``); ``f32_cache`` keeps the
    KV cache in f32 (llama.cpp's default is f16, which costs about 1e-3 in log-probability).
    """

    def __init__(self, gguf_path: Path, *, log_path: Path, python: str = sys.executable, f32_cache: bool = True,
                 n_ctx: int = 512, start_timeout_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        args = [python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", MODEL_ID,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx), "--logits_all", "true"]
        if f32_cache:
            args += ["--type_k", "0", "--type_v", "0"]  # GGML_TYPE_F32
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._wait(start_timeout_s)

    def _wait(self, timeout_s: float) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"llama_cpp.server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer /v1/models in {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
