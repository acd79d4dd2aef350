"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """A problem the user can fix: bad file, bad key, wrong shapes. Message names the culprit."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        message = one_line(message)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


def unwrap_transform_error(exc: BaseException) -> BaseException:
    """The error a MONAI transform raised: MONAI wraps it in a RuntimeError that only names
    the transform object ("applying transform <... at 0x...>"), its cause in __cause__."""
    while (isinstance(exc, RuntimeError) and str(exc).startswith("applying transform")
           and exc.__cause__ is not None):
        exc = exc.__cause__
    return exc


def one_line(text: str) -> str:
    """`text` on one line, even when a library's message has several (spaces inside a line,
    as in a file name, are kept)."""
    return " ".join(line.strip() for line in text.splitlines())
