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


_NO_SPACE = {"ENOSPC", "EFBIG", "EDQUOT"}
_NO_ACCESS = {"EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR"}  # or a file where a folder should be


def storage_error(err: BaseException) -> LprError | None:
    """The one-line error for a disk that is full or a path that cannot be written, or None.

    Looks through the exception's causes too, since zarr and fsspec re-raise I/O errors wrapped.
    """
    import errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            code = errno.errorcode.get(err.errno, "")
            where = f" {err.filename}" if err.filename else ""
            if code in _NO_SPACE:
                return LprError(
                    f"no room to write{where} ({err.strerror or code}): the disk is full or a file size limit is hit",
                    "free disk space or pick a run directory on another disk, then rerun the same command to resume",
                )
            if code in _NO_ACCESS:
                return LprError(
                    f"cannot write{where} ({err.strerror or code})",
                    "choose a run directory you can write to, or fix its permissions",
                )
        err = err.__cause__ or err.__context__
    return None
