"""Which model, and how it is reached."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import _Strict


class ModelConfig(_Strict):
    """Which model, and how it is reached."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                             description="Short name (with several models: trial labels end in @name).")
    backend: Literal["encoder", "causal", "openai"] = Field(
        "encoder", description="encoder: HF encoder (embeddings, heads); causal: HF causal LM (prompts, generation); "
        "openai: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp, tunebench serve), prompting only.")
    path: str = Field("default", description="Local directory or hub id; 'default' is the embedded all-MiniLM-L6-v2.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it, fp32 otherwise."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N].")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="causal: wrap prompts in the tokenizer's chat template (auto: when it has one).")
    system_prompt: str | None = Field(None, description="causal: system message when a chat template is used.")
    retriever: str = Field("default", description="Encoder used to retrieve few-shot demonstrations for causal "
                           "models (local dir or hub id; 'default' is all-MiniLM-L6-v2).")
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai: the endpoint's base URL, e.g. "
                                 "https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="openai: the model id the endpoint serves (its `model` field).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key "
                                    "(null: the endpoint needs none).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="openai: chat (/chat/completions: messages) or completions (/completions: raw prompt; "
        "also label log-probabilities via echo, where the endpoint supports it).")
    max_concurrency: int = Field(8, ge=1, le=256, description="openai: most requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds before a request is abandoned (and retried).")
    max_retries: int = Field(5, ge=0, le=20, description="openai: retries, with exponential backoff, on 429, 5xx, "
                             "timeouts and dropped connections.")
    tuned: str | None = Field(None, description="openai: the endpoint serves a model tuned elsewhere (e.g. a "
                              "tunebench trial id or an ft: model); prompting on it counts as a hybrid.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backend == "causal" and self.path == "default":
            raise ValueError("the causal backend needs 'path': a local model directory or a hub id "
                             "(the embedded default is an encoder)")
        if self.backend == "openai" and (not self.base_url or not self.model):
            raise ValueError("the openai backend needs 'base_url' (e.g. http://127.0.0.1:8000/v1) and 'model' "
                             "(the id the endpoint serves)")
        remote = [k for k in _REMOTE_KEYS if k != "api_key_env" and getattr(self, k) != type(self).model_fields[k].default]
        if self.backend != "openai" and remote:
            raise ValueError(f"{', '.join(remote)}: only for backend: openai")
        return self

    def identity(self) -> dict[str, Any]:
        """What identifies the model in trial keys (the remote keys only when remote, so older keys stay valid)."""
        d = self.model_dump(exclude={"name"})
        if self.backend != "openai":
            for k in _REMOTE_KEYS:
                d.pop(k, None)
        else:  # how it is reached (concurrency, timeouts, retries, key variable) does not change results
            for k in ("max_concurrency", "timeout_s", "max_retries", "api_key_env", "path"):
                d.pop(k, None)
        return d


_REMOTE_KEYS = ("base_url", "model", "api_key_env", "api", "max_concurrency", "timeout_s", "max_retries", "tuned")
