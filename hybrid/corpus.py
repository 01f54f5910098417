"""Text every machine has: the running Python's standard library, split into what the default
model trains on and a fixed, named held-out set it never sees (its tokenizer does not either).

The standard library differs between Python versions, so every figure measured on it is recorded
with `python_version()`. Besides source files, the training side yields chat turns: a function's
docstring as the user's request, the function as the assistant's reply.
"""

from __future__ import annotations

import ast
import platform
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

# Held out from training and from the tokenizer: modules present in every Python since 3.9.
HELD_OUT = ("textwrap.py", "shlex.py", "fractions.py", "statistics.py", "calendar.py", "difflib.py",
            "heapq.py", "colorsys.py", "graphlib.py", "string.py")
# Test suites, generated tables and bundled packages: not the library's own prose and code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
              "__pycache__", "turtledemo"}
_MAX_FILE_BYTES = 200_000
_MAX_FUNCTION_LINES = 30

# How a user might ask for a function; the choice per function is fixed (a hash of its name).
_REQUESTS = ("Write a Python function. {doc}", "Write a Python function `{name}`: {doc}",
             "{doc}\nWrite this as a Python function.", "Please write a small Python function that does this: {doc}")


def python_version() -> str:
    return platform.python_version()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every library source file, sorted by path."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]) and p.stat().st_size <= _MAX_FILE_BYTES)


def held_out_files() -> list[Path]:
    root = stdlib_root()
    return [root / name for name in HELD_OUT if (root / name).exists()]


def training_files() -> list[Path]:
    held = set(held_out_files())
    return [p for p in stdlib_files() if p not in held]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class FunctionTurn:
    request: str  # the user's message: built from the docstring
    reply: str  # the assistant's: the function's source in a Python code block


def function_turns(paths: list[Path]) -> list[FunctionTurn]:
    """A chat turn for each short documented function (or method) of `paths`."""
    turns = []
    for path in paths:
        source = read(path)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or node.end_lineno - node.lineno >= _MAX_FUNCTION_LINES:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            template = _REQUESTS[zlib.crc32(node.name.encode()) % len(_REQUESTS)]
            code = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])).rstrip()
            turns.append(FunctionTurn(template.format(doc=summary, name=node.name), f"```python\n{code}\n```"))
    return turns
