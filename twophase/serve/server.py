"""Running the app under uvicorn: in the foreground (`twophase serve`) or on a background thread.

    with ServerThread(app, port=0) as server:          # port 0: any free port on 127.0.0.1
        httpx.get(server.url + "/health")
    # leaving the block sets uvicorn's should_exit: in-flight requests finish (up to graceful_timeout),
    # the app's lifespan closes the scheduler, and the thread ends

The socket is bound here, before uvicorn starts, so a busy port is one clear TwophaseError.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from twophase.compiler.errors import TwophaseError

GRACEFUL_TIMEOUT_S = 30


def listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (which calls listen on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TwophaseError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host/--port") from None
    return sock


def uvicorn_server(app, *, log_level: str = "warning", graceful_timeout: float = GRACEFUL_TIMEOUT_S) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_timeout)
    return uvicorn.Server(config)


def run(app, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve on a bound socket until SIGINT / SIGTERM (uvicorn's handlers), then shut down gracefully."""
    with sock:
        uvicorn_server(app, log_level=log_level).run(sockets=[sock])


class ServerThread:
    """uvicorn on a daemon thread with its own event loop; `stop` is a clean shutdown."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 graceful_timeout: float = GRACEFUL_TIMEOUT_S) -> None:
        self.host = host
        self._sock = listen(host, port)
        self.port: int = self._sock.getsockname()[1]
        self.server = uvicorn_server(app, log_level=log_level, graceful_timeout=graceful_timeout)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="twophase-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise TwophaseError("the server stopped during startup (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TwophaseError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask uvicorn to exit and wait for the thread; True when it ended in time."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
