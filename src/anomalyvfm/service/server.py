"""Running the app under uvicorn: the port, the connection cap, timeouts and graceful shutdown.

uvicorn has a keep-alive timeout but none for a connection that never finishes its request headers,
so 64 such connections used to fill the connection cap and every other client, `/health` included, got
503. `HeaderTimeoutProtocol` closes a connection whose headers are not complete `header_timeout` seconds
after it opened (or after its previous response), and the cap (`max_connections`) is set well above what
a normal line of cameras needs; body reads have their own timeout in the app (408).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from anomalyvfm.errors import UserInputError
from anomalyvfm.service.app import create_app
from anomalyvfm.service.limits import ServiceLimits
from anomalyvfm.service.observability import configure_logging

if TYPE_CHECKING:
    from anomalyvfm.store.inspections import InspectionStore

log = logging.getLogger("anomalyvfm.error")


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that take over `seconds` to send request headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request's headers
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # keep-alive: the idle wait is uvicorn's keep-alive timeout, then headers are timed again

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                client = ":".join(map(str, self.client or ()))
                log.warning("closed a connection that sent no complete request headers in time",
                            extra={"fields": {"event": "header_timeout", "client": client, "seconds": seconds}})
                self.transport.close()

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server, reloading the model on SIGHUP and logging which signal started a shutdown.

    uvicorn handles SIGINT and SIGTERM: stop accepting, let requests in flight finish (at most the
    graceful-shutdown timeout), then exit. SIGHUP (`systemctl reload`) used to kill the process at once,
    resetting requests in flight; here it reloads the served model directory (`Service.reload`, as
    `POST /admin/reload` does): requests in flight finish on the old version, the next batch is judged by
    the new one, and a model that cannot be loaded is logged while the old one keeps serving. A second
    Ctrl-C still forces an immediate exit (uvicorn).
    """

    received: int | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, config: uvicorn.Config, service: Any = None) -> None:
        super().__init__(config)
        self.service = service  # `app.Service`, reloaded on SIGHUP (None: SIGHUP is ignored)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGHUP, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()  # where a SIGHUP's reload runs
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGHUP:  # not an exit: the reload runs in the event loop, not inside the signal handler
            if self.loop is not None and self.service is not None:
                self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.reload()))
            return
        self.received = self.received or sig
        super().handle_exit(sig, frame)

    async def reload(self) -> None:
        with contextlib.suppress(UserInputError):  # logged by the service (`reload_failed`); the old model serves on
            await self.service.reload()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.received is not None:  # logged here, in the event loop, not inside the signal handler
            in_flight = sum(1 for c in self.server_state.connections if getattr(c, "cycle", None) is not None
                            and not c.cycle.response_complete)
            name = signal.Signals(self.received).name
            log.info(f"{name}: draining, {in_flight} requests in flight get up to "
                     f"{self.config.timeout_graceful_shutdown} s to finish, then the server exits",
                     extra={"fields": {"event": "shutdown", "signal": name, "in_flight": in_flight}})
        await super().shutdown(sockets)


def server_config(app: Any, limits: ServiceLimits, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> uvicorn.Config:
    """uvicorn settings for `app` with the service's connection cap and timeouts (also used by the tests)."""
    return uvicorn.Config(app, host=host, port=port, http=header_timeout_protocol(limits.header_timeout),
                          limit_concurrency=limits.max_connections, timeout_keep_alive=5,
                          timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout)), access_log=False, **kwargs)


def run_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServiceLimits | None = None,
    store: InspectionStore | None = None,
    **overrides: Any,
) -> None:
    """Take the port, load the model, then serve until interrupted (Ctrl-C or SIGTERM shut down gracefully,
    waiting at most `shutdown_timeout` for requests in flight; SIGHUP reloads the model: `DrainingServer`).

    The port is bound before the model loads, so a port already in use is reported at once, in one line.
    """
    limits = limits or ServiceLimits()
    sock = listening_socket(host, port)
    app = create_app(model_dir, api_key, limits, store=store, **overrides)
    configure_logging()
    server = DrainingServer(server_config(app, limits, host, port), app.state.service)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; that shutdown is a success
        pass


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); a `UserInputError` naming the address when that fails."""
    if not 0 <= port <= 65535:
        raise UserInputError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return sock
