"""`hybrid serve` in a process of its own, as a user starts it, its log in a file."""

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, model: Path, log: Path, key: str, *args: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "hybrid"), "serve", "--model", str(model),
                   "--port", str(self.port), "--api-key", key, *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"hybrid serve exited:\n{self.text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"hybrid serve did not start:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request in uvicorn's access log."""
        return [(m, p, int(s)) for m, p, s in re.findall(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})', self.text())]

    def stop(self) -> float:
        """SIGTERM; the seconds until the process is gone."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - start
