"""Responses kept server-side (`store: true`, OpenAI's default) for `previous_response_id` and
`GET` / `DELETE /v1/responses/{id}`: in memory, the least recently used dropped beyond a number of
responses or of bytes, and gone on restart.

Each response keeps its own turn only (its input messages and its reply, without `instructions`)
and the id of the response it continued, so a long chain costs its length, not its square. A
conversation whose earlier turn was dropped cannot be continued: the client is told so (404).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from hybrid.server.errors import APIError

MAX_RESPONSES = 1024
MAX_BYTES = 256 << 20


@dataclass
class StoredResponse:
    response: dict  # the Response object as it was returned
    turn: list[dict]  # its input messages and its reply, as the chat template reads them
    previous: str | None  # the response it continued
    size: int = 0

    def __post_init__(self):
        self.size = len(json.dumps(self.response)) + len(json.dumps(self.turn))


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, stored: StoredResponse) -> None:
        self.delete(stored.response["id"])
        self._kept[stored.response["id"]] = stored
        self._bytes += stored.size
        while len(self._kept) > self.max_responses or self._bytes > self.max_bytes and len(self._kept) > 1:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= dropped.size

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (now the most recently used); a 404 naming `param` if it is not kept."""
        stored = self._kept.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response has the id {response_id!r}: responses are kept only with store "
                                f"true, and only the {self.max_responses} most recent until the server restarts",
                           param=param, code="response_not_found")
        self._kept.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._kept.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size
        return stored is not None

    def history(self, response_id: str) -> list[dict]:
        """The messages of the conversation that ended with this response, oldest first."""
        turns, rid = [], response_id
        while rid is not None:
            try:
                stored = self.get(rid, "previous_response_id")
            except APIError as e:
                if rid != response_id:
                    e.message = (f"the conversation of {response_id!r} cannot be continued: its earlier turn {rid!r} "
                                 "is no longer stored")
                raise
            turns.append(stored.turn)
            rid = stored.previous
        return [m for turn in reversed(turns) for m in turn]
