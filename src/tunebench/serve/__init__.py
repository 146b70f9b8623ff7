"""Serving: a stored trial (or a plain causal LM) behind an OpenAI-compatible API, micro-batched."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from ..analysis.selection import load_trial
from ..backends import load_backend
from ..config import ModelConfig
from ..errors import CapabilityError, ConfigError
from .app import Limits, create_app
from .engine import Engine, LMEngine, TrialEngine

log = logging.getLogger(__name__)

API_KEY_ENV = "TUNEBENCH_API_KEY"

__all__ = ["API_KEY_ENV", "Engine", "LMEngine", "Limits", "TrialEngine", "api_keys", "create_app", "is_loopback",
           "lm_engine", "trial_engine"]


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
                 metric: str | None = None) -> Engine:
    """The engine for a stored trial: its task endpoint, or with ``raw`` its tuned LM as a plain model."""
    loaded = load_trial(store_root, study, trial, best=best, metric=metric)
    if not raw:
        return TrialEngine(loaded)
    if loaded.backend.name != "causal":
        raise CapabilityError(f"--raw serves a causal trial's tuned LM as a plain model; trial {loaded.key[:8]} "
                              f"runs on the {loaded.backend.name} backend")
    info = {"study": study, "trial": loaded.key, "strategy": loaded.row["strategy"], "label": loaded.row["label"]}
    return LMEngine(loaded.backend, getattr(loaded.predictor, "model", None), f"{loaded.name}:raw", info)


def lm_engine(path: str, name: str | None = None, *, precision: str = "auto", device: str = "auto") -> Engine:
    """A causal LM from a local directory (or hub id) as a plain completion model."""
    backend = load_backend(ModelConfig(backend="causal", path=path, precision=precision, device=device))
    return LMEngine(backend, None, name or Path(path.rstrip("/")).name or "model")
