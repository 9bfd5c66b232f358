"""The one error type for mistakes a user can make (bad path, bad shape, unknown name, ...).

The CLI turns it into a single line on stderr and exit code 2; library callers can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, with a message that says what to do about it."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """Build the error for an unknown registry entry or layer name, listing close matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known: {', '.join(known[:20])}"
    if not close and len(known) > 20:
        hint += ", ..."
    return UserError(f"unknown {kind} '{name}'; {hint}")
