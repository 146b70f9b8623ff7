"""The read side: statistics over stored trials, the leaderboard and the recommendation. Never runs a trial."""

from .evidence import Evidence, analyze

__all__ = ["Evidence", "analyze"]
