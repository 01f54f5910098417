"""`hybrid` commands. Each command is a thin shell over the package that does the work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CPU/GPU hybrid MoE runtime.")


if __name__ == "__main__":
    app()
