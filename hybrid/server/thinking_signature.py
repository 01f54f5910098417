"""Signatures on thinking blocks, so that reasoning a client sends back is known to be this server's.

A signature is an HMAC-SHA256 of the thinking text under a secret the server holds (random per
process unless HYBRID_THINKING_KEY sets one that survives restarts). Reasoning whose signature does
not verify (edited, from another server, from before a restart) is left out of the prompt, like
redacted thinking, rather than refused: the conversation goes on, only without that reasoning.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

_VERSION = b"h1"


class ThinkingSigner:
    def __init__(self, key: bytes | None = None):
        env = os.environ.get("HYBRID_THINKING_KEY")
        self._key = key or (env.encode() if env else secrets.token_bytes(32))

    def sign(self, thinking: str) -> str:
        mac = hmac.new(self._key, _VERSION + thinking.encode(), hashlib.sha256).digest()
        return (_VERSION + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()

    def verify(self, thinking: str, signature: str | None) -> bool:
        return bool(signature) and hmac.compare_digest(self.sign(thinking), signature)
