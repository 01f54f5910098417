"""Errors a user can fix, as opposed to bugs.

Library code raises a `UserError` (or, from the planner, a `placement.errors.PlacementError`)
whose message says what is wrong, where, and the fix. `hybrid`'s command line prints such an
error as one line on stderr and exits non-zero, without a traceback (`hybrid --debug COMMAND`
shows one); anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

from placement.errors import PlacementError


class UserError(Exception):
    """A fault in what the user gave (a folder, a file, an option, a server to talk to)."""

    exit_code = 1


class UsageError(UserError):
    """An option value or combination the command refuses (exit status 2, as for unknown options)."""

    exit_code = 2


USER_ERRORS = (UserError, PlacementError)


def exit_code(e: BaseException) -> int:
    return getattr(e, "exit_code", 1)
