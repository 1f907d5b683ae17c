"""Typed errors of the runner. The library raises; only the CLI prints and exits."""

from __future__ import annotations

import dataclasses


class DHBatchError(Exception):
    """Base class: a message (what and where), a hint (what to do) and the CLI's exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


@dataclasses.dataclass(frozen=True)
class Problem:
    """One manifest problem, located: `file:line:column: path: message`."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(DHBatchError):
    """The manifest (or a file it names) is invalid. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem], hint: str = "") -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems), hint)


class UsageError(DHBatchError):
    """The command line asked for something impossible (unknown --only id, bad --device)."""

    exit_code = 2


class BuildError(DHBatchError):
    """Some videos failed to build (the others were built); the report says which and why."""

    exit_code = 1


class DiskFullError(DHBatchError):
    """The disk filled up during a build: what was built is kept (and published where it fitted)."""

    exit_code = 3


def disk_full_path(exc: BaseException | None) -> str | None:
    """The file that a full disk (ENOSPC, or a quota: EDQUOT) kept from being written, from `exc` or the exceptions
    that caused it: "" when the error does not name one; None when it is not a full disk."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return str(getattr(exc, "filename", "") or "")
        exc = exc.__cause__ or exc.__context__
    return None
