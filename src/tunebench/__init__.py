"""tunebench: prompt engineering or fine-tuning? Measure the adaptation ladder on your own data.

Example:
    >>> from tunebench import Study, load_study
    >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
    >>> rows = Study(cfg, base_dir=base).run()  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import StudyConfig, load_study, parse_study  # noqa: E402
from .errors import TunebenchError  # noqa: E402
from .store import Store  # noqa: E402
from .study import Study  # noqa: E402

__all__ = ["Store", "Study", "StudyConfig", "TunebenchError", "load_study", "parse_study", "__version__"]
