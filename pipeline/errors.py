"""One error type for everything a user can get wrong: a message and a hint."""

from __future__ import annotations


class LprError(Exception):
    """A problem the user can fix. ``str(err)`` is one line: the problem, then the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message.rstrip(".")
        self.hint = hint.rstrip(".")
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f". {self.hint[:1].upper()}{self.hint[1:]}"
        return " ".join(text.split()) + "."
