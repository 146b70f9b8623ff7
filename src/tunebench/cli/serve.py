"""``tunebench serve``: a stored trial (or a causal LM) behind the OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import TunebenchError
from ..serve.app import (
    Limits,  # fastapi, no model: the limit options take their help and defaults from Limits
)
from ..serve import RUNTIMES
from .common import StoreOpt, TrialOpt, VerboseOpt, err, fail, field_option, resolve_study, setup_logging, spinner


def serve(study: Optional[str] = typer.Argument(None, help="Study name or study YAML (omit with --model)."),
          trial: Optional[str] = TrialOpt,
          best: bool = typer.Option(False, "--best", help="Serve the top trial of the study's leaderboard."),
          model_path: Optional[str] = typer.Option(None, "--model", help="Serve a plain causal LM (local directory) "
                                                   "instead of a trial: completions and prompt log-probabilities."),
          raw: bool = typer.Option(False, "--raw", help="Serve a causal trial's tuned LM as a plain model (no prompt)."),
          name: Optional[str] = typer.Option(None, "--name", help="Model id for --model (default: the directory name)."),
          precision: str = typer.Option("auto", "--precision", help="--model: auto (bf16 autocast where the hardware "
                                        "has native bf16), bf16 or fp32."),
          runtime: str = typer.Option("torch", "--runtime", help="What runs a trial: torch (its own predictor, as "
                                      "evaluated), onnx (the int8 ONNX graph of an encoder classifier: from --onnx-dir, "
                                      "exported there first if absent) or auto (onnx where the trial allows it)."),
          onnx_dir: Optional[Path] = typer.Option(None, "--onnx-dir", help="--runtime onnx/auto: the trial's ONNX "
                                                  "export (default exports/STUDY-ID-onnx, where `tunebench export` "
                                                  "writes it)."),
          recheck_margin: Optional[float] = typer.Option(None, "--onnx-recheck-margin", min=0.0, help="--runtime "
                                                         "onnx/auto: inputs whose int8 top-2 logit gap is below this "
                                                         "are scored again in fp32 (default: the margin calibrated at "
                                                         "export; 0: int8 alone)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File of accepted API keys, one "
                                                      "per line (also: $TUNEBENCH_API_KEY, comma-separated)."),
          no_auth: bool = typer.Option(False, "--no-auth", help="No API key (allowed on a loopback address only)."),
          max_batch: int = field_option(Limits, "max_batch", "--max-batch"),
          window_ms: float = field_option(Limits, "batch_window_ms", "--batch-window-ms"),
          max_body: int = field_option(Limits, "max_body_bytes", "--max-body-bytes"),
          max_input_tokens: int = field_option(Limits, "max_input_tokens", "--max-input-tokens"),
          max_tokens: int = field_option(Limits, "max_tokens", "--max-tokens-limit"),
          max_inputs: int = field_option(Limits, "max_batch_inputs", "--max-inputs"),
          max_batch_tokens: int = field_option(Limits, "max_batch_tokens", "--max-batch-tokens"),
          max_queue: int = field_option(Limits, "max_queue", "--max-queue"),
          max_queue_per_caller: int = field_option(Limits, "max_queue_per_caller", "--max-queue-per-caller"),
          body_timeout: float = field_option(Limits, "body_timeout_s", "--body-timeout"),
          header_timeout: float = field_option(Limits, "header_timeout_s", "--header-timeout"),
          max_connections: int = field_option(Limits, "max_connections", "--max-connections"),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the model (default: "
                                                "PyTorch's, one per core); leave cores free for whatever shares the "
                                                "machine."),
          store: Optional[str] = StoreOpt, verbose: bool = VerboseOpt) -> None:
    """Serve a trial (or a causal LM) with the OpenAI API: /v1/models, /v1/chat/completions, /v1/completions
    (streaming too), /v1/classify and /health, micro-batched, behind bearer API keys."""
    setup_logging(verbose)
    from ..serve import (  # heavy: the engines load torch models
        api_keys,
        create_app,
        lm_engine,
        trial_engine,
    )
    from ..serve.server import run_server  # heavy: the ASGI server, only needed to serve

    try:
        if (model_path is None) == (study is None):
            raise TunebenchError("give a STUDY with --trial ID or --best, or --model PATH (not both)")
        if study is not None and (trial is None) == (not best):
            raise TunebenchError("say which trial: --trial ID or --best (one of them)")
        if runtime not in RUNTIMES:
            raise TunebenchError(f"--runtime: '{runtime}' is not one of {', '.join(RUNTIMES)}")
        if model_path is not None and runtime == "onnx":
            raise TunebenchError("--runtime onnx serves an encoder classifier trial; --model serves a causal LM "
                                 "(use --runtime torch)")
        keys = api_keys(api_key_file, no_auth=no_auth, host=host)
        with spinner("loading the model"):
            if model_path is not None:
                engine = lm_engine(model_path, name, precision=precision)
            else:
                name_, root = resolve_study(study, store)
                engine = trial_engine(root, name_, trial, best=best, raw=raw, runtime=runtime, onnx_dir=onnx_dir,
                                      threads=threads, recheck_margin=recheck_margin)
    except TunebenchError as exc:
        fail(exc)
    limits = Limits(max_body_bytes=max_body, max_input_tokens=max_input_tokens, max_tokens=max_tokens,
                    max_batch_inputs=max_inputs, max_queue=max_queue, max_queue_per_caller=max_queue_per_caller,
                    max_batch=max_batch, max_batch_tokens=max_batch_tokens, batch_window_ms=window_ms,
                    body_timeout_s=body_timeout, header_timeout_s=header_timeout, max_connections=max_connections)
    app_ = create_app(engine, api_keys=keys, limits=limits, max_batch=limits.max_batch,
                      window_ms=limits.batch_window_ms, threads=threads)
    info = engine.describe()
    what = f"{info.get('label', '')} ({info.get('strategy', '')})" if engine.kind == "trial" else info["base_model"]
    if info.get("runtime", "torch") != "torch":
        what += f", {info['runtime']} from {info.get('export')}"
        if (info.get("onnx_recheck") or {}).get("margin"):
            what += f" (near ties rechecked in fp32 below a logit gap of {info['onnx_recheck']['margin']:g})"
    shown = f"[{host}]" if ":" in host else host
    err.print(f"Serving [bold]{engine.id}[/]: {what}", highlight=False)
    err.print(f"  http://{shown}:{port}/v1  (chat/completions, completions, classify, models; /health)", highlight=False)
    err.print("  auth: " + ("[yellow]off (loopback only)[/]" if keys is None else f"{len(keys)} API key(s)"),
              highlight=False)
    run_server(app_, host=host, port=port, limits=limits, log_level="info" if verbose else "warning")
