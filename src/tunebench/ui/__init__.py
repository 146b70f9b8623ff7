"""``tunebench ui``: studies, evidence and every test item in the browser, read-only, over a results store.

Example:
    >>> app = create_app(Store("tunebench-runs"))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8765)
"""

from .app import create_app, session_token
from .explorer import Query, explore

__all__ = ["Query", "create_app", "explore", "session_token"]
