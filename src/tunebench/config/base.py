"""Shared pydantic base of every config block."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


SEED_MAX = 2**32 - 1  # seeds are 32-bit: numpy's and torch's generators accept all of them
INT_MAX = 2**31 - 1  # the largest count any config field takes (sizes, epochs, tokens)


class _Strict(BaseModel):
    """Unknown keys are errors, and no float may be inf or NaN (every number a user writes has a finite range)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
