"""What the CLI prints besides its own output: a library's warnings only with --verbose."""

from __future__ import annotations

import logging
import warnings

from tunebench.cli.common import setup_logging


def _library_warning(text: str) -> None:
    """A FutureWarning as transformers raises one (a deprecation the user cannot act on)."""
    warnings.warn_explicit(text, FutureWarning, "transformers/modeling_utils.py", 3312,
                           module="transformers.modeling_utils", registry={})


def test_library_warnings_are_quiet_unless_verbose(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the suite's own config ignores FutureWarning; a user's Python does not
        try:
            setup_logging(False)
            _library_warning("`is_gradient_checkpointing` is deprecated and will be removed in v6")
            assert "is_gradient_checkpointing" not in capsys.readouterr().err
            setup_logging(True)
            _library_warning("`is_gradient_checkpointing` is deprecated and will be removed in v6")
            assert "is_gradient_checkpointing" in capsys.readouterr().err
        finally:
            logging.captureWarnings(False)
