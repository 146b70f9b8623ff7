"""Claims: how several drivers share one store. A trial is claimed in the store before it runs; a heartbeat
thread keeps this driver's claims alive; a driver that dies stops renewing, its claims expire, and the next driver
that looks runs those trials again."""

from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import TunebenchError
from ..store import Store
from ..store.results import host_name, new_owner
from .spec import TrialSpec

log = logging.getLogger(__name__)


class Claims:
    """This driver's claims on ``study``'s trials in ``store``, renewed every ``ttl / 4`` seconds while open.

    Example:
        >>> with Claims(store, "sst2", ttl=120) as claims:  # doctest: +SKIP
        ...     if claims.claim(spec): run(spec)
    """

    def __init__(self, store: Store, study: str, ttl: float = 120.0, owner: str | None = None):
        self.store, self.study, self.ttl = store, study, ttl
        self.owner = owner or new_owner()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_heartbeats = 0

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="tunebench-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:  # claims of trials that never finished (Ctrl-C, an error): free them now rather than at expiry
            for c in self.store.claims(self.study):
                if c["owner"] == self.owner:
                    self.store.release(c["key"], self.owner)
        except TunebenchError as err:
            log.warning("could not release claims: %s (they expire in %.0fs)", err, self.ttl)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.store.renew(self.owner, self.ttl)
            except TunebenchError as err:  # a store that is briefly unreachable: keep trying until expiry
                self.lost_heartbeats += 1
                log.warning("heartbeat failed (%s); claims expire %.0fs after the last one", err, self.ttl)

    def claim(self, spec: TrialSpec) -> bool:
        """True when this driver now holds ``spec``'s trial: it is not finished, no live claim of another driver
        holds it, and it has not failed since this driver started (a failure is retried by the next run)."""
        if any(f["key"] == spec.key for f in self.store.failures(self.study, since=self.started)):
            return False
        dead = next((c["owner"] for c in self.store.claims(self.study) if c["key"] == spec.key and _dead_here(c)),
                    None)
        return self.store.claim(self.study, spec.key, self.owner, self.ttl, take_from=dead)

    def failed(self, spec: TrialSpec, error: BaseException) -> None:
        self.store.record_failure(self.study, spec.key, spec.name, f"{type(error).__name__}: {error}", self.owner)

    def held_elsewhere(self, keys: set[str]) -> list[dict]:
        """Live claims of other drivers among ``keys``."""
        return [c for c in self.store.claims(self.study)
                if c["key"] in keys and c["owner"] != self.owner and not c["expired"]]


def _dead_here(claim: dict) -> bool:
    """A claim of a process on this host that no longer exists (killed -9): no need to wait for its expiry. A
    reused pid only makes us wait, never take a live claim."""
    if claim["host"] != host_name() or claim["pid"] == os.getpid():
        return False
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
