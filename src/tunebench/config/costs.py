"""The price table and its parsing from command-line amounts."""

from __future__ import annotations

import math
from typing import Iterable

from pydantic import Field

from ..errors import TunebenchError
from .base import _Strict


class ApiPrice(_Strict):
    """What a hosted model costs per million tokens."""

    input_per_1m: float = Field(ge=0, le=1e6, description="Price per 1M prompt (input) tokens.")
    output_per_1m: float = Field(0.0, ge=0, le=1e6, description="Price per 1M completion (output) tokens.")


class CostConfig(_Strict):
    """The price table: how training and serving are paid for, and how much traffic is expected."""

    train_per_hour: float = Field(1.0, ge=0, le=1e6, description="Hourly cost of the hardware that trains (self-hosted).")
    serve_per_hour: float = Field(1.0, ge=0, le=1e6, description="Hourly cost of the hardware that serves (self-hosted).")
    concurrency: int = Field(1, ge=1, le=1_000_000, description="Requests one serving machine handles at once at the measured "
                             "latency (self-hosted cost per request = latency x hourly rate / concurrency).")
    volume_per_day: float = Field(10000, ge=0, le=1e12, description="Expected requests per day.")
    horizon_days: float = Field(90, gt=0, le=36_500, description="Days over which total cost is counted.")
    api: dict[str, ApiPrice] = Field(default_factory=dict, description="Per model name: token prices of a hosted "
                                     "API; those models are priced by tokens instead of serving time.")
    currency: str = Field("$", max_length=4, description="Shown before amounts.")


# ---- command-line amounts and overrides --------------------------------------------------------------------
AMOUNT_MAX = 1e15  # the largest amount a flag takes (requests, ms, days or money): finite, and far above any use
AMOUNT_UNITS = {"volume": ("/day", "/d", "perday"), "ms": ("ms",), "days": ("days", "day", "d"), "money": ()}


def parse_amount(text: str, unit: str) -> float:
    """``50000/day`` → 50000, ``100ms`` → 100, ``90d`` → 90, ``$200`` → 200 (the unit suffix is optional)."""
    t = text.strip().lower().replace(",", "").replace("_", "")
    for suffix in AMOUNT_UNITS[unit]:
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    if unit == "days" and t.endswith("w"):
        return parse_amount(t[:-1], "money") * 7
    if unit == "ms" and t.endswith("s"):
        return parse_amount(t[:-1], "money") * 1000
    t = t.lstrip("$€£")
    mult = 1.0
    if t and t[-1] in "km":
        mult, t = (1e3 if t[-1] == "k" else 1e6), t[:-1]
    value = float(t) * mult
    if not math.isfinite(value) or value < 0 or value > AMOUNT_MAX:
        raise ValueError(text)
    return value


def parse_flag_amount(flag: str, text: str | None, unit: str, example: str) -> float | None:
    """:func:`parse_amount` for an option: ``None`` stays ``None``; unreadable text names the flag and an example."""
    if text is None:
        return None
    try:
        return parse_amount(text, unit)
    except ValueError:
        raise TunebenchError(f"{flag}: cannot read '{text}'; write it like {example}") from None


def parse_api_price(item: str) -> tuple[str, ApiPrice]:
    """``MODEL=IN/OUT`` (per 1M input/output tokens; OUT defaults to 0) → (model, price)."""
    try:
        model, prices = item.split("=", 1)
        inp, _, outp = prices.partition("/")
        return model.strip(), ApiPrice(input_per_1m=float(inp), output_per_1m=float(outp or 0))
    except (ValueError, TypeError):  # pydantic's ValidationError (inf, negative, over the range) is a ValueError
        raise TunebenchError(f"--api-price: cannot read '{item}'; write MODEL=IN/OUT, e.g. "
                             "gpt-4o-mini=0.15/0.60 (per 1M tokens)") from None


def override_costs(costs: CostConfig, *, train_per_hour: float | None = None, serve_per_hour: float | None = None,
                   concurrency: int | None = None, api_price: Iterable[str] | None = None) -> CostConfig:
    """``costs`` with the given fields replaced (``None`` keeps the study's value); ``api_price`` items
    (``MODEL=IN/OUT``) add or replace per-model token prices."""
    update: dict = {}
    if train_per_hour is not None:
        update["train_per_hour"] = train_per_hour
    if serve_per_hour is not None:
        update["serve_per_hour"] = serve_per_hour
    if concurrency is not None:
        update["concurrency"] = concurrency
    if api_price:
        update["api"] = {**costs.api, **dict(parse_api_price(item) for item in api_price)}
    try:
        return CostConfig(**{**costs.model_dump(), **update})
    except Exception as exc:  # pydantic: a negative rate, a zero concurrency
        raise TunebenchError(f"cost flags: {exc}") from None


def check_api_models(base: CostConfig, overridden: CostConfig, models: Iterable[str], study: str) -> None:
    """Every model newly priced by an override must be one of the study's ``models``."""
    names = sorted(set(models))
    unknown = [u for u in sorted(set(overridden.api) - set(base.api)) if u not in names]
    if unknown:
        raise TunebenchError(f"--api-price: no model named {', '.join(repr(u) for u in unknown)} in study "
                             f"'{study}' (its models: {', '.join(names)})")
