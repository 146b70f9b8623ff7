"""Which model, and how it is reached: one options block per backend, chosen by ``backend:`` (default encoder).

``ModelConfig(...)`` builds the block its ``backend`` names (``EncoderModel``, ``CausalModel`` or
``OpenAIModel``); a study's ``model:``/``models:`` fields validate as :data:`AnyModelConfig`, the union
discriminated by ``backend``. The YAML is the same as when all options sat in one block: an option of another
backend is refused with the backend it belongs to, unless it holds that option's default (stores written then
dump every option).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from .base import _Strict
from .files import clip

# Every option of every backend with its default: stored configs of older versions carry all of them, and trial
# keys (``identity``) are computed over this full set so that they do not change.
_DEFAULTS: dict[str, Any] = {
    "path": "default", "precision": "auto", "device": "auto", "chat_template": "auto", "system_prompt": None,
    "retriever": "default", "base_url": None, "model": None, "api_key_env": "OPENAI_API_KEY", "api": "chat",
    "max_concurrency": 8, "timeout_s": 60.0, "max_retries": 5, "tuned": None, "extra_body": None,
}
_NEW_KEYS = ("extra_body",)  # options added later: in trial keys only when set, so that older keys stay valid
_REMOTE_KEYS = ("base_url", "model", "api_key_env", "api", "max_concurrency", "timeout_s", "max_retries", "tuned",
                "extra_body")
_NOT_IN_KEYS = ("max_concurrency", "timeout_s", "max_retries", "api_key_env", "path")  # how a remote is reached


class ModelConfig(_Strict):
    """Options every backend has. ``ModelConfig(backend=..., ...)`` returns the backend's own block."""

    backend_name: ClassVar[str] = ""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                             description="Short name (with several models: trial labels end in @name).")
    backend: Literal["encoder", "causal", "openai"] = Field(
        "encoder", description="encoder: HF encoder (embeddings, heads); causal: HF causal LM (prompts, generation); "
        "openai: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp, tunebench serve), prompting only.")
    path: str = Field("default", description="Local directory or hub id; 'default' is the embedded all-MiniLM-L6-v2.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it, fp32 otherwise.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N].")

    def __new__(cls, *args: Any, **data: Any):
        if cls is ModelConfig:  # the generic name builds the block of the backend asked for
            backend = data.get("backend", "encoder")
            cls = _BLOCKS.get(backend if isinstance(backend, str) else "encoder", EncoderModel)
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any):
        if cls is ModelConfig:
            return _ADAPTER.validate_python(obj, **kw)
        return super().model_validate(obj, **kw)

    @model_validator(mode="before")
    @classmethod
    def _foreign(cls, v: Any) -> Any:
        """Options of another backend: dropped when they hold the default (older stored configs), else refused."""
        if not isinstance(v, dict) or cls is ModelConfig:
            return v
        out = dict(v)
        if "backend" in out and not (isinstance(out["backend"], str) and out["backend"] in _BLOCKS):
            raise ValueError(f"backend: {clip(out['backend'], 40)} is not one of {', '.join(_BLOCKS)}")
        for key in set(out) - set(cls.model_fields):
            if key in _DEFAULTS and out[key] == _DEFAULTS[key]:
                out.pop(key)
            elif key in _DEFAULTS:
                owners = [b for b, block in _BLOCKS.items() if key in block.model_fields]
                raise ValueError(f"{key}: only for backend: {' or '.join(owners)}")
        return out

    def identity(self) -> dict[str, Any]:
        """What identifies the model in trial keys (the remote keys only when remote, so older keys stay valid)."""
        d = {**_DEFAULTS, **self.model_dump(exclude={"name"})}
        drop = _REMOTE_KEYS if self.backend != "openai" else _NOT_IN_KEYS
        for k in drop:
            d.pop(k, None)
        for k in _NEW_KEYS:
            if d.get(k) == _DEFAULTS[k]:
                d.pop(k, None)
        return d


class EncoderModel(ModelConfig):
    """An encoder (BERT family): embeddings for prompting by similarity, heads and adapters for tuning."""

    backend: Literal["encoder"] = "encoder"


class CausalModel(ModelConfig):
    """A Hugging Face causal LM: prompts, scoring, generation and every tuning strategy."""

    backend: Literal["causal"] = "causal"
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="causal: wrap prompts in the tokenizer's chat template (auto: when it has one).")
    system_prompt: str | None = Field(None, description="causal: system message when a chat template is used.")
    retriever: str = Field("default", description="Encoder used to retrieve few-shot demonstrations for causal "
                           "models (local dir or hub id; 'default' is all-MiniLM-L6-v2).")

    @model_validator(mode="after")
    def _check(self) -> CausalModel:
        if self.path == "default":
            raise ValueError("the causal backend needs 'path': a local model directory or a hub id "
                             "(the embedded default is an encoder)")
        return self


class OpenAIModel(ModelConfig):
    """Any OpenAI-compatible endpoint, prompting only."""

    backend: Literal["openai"] = "openai"
    system_prompt: str | None = Field(None, description="openai: system message of chat requests.")
    retriever: str = Field("default", description="Encoder used to retrieve few-shot demonstrations (local dir or "
                           "hub id; 'default' is all-MiniLM-L6-v2).")
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai: the endpoint's base URL, e.g. "
                                 "https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="openai: the model id the endpoint serves (its `model` field).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key "
                                    "(null: the endpoint needs none).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="openai: chat (/chat/completions: messages) or completions (/completions: raw prompt; "
        "also label log-probabilities via echo, where the endpoint supports it).")
    max_concurrency: int = Field(8, ge=1, le=256, description="openai: most requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, le=86400, description="openai: seconds before a request is abandoned (and retried).")
    max_retries: int = Field(5, ge=0, le=20, description="openai: retries, with exponential backoff, on 429, 5xx, "
                             "timeouts and dropped connections.")
    tuned: str | None = Field(None, description="openai: the endpoint serves a model tuned elsewhere (e.g. a "
                              "tunebench trial id or an ft: model); prompting on it counts as a hybrid.")
    extra_body: dict[str, Any] | None = Field(
        None, description="openai: fields added to every request body, for a server's own sampling options, e.g. "
        "{repeat_penalty: 1.0} for llama-cpp-python (which otherwise penalises repeats even at temperature 0).")

    @model_validator(mode="after")
    def _check(self) -> OpenAIModel:
        if not self.base_url or not self.model:
            raise ValueError("the openai backend needs 'base_url' (e.g. http://127.0.0.1:8000/v1) and 'model' "
                             "(the id the endpoint serves)")
        return self


_BLOCKS: dict[str, type[ModelConfig]] = {"encoder": EncoderModel, "causal": CausalModel, "openai": OpenAIModel}


def _backend_of(v: Any) -> str:
    if isinstance(v, dict):
        backend = v.get("backend", "encoder")
        return backend if isinstance(backend, str) and backend in _BLOCKS else "encoder"
    return getattr(v, "backend", "encoder")


AnyModelConfig = Annotated[Union[Annotated[EncoderModel, Tag("encoder")], Annotated[CausalModel, Tag("causal")],
                                 Annotated[OpenAIModel, Tag("openai")]], Discriminator(_backend_of)]

from pydantic import TypeAdapter  # noqa: E402  (after the blocks it validates)

_ADAPTER: TypeAdapter = TypeAdapter(AnyModelConfig)
