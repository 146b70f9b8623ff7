"""tunebench: prompt engineering or fine-tuning? Measure the adaptation ladder on your own data."""

__version__ = "0.1.0"
