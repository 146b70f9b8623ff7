"""Running the app under uvicorn: connection deadlines, bounded concurrency and a graceful drain on SIGTERM.

* A request's head (line and headers) must arrive within ``Limits.header_timeout_s`` of its first byte, or of
  the connection opening: a client that drips headers (or never sends any) cannot hold a connection.
  ``BodyLimit`` bounds the body the same way; headers are at most 16 KiB (h11's bound on an incomplete event).
* Open connections and requests in progress are bounded by ``Limits.max_connections`` (beyond: 503).
* On SIGTERM (or Ctrl-C) the server drains: responses say ``Connection: close`` from the signal on, it stops
  accepting, answers every request in progress (the batcher finishes queued jobs), and gives an idle
  keep-alive connection a moment to deliver a request already on its way before it closes it.
"""

from __future__ import annotations

import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import Limits
from .guards import Drain

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
IDLE_GRACE_S = 2.0  # how long an idle keep-alive connection stays open once a drain starts
GRACEFUL_SHUTDOWN_S = 30


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a grace for idle connections at shutdown."""

    head_timeout: float = 10.0
    idle_grace: float = IDLE_GRACE_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = None
        self._draining = False
        super().connection_made(transport)
        self._arm()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._idle():
            self._arm()  # the deadline runs from the first byte of a head; later bytes do not extend it
        super().data_received(data)
        if not self._idle():  # a whole head arrived: the request runs (BodyLimit bounds its body)
            self._disarm()
            if self._draining:
                self.cycle.keep_alive = False

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._idle() and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request within %.0f s", self.head_timeout)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Called when the server starts shutting down: an idle connection gets ``idle_grace`` seconds, so that
        a request the client sent just before it learnt of the shutdown is answered, not reset."""
        if self._idle() and not self._draining and self.idle_grace > 0:
            self._draining = True
            self.loop.call_later(self.idle_grace, self._shutdown_now)
            return
        self._draining = True
        super().shutdown()

    def _shutdown_now(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()


def protocol_class(head_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11", (GuardedH11Protocol,), {"head_timeout": head_timeout})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also tells the app (through ``drain``) the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        self.drain.begin()  # a flag only: this runs in a signal handler
        super().handle_exit(sig, frame)


def server_config(app, *, host: str, port: int, limits: Limits, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_class(limits.header_timeout_s),
                          timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                          limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          lifespan="on")


def run_server(app, *, host: str, port: int, limits: Limits, log_level: str = "warning") -> None:
    """Serve ``app`` (from :func:`create_app`) until SIGTERM or Ctrl-C, then drain."""
    config = server_config(app, host=host, port=port, limits=limits, log_level=log_level)
    DrainingServer(config, app.state.drain).run()
