"""``tunebench ui``: the read-only web app over a store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..config import DEFAULT_STORE
from ..errors import TunebenchError
from ..store import Store
from .common import StoreOpt, VerboseOpt, err, fail, setup_logging

def ui(store: Optional[str] = StoreOpt,
       host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (off loopback an API key is "
                                "required)."),
       port: int = typer.Option(8765, "--port", min=1, max=65535, help="Port to listen on."),
       api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Accepted API keys, one per line "
                                                   "(also $TUNEBENCH_API_KEY); the same keys as tunebench serve."),
       allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", help="Host header values to accept "
                                                        "(repeatable; default: the loopback names, or --host)."),
       verbose: bool = VerboseOpt) -> None:
    """Browse studies, evidence and every test item in a browser: studies live while runs write, the recommendation
    under your constraints, the item explorer, trials and prompt versions. Read-only."""
    setup_logging(verbose)
    import uvicorn  # heavy: the ASGI server

    from ..serve import API_KEY_ENV, api_keys, is_loopback  # heavy: serve's package loads its engines
    from ..ui import create_app  # heavy: the analysis and templates

    try:
        loopback = is_loopback(host)
        keys = None
        if not loopback or api_key_file is not None or os.environ.get(API_KEY_ENV):
            keys = api_keys(api_key_file, no_auth=False, host=host)
        hosts = list(allowed_host) if allowed_host else (  # None: the app's loopback names
            None if loopback else ["*"] if host in ("0.0.0.0", "::") else [host])
        st = Store(store or DEFAULT_STORE, create=False)
        app = create_app(st, api_keys=keys, allowed_hosts=hosts)
    except TunebenchError as exc:
        fail(exc)
    shown = "localhost" if loopback else host
    err.print(f"[bold]tunebench ui[/] over {st.display}: http://{shown}:{port}/  (read-only; Ctrl-C stops)")
    err.print("  auth: " + ("[yellow]off (loopback only)[/]" if keys is None else f"{len(keys)} API key(s)"))
    uvicorn.run(app, host=host, port=port, log_level="warning" if not verbose else "info")
