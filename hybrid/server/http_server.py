"""uvicorn serving the app: in the foreground (`hybrid serve`) or from a background thread (tests,
and `hybrid chat`, which talks to an in-process server exactly as it talks to a remote one).

`hybrid serve` binds its port with `bind` before the model loads (a port in use is refused at
once), and uvicorn starts listening on that socket once the model is ready: until then
connections are refused, not left waiting. `on_started` runs once the server accepts them.

On SIGTERM, Ctrl-C or `stop()`, uvicorn waits for every response in flight to end, and a long
generation can take minutes. So shutting down first ends every request in the engine (streams
close with an error event, other requests get a 503), then lets uvicorn close as usual, with a
backstop of GRACE_SECONDS.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Callable

import uvicorn

from hybrid.errors import UserError

GRACE_SECONDS = 3


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; a UserError saying why it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"cannot bind {host}:{port}: {e.strerror} (fix: give an address of this machine with "
                        "--host, e.g. 127.0.0.1 or 0.0.0.0)") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: not past a listener
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fix = {errno.EADDRINUSE: "stop what holds it, or choose another port with --port",
               errno.EACCES: "choose a port above 1023 with --port"}.get(
            e.errno, "give an address of this machine with --host, e.g. 127.0.0.1 or 0.0.0.0")
        raise UserError(f"cannot bind {host}:{port}: {e.strerror} (fix: {fix})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 on_started: Callable[[], None] | None = None):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=GRACE_SECONDS))
        self.serving = app.state.serving
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None) -> None:
        self.serving.thread.abort_all("shutdown", "the server is shutting down")
        await super().shutdown(sockets)


class ServerThread:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.host = host
        self._server = Server(app, host, port, log_level)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 30) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
