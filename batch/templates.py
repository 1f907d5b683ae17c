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
    """A template failed to compile or render; the message names the template, line and variable."""

    exit_code = 2


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """One sandboxed environment with StrictUndefined, shared by prompts and scripts."""
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=True
    )


@functools.lru_cache(maxsize=4096)
def compile_template(source: str, name: str) -> jinja2.Template:
    """Compile once per (source, name); syntax errors become TemplateError with the line."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}: line {exc.lineno}: template syntax error: {exc.message}") from exc


def render(source: str, name: str, context: Mapping[str, Any]) -> str:
    """Render `source` (called `name` in messages) with `context`; undefined variables are errors."""
    template = compile_template(source, name)
    try:
        return template.render(**context)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{name}: line {_error_line(exc)}: {exc.message}", "define it under `vars:`") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{name}: unsafe template operation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{name}: line {_error_line(exc)}: {exc}") from exc


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
            return candidate.read_text(encoding="utf-8"), candidate
    raise TemplateError(
        f"prompt template {name!r} not found in {', '.join(str(f) for f in search)}", "add it to prompts/"
    )
