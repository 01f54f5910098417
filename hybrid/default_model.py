"""The model commands run when given none: `k2-stdlib`, a small Kimi K2-architecture model trained
on the Python standard library (`python -m bench.train_default`), shipped in the package in Kimi's on-disk
format. Presets (`tiny`, `mini`: random weights) are generated once into the user's cache
(~/.cache/hybrid/models/<preset>, or under $XDG_CACHE_HOME)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from hybrid.model.checkpoint import check_folder
from hybrid.model.synthetic import write_checkpoint

EMBEDDED = Path(__file__).parent / "embedded" / "k2-stdlib"
# The default model's shape, as overrides of the `tiny` preset's Kimi config: every part of the
# architecture (MLA, a leading dense layer, shared expert, noaux_tc router, INT4 routed experts),
# 4,096 learned tokens + Kimi's 256 specials. kt-kernel's INT4 kernel needs hidden and expert sizes
# that are multiples of 64.
SHAPE = {"vocab_size": 4096 + 256, "bos_token_id": 4096, "eos_token_id": 4097, "num_hidden_layers": 4}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid" / "models"


def preset_model(preset: str, say: Callable[[str], None] = print) -> Path:
    """The folder of a generated preset, written on first use (saying so)."""
    path = cache_dir() / preset
    if not path.exists():
        say(f"generating the {preset!r} model into {path} (first use; random weights in Kimi K2's format)")
        write_checkpoint(path, preset)
    return path


def resolve_model(model: str | Path | None) -> Path:
    """`model` if given (checked to be a checkpoint folder: a CheckpointError says what is
    missing), else the embedded default model."""
    return check_folder(model or EMBEDDED)
