"""tunebench: prompt engineering or fine-tuning? Measure the adaptation ladder on your own data.

Example:
    >>> from tunebench import Study, load_study
    >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
    >>> rows = Study(cfg, base_dir=base).run()  # doctest: +SKIP
"""

from .config import StudyConfig, parse_study
from .errors import TunebenchError
from .runner import Study, load_study
from .store import Store
from .version import __version__

__all__ = ["Store", "Study", "StudyConfig", "TunebenchError", "load_study", "parse_study", "__version__"]
