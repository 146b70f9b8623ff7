"""The price table and its parsing from command-line amounts."""

from __future__ import annotations

from pydantic import Field

from .base import _Strict


class ApiPrice(_Strict):
    """What a hosted model costs per million tokens."""

    input_per_1m: float = Field(ge=0, description="Price per 1M prompt (input) tokens.")
    output_per_1m: float = Field(0.0, ge=0, description="Price per 1M completion (output) tokens.")


class CostConfig(_Strict):
    """The price table: how training and serving are paid for, and how much traffic is expected."""

    train_per_hour: float = Field(1.0, ge=0, description="Hourly cost of the hardware that trains (self-hosted).")
    serve_per_hour: float = Field(1.0, ge=0, description="Hourly cost of the hardware that serves (self-hosted).")
    concurrency: int = Field(1, ge=1, description="Requests one serving machine handles at once at the measured "
                             "latency (self-hosted cost per request = latency x hourly rate / concurrency).")
    volume_per_day: float = Field(10000, ge=0, description="Expected requests per day.")
    horizon_days: float = Field(90, gt=0, description="Days over which total cost is counted.")
    api: dict[str, ApiPrice] = Field(default_factory=dict, description="Per model name: token prices of a hosted "
                                     "API; those models are priced by tokens instead of serving time.")
    currency: str = Field("$", max_length=4, description="Shown before amounts.")
