"""Jinja rendering for prompts and script texts: sandboxed, and a missing variable is an error, never ''."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from batch.errors import DHBatchError


class TemplateError(DHBatchError):
    """A template failed to compile or render; the message names the template, line and variable. `location`: the
    manifest place the template belongs to (a batch.manifest.Location), where known."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "", location: Any = None) -> None:
        super().__init__(message, hint)
        self.location = location


#: Longest string or list a template may make with `*`, and the largest power it may compute with `**`.
MAX_REPEAT = 1_000_000
MAX_POWER_BITS = 4096


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` bounded: a template in a pull request must not be able to make the planner
    allocate gigabytes (`{{ 'x' * 10**10 }}`); ranges are already bounded by Jinja (MAX_RANGE)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(f"the result would be longer than {MAX_REPEAT} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"the power would have more than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """One sandboxed environment with StrictUndefined, shared by prompts and scripts."""
    return _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=True)


@functools.lru_cache(maxsize=4096)
def compile_template(source: str, name: str) -> jinja2.Template:
    """Compile once per (source, name); syntax errors become TemplateError with the line."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}: line {exc.lineno}: template syntax error: {exc.message}") from exc


def render(source: str, name: str, context: Mapping[str, Any], hint: str = "define it under `vars:`") -> str:
    """Render `source` (called `name` in messages) with `context`; undefined variables are errors (`hint` says
    where the variables come from)."""
    template = compile_template(source, name)
    try:
        return template.render(**context)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{name}: line {_error_line(exc)}: {exc.message}", hint) from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{name}: unsafe template operation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{name}: line {_error_line(exc)}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - {{ 1/0 }}, {{ 'a' + 1 }}: the template's mistake, never a traceback
        raise TemplateError(
            f"{name}: line {_error_line(exc)}: {type(exc).__name__}: {exc}", "fix the expression"
        ) from exc


def _error_line(exc: BaseException) -> int:
    """The template line of a render-time error, read from the traceback's template frames."""
    tb = exc.__traceback__
    line = 1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def prompt_template(name: str, search: tuple[Path, ...]) -> tuple[str, Path]:
    """Find a prompt template by file name in the search folders; return its text and path."""
    if Path(name).name != name:
        raise TemplateError(f"prompt template {name!r} must be a file name inside prompts/, not a path")
    for folder in search:
        candidate = folder / name
        if candidate.is_file():
            # A link may not lead out of its prompts/ folder (a manifest's folder must not expose other files).
            if not candidate.resolve().is_relative_to(folder.resolve()):
                raise TemplateError(
                    f"prompt template {candidate} links outside {folder}", "keep prompt templates inside prompts/"
                )
            try:
                return candidate.read_text(encoding="utf-8"), candidate
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"cannot read prompt template {candidate}: {exc}", "save it as UTF-8 text") from exc
    raise TemplateError(
        f"prompt template {name!r} not found in {', '.join(str(f) for f in search)}", "add it to prompts/"
    )
