"""The engine in one background thread that owns the model.

The thread builds its engine itself (loading, warm-up), so that every parallel torch op of a
serving process runs on this one thread. A second thread that had run one would keep a second
OpenMP team of its own; with more OpenMP threads than cores, libgomp spins at most 1,000 times
before a waiting worker sleeps, and a single stream decoded 5-12% slower on 2 cores (measured).

Callers on any thread hand requests over a thread-safe queue and get outputs back through a
callback; `generate` wraps that for asyncio (outputs cross with loop.call_soon_threadsafe). The
thread blocks while there is no work, drains the queue between steps (so an abort frees its pages
before the next step), and turns an exception in a step into an error for the requests in flight
rather than a dead server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from hybrid.engine.engine import Engine
from hybrid.engine.request_output import RequestOutput
from hybrid.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class AbortAll:
    reason: str
    error: str


class EngineThread:
    def __init__(self, build: Callable[[], Engine]):
        """`build` makes the engine, on the engine thread."""
        self.engine: Engine | None = None
        self._build = build
        self._built = threading.Event()
        self._failure: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> "EngineThread":
        """Start the thread; returns once it has built the engine, or raises what building raised."""
        self._thread.start()
        self._built.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_prompt(self, prompt_len: int) -> None:
        """Raises PromptTooLong (or ValueError) for a prompt the engine cannot take."""
        self.engine.check_prompt(prompt_len)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, request_id: str | None = None) -> str:
        """Queue a request; `sink` gets its outputs on the engine thread. Raises PromptTooLong here."""
        self.check_prompt(len(prompt_ids))
        request_id = request_id or uuid.uuid4().hex
        self._inbox.put((request_id, list(prompt_ids), params, sink))
        return request_id

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)

    def abort_all(self, reason: str, error: str) -> None:
        """End every request queued or running, each with `reason` and `error` (a shutdown)."""
        self._inbox.put(AbortAll(reason, error))

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving early (a client gone) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = self.submit(prompt_ids, params, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o),
                                 request_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as e:  # handed to the caller of start()
            self._failure = e
            return
        finally:
            self._built.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            try:
                command = self._inbox.get(block=not self.engine)
                while True:
                    if command is None:
                        return
                    self._handle(command)
                    command = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self.engine:
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    log.exception("engine step failed")
                    outputs = self.engine.abort_all("error", f"internal error: {type(e).__name__}: {e}")
                for out in outputs:
                    self._send(out)

    def _handle(self, command) -> None:
        """A queued command: a request id (abort it), AbortAll, or (id, prompt ids, params, sink) (add it)."""
        if isinstance(command, AbortAll):
            for out in self.engine.abort_all(command.reason, command.error):
                self._send(out)
            return
        if isinstance(command, str):
            out = self.engine.abort(command)
            if out is not None:
                self._send(out)
            return
        request_id, prompt_ids, params, sink = command
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except Exception as e:  # this request's fault or not, the engine serves on
            if not isinstance(e, ValueError):
                log.exception("request %s refused", request_id)
            sink(RequestOutput(request_id, [], "", "error", len(prompt_ids), 0, 0, str(e)))
            return
        self._sinks[request_id] = sink

    def _send(self, out: RequestOutput) -> None:
        sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
        if sink is None:
            return
        try:
            sink(out)
        except RuntimeError:  # the caller's event loop is gone
            if not out.finished:
                self.abort(out.request_id)
