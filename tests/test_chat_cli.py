"""`hybrid chat` driven through a pseudo-terminal: in-process and against a running server."""

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving

HYBRID = str(Path(sys.executable).with_name("hybrid"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(HYBRID, ["chat", "--max-tokens", "8", *args], encoding="utf-8", timeout=60,
                         dimensions=(40, 200), env={**os.environ, "TERM": "xterm"})


def reply(child: pexpect.spawn, text: str) -> str:
    """Send a message; the streamed reply, as printed before the next prompt."""
    child.sendline(text)
    child.expect("\r\n> ")
    return ANSI.sub("", child.before).split("\r\n", 1)[1]


def test_two_turns_in_process_with_commands(tiny_dir):
    child = spawn("--model", str(tiny_dir))
    child.expect("> ")
    assert "loaded" in ANSI.sub("", child.before)
    first = reply(child, "Hello there")
    assert first.strip()
    child.sendline("Tell me \\")  # a line ending with a backslash continues
    child.expect(r"\. ")
    child.sendline("more")
    child.expect("\r\n> ")
    assert ANSI.sub("", child.before).split("\r\n", 1)[1].strip()
    assert "conversation cleared" in reply(child, "/reset")
    assert "system prompt set" in reply(child, "/system Be brief.")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture
def server(tiny_dir):
    serving = Serving.load(tiny_dir, dtype=torch.float32)
    with ServerThread(create_app(serving, api_key="k")) as s:
        yield s, serving


def test_chat_against_a_server_keeps_the_history(server):
    s, serving = server
    child = spawn("--url", s.url, "--api-key", "k", "--no-thinking")
    child.expect("> ")
    assert reply(child, "Hello there").strip()
    reply(child, '"""\nfirst pasted line\nsecond pasted line\n"""')
    child.sendeof()
    child.expect(pexpect.EOF)
    assert serving.metrics.value("requests_total") == 2
    assert serving.metrics.value("prefix_cache_hit_tokens_total") > 0  # the second turn resent (and reused) the first
