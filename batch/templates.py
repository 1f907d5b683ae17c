"""Jinja rendering for prompts and script texts: sandboxed, and a missing variable is an error, never ''."""

from __future__ import annotations

import functools
import re
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


#: Bounds on what a template may make: the text it renders, a string or list made by repeating or padding, and the
#: size of a number. They keep a mistaken (or hostile) template in a pull request from making the planner allocate
#: gigabytes (`{{ 'x' * 10**10 }}`, `'x'|center(10**9)`, a loop printing forever); ranges are bounded by Jinja itself
#: (MAX_RANGE). This is a guard against blow-ups, not a resource sandbox: CI jobs should still run with memory and
#: time limits of their own.
MAX_OUTPUT = 1_000_000
MAX_REPEAT = 1_000_000
MAX_NUMBER_BITS = 4096
_WIDE = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


def _refuse(what: str) -> None:
    raise jinja2.exceptions.SecurityError(what)


def _check_format(text: Any) -> None:
    if isinstance(text, str) and _WIDE.search(text):
        _refuse(f"a format width or precision above {MAX_REPEAT}")


def _check_width(width: Any) -> None:
    if isinstance(width, int) and width > MAX_REPEAT:
        _refuse(f"a width above {MAX_REPEAT}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the bounds above on `*`, `**`, `%`, str.format and padding."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, width_at in (("center", 1), ("indent", 1), ("format", None)):
            self.filters[name] = self._bounded_filter(self.filters[name], width_at)

    @staticmethod
    def _bounded_filter(fn: Any, width_at: int | None) -> Any:
        @functools.wraps(fn)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if width_at is None:
                _check_format(args[0] if args else None)
            else:
                _check_width(args[width_at] if len(args) > width_at else kwargs.get("width"))
            return fn(*args, **kwargs)

        return bounded

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                    _refuse(f"the result would be longer than {MAX_REPEAT} items")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_NUMBER_BITS
            ):
                _refuse(f"the product would have more than {MAX_NUMBER_BITS} bits")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * (abs(left).bit_length() - 1) > MAX_NUMBER_BITS:
                _refuse(f"the power would have more than {MAX_NUMBER_BITS} bits")
        if operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        # str.format / format_map are wrapped by Jinja when accessed: check the format string there.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's naming
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name in ("center", "ljust", "rjust", "zfill", "expandtabs") and args:
            _check_width(args[0] if name != "expandtabs" else args[0] * owner.count("\t"))
        return super().call(__context, __obj, *args, **kwargs)


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
        parts, size = [], 0
        for part in template.generate(**context):  # as render() does, with the output bounded
            size += len(part)
            if size > MAX_OUTPUT:
                _refuse(f"the text would be longer than {MAX_OUTPUT} characters")
            parts.append(part)
        return "".join(parts)
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
