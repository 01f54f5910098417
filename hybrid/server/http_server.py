"""uvicorn serving the app: in the foreground (`hybrid serve`) or from a background thread (tests,
and `hybrid chat`, which talks to an in-process server exactly as it talks to a remote one).

On SIGTERM, Ctrl-C or `stop()`, uvicorn waits for every response in flight to end, and a long
generation can take minutes. So shutting down first ends every request in the engine (streams
close with an error event, other requests get a 503), then lets uvicorn close as usual, with a
backstop of GRACE_SECONDS.
"""

from __future__ import annotations

import threading
import time

import uvicorn

GRACE_SECONDS = 3


class Server(uvicorn.Server):
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=GRACE_SECONDS))
        self.serving = app.state.serving

    async def shutdown(self, sockets=None) -> None:
        self.serving.engine.abort_all("shutdown", "the server is shutting down")
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
