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
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known: {', '.join(known[:20])}"
    if not close and len(known) > 20:
        hint += ", ..."
    return UserError(f"unknown {kind} '{name}'; {hint}")


class ReusedModuleError(UserError):
    """A hooked module runs more than once per forward pass (e.g. one ReLU module called twice in a
    ResNet block), so a hook on it would mix the outputs of different calls."""

    def __init__(self, module: str, calls: int, layer: str | None = None) -> None:
        self.module, self.calls, self.layer = module, calls, layer
        named = f"layer '{layer}' (module '{module}')" if layer and layer != module else f"module '{module}'"
        parent = module.rpartition(".")[0]
        instead = (
            f"e.g. the enclosing block '{parent}' or the module that feeds it"
            if parent
            else "e.g. the module that feeds it"
        )
        super().__init__(
            f"{named} is called {calls} times in one forward pass, so its hook would mix the calls; "
            f"hook a layer that runs exactly once per pass instead ({instead})"
        )

    def __reduce__(self) -> tuple[type[ReusedModuleError], tuple[str, int, str | None]]:
        return type(self), (self.module, self.calls, self.layer)
