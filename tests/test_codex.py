"""The real Codex CLI against `hybrid serve`: a pinned release from the npm registry, configured as
docs/codex.md says (a custom provider with `wire_api = "responses"`, web search off) and driven as a
user drives it (`codex exec`, then `codex exec resume --last`), against the server started by its
command.

Codex sends no output cap and asks again until a turn ends, so the model is the tiny preset rewired
to reason and answer a fixed text (tests/scripted.py): a random-weight model would write until its
context is full. Codex changes often: a release that sends something the server refuses fails here
with the server's message, which names the field."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import KEY, SCRIPTED
from npm import installed, needs_npm
from scripted import ANSWER
from served import Served

VERSION = "0.171.0"
CONFIG = """\
model = "{model}"
model_provider = "hybrid"
web_search = "disabled"
check_for_update_on_startup = false

[model_providers.hybrid]
name = "hybrid"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "HYBRID_API_KEY"

[analytics]
enabled = false
"""

pytestmark = needs_npm


@pytest.fixture(scope="module")
def codex() -> Path:
    return installed("@openai/codex", VERSION, "codex")


def run(codex: Path, served: Served, home: Path, *args: str) -> list[dict]:
    """One `codex exec --json` in a project folder of its own; its JSON events."""
    (home / ".codex").mkdir(exist_ok=True)
    (home / ".codex" / "config.toml").write_text(CONFIG.format(model=SCRIPTED, url=served.url))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update(HOME=str(home), CODEX_HOME=str(home / ".codex"), HYBRID_API_KEY=KEY)
    project = home / "project"
    project.mkdir(exist_ok=True)
    done = subprocess.run([str(codex), "exec", "--skip-git-repo-check", "--sandbox", "read-only", "--json", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"Codex {VERSION} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}\n{served.text()[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def answers(events: list[dict]) -> list[str]:
    return [e["item"]["text"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"]


def test_codex_exec_answers_and_resumes_the_session(codex, served, tmp_path):
    first = run(codex, served, tmp_path, "Say hello")
    assert answers(first) == [ANSWER] and first[-1]["type"] == "turn.completed"
    usage = first[-1]["usage"]
    assert usage["output_tokens"] > usage["reasoning_output_tokens"] > 0
    # the second turn resends the first one (its reasoning item too); its shared prefix comes from the cache
    second = run(codex, served, tmp_path, "resume", "--last", "And once more")
    assert answers(second) == [ANSWER] and second[-1]["type"] == "turn.completed"
    assert second[-1]["usage"]["cached_input_tokens"] > 0.9 * usage["input_tokens"]
    assert first[0]["thread_id"] == second[0]["thread_id"]
    seen = served.requests()
    assert [(m, p) for m, p, _ in seen if p != "/health"] == [("POST", "/v1/responses")] * 2, seen
    refused = [r for r in seen if r[2] >= 400]
    assert not refused, f"the server refused some of Codex's requests: {refused}\n{served.text()[-3000:]}"
