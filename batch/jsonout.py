"""The `--json` documents of `plan`, `build`, `validate` and `gc`: one shape per command, each described by a JSON
Schema shipped in the package (`batch/schema/<command>.schema.json`, `schema(command)`).

Every document has `schema_version`, `command`, `exit_code` (the process's exit status) and `error`: null when the
command did its work, else what stopped it (a bad manifest with every located problem, a usage error, a file that
could not be written, an interruption), and then the command's own fields are absent. Fields may be added within a
schema version (readers ignore what they do not know); a field that changes meaning or goes away bumps it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from batch.errors import DHBatchError, ManifestError

SCHEMA_VERSION = 1
COMMANDS = ("plan", "build", "validate", "gc")


def document(command: str, exit_code: int, **fields: Any) -> dict[str, Any]:
    """A command's result."""
    return {"schema_version": SCHEMA_VERSION, "command": command, "exit_code": exit_code, "error": None, **fields}


def error_document(command: str | None, exit_code: int, exc: BaseException) -> dict[str, Any]:
    """What stopped a command, as data: the kind, the message and hint, and a bad manifest's located problems."""
    if isinstance(exc, ManifestError):
        n = len(exc.problems)
        kind, message = "manifest", f"invalid manifest ({n} problem{'s' * (n != 1)})"
    elif isinstance(exc, DHBatchError):
        kind, message = {2: "usage", 3: "io"}.get(exc.exit_code, "error"), exc.message
    elif isinstance(exc, KeyboardInterrupt):
        kind, message = "interrupted", "interrupted: nothing partial was kept; run the same command again to resume"
    elif isinstance(exc, OSError):
        kind, message = "io", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    else:
        kind, message = "error", str(exc)
    problems = [
        {"file": p.file, "line": p.line, "column": p.column, "path": p.path, "message": p.message}
        for p in getattr(exc, "problems", [])
    ]
    error = {"kind": kind, "message": message, "hint": getattr(exc, "hint", ""), "problems": problems}
    return {**document(command or "", exit_code), "error": error}


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of a command's `--json` document, as shipped in the package."""
    if command not in COMMANDS:
        raise ValueError(f"no --json schema for {command!r}")
    text = resources.files("batch").joinpath(f"schema/{command}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
