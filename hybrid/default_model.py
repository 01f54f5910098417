"""The model commands run when given none: a preset generated once into the user's cache
(~/.cache/hybrid/models/<preset>, or under $XDG_CACHE_HOME)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from hybrid.model.checkpoint import check_folder
from hybrid.model.synthetic import write_checkpoint

DEFAULT_PRESET = "tiny"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid" / "models"


def preset_model(preset: str = DEFAULT_PRESET, say: Callable[[str], None] = print) -> Path:
    """The folder of a generated preset, written on first use (saying so)."""
    path = cache_dir() / preset
    if not path.exists():
        say(f"generating the {preset!r} model into {path} (first use; random weights in Kimi K2's format)")
        write_checkpoint(path, preset)
    return path


def resolve_model(model: str | Path | None, say: Callable[[str], None] = print) -> Path:
    """`model` if given (checked to be a checkpoint folder: a CheckpointError says what is
    missing), else the default preset."""
    return check_folder(model) if model else preset_model(DEFAULT_PRESET, say)
