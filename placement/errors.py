"""The planner's errors: each one a fault the user can fix (a config, a profile, a machine
description, an option value), its message saying what is wrong, where, and the fix."""

from __future__ import annotations


class PlacementError(ValueError):
    """Base of every error the placement package raises on purpose."""
