"""Serving: a stored trial (or a plain causal LM) behind an OpenAI-compatible API, micro-batched."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from ..analysis.selection import find_trial
from ..store import Store
from ..store.artifacts import open_trial
from ..backends import load_backend
from ..config import ModelConfig
from ..errors import CapabilityError, ConfigError, TunebenchError
from .app import Limits, create_app
from .engine import Engine, LMEngine, TrialEngine

log = logging.getLogger(__name__)

API_KEY_ENV = "TUNEBENCH_API_KEY"

RUNTIMES = ("torch", "onnx", "auto")

__all__ = ["API_KEY_ENV", "RUNTIMES", "Engine", "LMEngine", "Limits", "TrialEngine", "api_keys", "create_app",
           "is_loopback", "lm_engine", "trial_engine"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_keys(key_file: Path | None, *, no_auth: bool, host: str) -> set[str] | None:
    """The accepted bearer keys (from ``key_file``, one per line, and ``$TUNEBENCH_API_KEY``); None when auth is off."""
    if no_auth:
        if not is_loopback(host):
            raise ConfigError(f"--no-auth: only on a loopback address (127.0.0.1, ::1, localhost), not {host}; "
                              f"give --api-key-file or set {API_KEY_ENV} to serve on {host}")
        return None
    keys: set[str] = set()
    if key_file is not None:
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: cannot read it ({exc.strerror})") from None
        keys |= {ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")}
        if not keys:
            raise ConfigError(f"--api-key-file {key_file}: no key in it (one key per line; # starts a comment)")
    env = os.environ.get(API_KEY_ENV, "")
    keys |= {k.strip() for k in env.split(",") if k.strip()}
    if not keys:
        raise ConfigError(f"serving needs an API key: --api-key-file FILE or {API_KEY_ENV}=KEY "
                          "(or --no-auth on a loopback address)")
    short = sorted(k for k in keys if len(k) < 16)
    if short:
        log.warning("%d API key(s) shorter than 16 characters; use long random keys", len(short))
    return keys


def trial_engine(store_root: Path, study: str, trial: str | None, *, best: bool, raw: bool = False,
                 metric: str | None = None, runtime: str = "torch", onnx_dir: str | Path | None = None,
                 threads: int | None = None, recheck_margin: float | None = None, status=None) -> Engine:
    """The engine for a stored trial: its task endpoint, or with ``raw`` its tuned LM as a plain model.

    ``runtime``: ``torch`` runs the trial's own predictor; ``onnx`` runs its int8 ONNX graph (onnxruntime), from
    the export at ``onnx_dir`` (default ``exports/STUDY-ID-onnx``) or exported there first; ``auto`` is ``onnx``
    for an encoder classifier that can be exported, else ``torch``. ``threads`` bounds onnxruntime's threads;
    ``recheck_margin`` overrides the export's calibrated near-tie margin (0: int8 alone, no fp32 recheck).
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: '{runtime}' is not one of {', '.join(RUNTIMES)}")
    store = Store(store_root, create=False)
    row = find_trial(store, study, trial, best=best, metric=metric)
    if raw and row["strategy"] == "cascade":  # refused before either of its two models is loaded
        raise CapabilityError(f"--raw serves one tuned LM as a plain model; trial {row['key'][:8]} is a cascade of "
                              "two models (serve it without --raw)")
    loaded = open_trial(store, study, row)
    if raw:
        if runtime == "onnx":
            raise CapabilityError("--raw serves a causal LM, which has no ONNX runtime here; use --runtime torch")
        if loaded.backend.name != "causal":
            raise CapabilityError(f"--raw serves a causal trial's tuned LM as a plain model; trial {loaded.key[:8]} "
                                  f"runs on the {loaded.backend.name} backend")
        info = {"study": study, "trial": loaded.key, "strategy": loaded.row["strategy"], "label": loaded.row["label"]}
        return LMEngine(loaded.backend, getattr(loaded.predictor, "model", None), f"{loaded.name}:raw", info)
    if runtime == "torch":
        return TrialEngine(loaded)
    from ..export import OnnxClassifier, check_format, onnx_export_for  # heavy: onnx and onnxruntime

    try:
        check_format(loaded.row["strategy"], loaded.row.get("params"), loaded.model_config.backend, "onnx",
                     f"trial {loaded.key[:8]}")
        import onnxruntime  # noqa: F401  (an optional dependency: tunebench[export])
    except ImportError:
        if runtime == "onnx":
            raise CapabilityError("--runtime onnx needs onnxruntime: pip install onnxruntime onnx") from None
        log.info("--runtime auto: onnxruntime is not installed; serving with PyTorch")
        return TrialEngine(loaded)
    except TunebenchError as exc:
        if runtime == "onnx":
            raise CapabilityError(f"--runtime onnx: {exc}") from None
        log.info("--runtime auto: serving with PyTorch (%s)", exc)
        return TrialEngine(loaded)
    path = onnx_export_for(loaded, onnx_dir, status=status)
    loaded.predictor = OnnxClassifier(path, quantized=True, threads=threads,  # the PyTorch weights are released
                                      recheck_margin=recheck_margin)
    return TrialEngine(loaded, runtime="onnx-int8", export=path)


def lm_engine(path: str, name: str | None = None, *, precision: str = "auto", device: str = "auto") -> Engine:
    """A causal LM from a local directory (or hub id) as a plain completion model."""
    backend = load_backend(ModelConfig(backend="causal", path=path, precision=precision, device=device))
    return LMEngine(backend, None, name or Path(path.rstrip("/")).name or "model")
