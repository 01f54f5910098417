"""`hybrid chat`: a terminal chat over the OpenAI API, with a remote server or an in-process one.

Replies stream as they are generated, thinking dimmed. The conversation is kept and resent each
turn (the server's prefix cache makes that cheap). Commands: /reset, /system TEXT, /exit. A line
ending with a backslash continues on the next line; a line holding only triple quotes starts and
ends a pasted block.
"""

from __future__ import annotations

from typing import Callable

import openai
from rich.console import Console

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit leaves; " \
       "end a line with \\ to continue it, or paste between lines of \"\"\""
PASTE = '"""'
# Control characters in model output would drive the terminal: shown as U+FFFD instead.
UNPRINTABLE = {c: "\ufffd" for c in [*range(0x20), 0x7f] if chr(c) not in "\n\t"}


class Chat:
    def __init__(self, client: openai.OpenAI, model: str, console: Console, max_tokens: int = 1024,
                 thinking: bool = True, read: Callable[[str], str] = input, temperature: float | None = None,
                 seed: int | None = None):
        self.client, self.model, self.console = client, model, console
        self.max_tokens, self.thinking, self.read = max_tokens, thinking, read
        self.temperature, self.seed = temperature, seed  # sent only when given: the server's defaults otherwise
        self.replies = 0
        self.system: str | None = None
        self.history: list[dict] = []

    def run(self) -> None:
        self.console.print(f"[bold]{self.model}[/] - ", end="")
        self.console.print(HELP, markup=False, highlight=False)
        while (text := self.read_message()) is not None:
            if text.startswith("/"):
                if not self.command(text):
                    return
            elif text.strip():
                self.turn(text)

    def read_message(self) -> str | None:
        """One message from the user (None at end of input)."""
        try:
            line = self.read("> ")
            if line.strip() == PASTE:
                lines = []
                while (line := self.read("")).strip() != PASTE:
                    lines.append(line)
                return "\n".join(lines)
            lines = []
            while line.endswith("\\"):
                lines.append(line[:-1])
                line = self.read(". ")
            return "\n".join(lines + [line])
        except EOFError:
            return None

    def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            self.console.print("[dim](conversation cleared)[/]")
        elif name == "/system":
            self.system = arg.strip() or None
            self.history = []
            self.console.print(f"[dim](system prompt {'set' if self.system else 'cleared'}; conversation cleared)[/]")
        else:
            self.console.print(HELP, style="dim", markup=False, highlight=False)
        return True

    def turn(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.system}] if self.system else []
        reasoning, content = [], []
        sampling = {} if self.temperature is None else {"temperature": self.temperature}
        if self.seed is not None:  # reproducible, yet each reply a draw of its own
            sampling["seed"] = self.seed + self.replies
        self.replies += 1
        stream = self.client.chat.completions.create(
            model=self.model, messages=system + self.history, max_tokens=self.max_tokens, stream=True, **sampling,
            extra_body={"thinking": {"type": "enabled" if self.thinking else "disabled"}})
        try:
            for chunk in stream:
                delta = chunk.choices[0].delta if chunk.choices else None
                if delta is None:
                    continue
                if think := getattr(delta, "reasoning_content", None):
                    reasoning.append(think)
                    self._write(think, "dim")
                if delta.content:
                    if reasoning and not content:
                        self._write("\n", None)
                    content.append(delta.content)
                    self._write(delta.content, None)
        except KeyboardInterrupt:
            stream.close()
            self._write(" [interrupted]", "dim")
        self._write("\n", None)
        self.history.append({"role": "assistant", "content": "".join(content),
                             "reasoning_content": "".join(reasoning)})

    def _write(self, text: str, style: str | None) -> None:
        self.console.print(text.translate(UNPRINTABLE), style=style, end="", markup=False, highlight=False,
                           soft_wrap=True)
        self.console.file.flush()
