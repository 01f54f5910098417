"""The real Claude Code CLI against `hybrid serve`: a pinned release from the npm registry, driven
as a user drives it (`claude -p`, then `--continue`), against the server started by its command.

The model is the tiny preset rewired to reason and answer a fixed text (tests/scripted.py), since
Claude Code asks again until a turn ends. Claude Code changes often: a release that sends
something the server refuses fails here with the server's message, which names the field."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import KEY
from npm import installed, needs_npm
from scripted import ANSWER
from served import Served

VERSION = "2.1.197"

pytestmark = needs_npm


@pytest.fixture(scope="module")
def claude() -> Path:
    return installed("@anthropic-ai/claude-code", VERSION, "claude")


def ask(claude: Path, served: Served, home: Path, *args: str) -> dict:
    """One `claude -p` run in a project folder of its own, as a user on this machine runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), ANTHROPIC_BASE_URL=served.url, ANTHROPIC_AUTH_TOKEN=KEY,
               CLAUDE_CODE_MAX_OUTPUT_TOKENS="64", DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_ERROR_REPORTING="1")
    project = home / "project"
    project.mkdir(exist_ok=True)
    run = subprocess.run([str(claude), "-p", *args, "--output-format", "json"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.stdout.strip(), f"Claude Code printed nothing:\n{run.stderr[-3000:]}\n{served.text()[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["is_error"] is False, f"Claude Code {VERSION}: {result.get('result')}\n{served.text()[-3000:]}"
    return result


def test_claude_code_prints_an_answer_and_continues_the_conversation(claude, served, tmp_path):
    first = ask(claude, served, tmp_path, "Say hello")
    assert first["result"] == ANSWER and first["stop_reason"] == "end_turn"
    # the second turn resends the first one; its shared prefix comes from the cache
    second = ask(claude, served, tmp_path, "--continue", "And once more")
    assert second["result"] == ANSWER and second["session_id"] == first["session_id"]
    assert second["usage"]["cache_read_input_tokens"] > 0.9 * first["usage"]["input_tokens"]
    seen = served.requests()
    assert sum(1 for m, p, _ in seen if m == "POST" and p.startswith("/v1/messages")) >= 2, seen
    refused = [r for r in seen if r[2] >= 400]
    assert not refused, f"the server refused some of Claude Code's requests: {refused}\n{served.text()[-3000:]}"
