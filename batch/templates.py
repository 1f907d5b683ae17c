"""Jinja rendering for prompts and script texts: sandboxed, and a missing variable is an error, never ''."""

from __future__ import annotations

import functools
import math
import re
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.lexer
import jinja2.meta
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
#: A printf-style conversion: flags, width (or *), precision (or *), type.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
#: Longest text `wordwrap` takes (Python's textwrap is slow on huge inputs of short words).
MAX_WRAP = 100_000
#: Loop iterations one rendering may run (all loops together), and its time: a nested loop that prints nothing is
#: bounded by neither the output nor Jinja's range limit (three nested ranges ran until killed).
MAX_LOOP_ITERATIONS = 100_000
MAX_RENDER_SECONDS = 2.0


def _refuse(what: str) -> None:
    raise jinja2.exceptions.SecurityError(what)


def _check_width(width: Any) -> None:
    if isinstance(width, int) and width > MAX_REPEAT:
        _refuse(f"a width above {MAX_REPEAT}")


def _check_ints(values: Any) -> None:
    """Values that a `*` width or a nested `{}` format field may take: no int above MAX_REPEAT."""
    items = values.values() if isinstance(values, dict) else values if isinstance(values, tuple | list) else [values]
    for value in items:
        _check_width(value)


def _check_percent(fmt: Any, args: Any) -> None:
    """`fmt % args` (and the `format` filter): widths and precisions, written or taken from `*`, at most a million."""
    if not isinstance(fmt, str):
        return
    star = False
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for part in (width, precision):
            if part == "*":
                star = True
            elif part:
                _check_width(int(part))
    if star:
        _check_ints(args)


def _check_str_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: the numbers in each field's spec, and the values of nested fields (`{:{w}}`)."""
    nested = False
    pending = [fmt]
    while pending:
        try:
            fields = list(string.Formatter().parse(pending.pop()))
        except ValueError:
            return  # a malformed format string: str.format reports it
        for _, field, spec, _ in fields:
            if field is None or not spec:
                continue
            if "{" in spec:
                nested = True
                pending.append(spec)
            for number in re.findall(r"\d+", spec):
                _check_width(int(number))
    if nested:
        _check_ints(args)
        _check_ints(kwargs)


class _LoopLimit(jinja2.exceptions.SecurityError):
    """A template ran too many loop iterations, or for too long."""


class _Budget:
    """What one rendering may spend: called at the top of every loop iteration (`_CountLoops`)."""

    def __init__(self) -> None:
        self.iterations = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def tick(self) -> str:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise _LoopLimit(f"its loops ran more than {MAX_LOOP_ITERATIONS:,} times")
        if self.iterations % 1000 == 0 and time.monotonic() > self.deadline:
            raise _LoopLimit(f"it ran for more than {MAX_RENDER_SECONDS:g} s")
        return ""


class _CountLoops(jinja2.ext.Extension):
    """Puts `{{ _dh_tick() }}` at the top of every `{% for %}` body, so each iteration is counted (`_Budget`)."""

    def filter_stream(self, stream: Any) -> Any:
        prev, in_for = "", False
        for token in stream:
            yield token
            if token.type == "name" and token.value == "for" and prev == "block_begin":
                in_for = True
            elif token.type == "block_end" and in_for:
                in_for = False
                for kind, value in (("variable_begin", "{{"), ("name", "_dh_tick"), ("lparen", "("),
                                    ("rparen", ")"), ("variable_end", "}}")):  # fmt: skip
                    yield jinja2.lexer.Token(token.lineno, kind, value)
            prev = token.type


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the bounds above on `*`, `**`, `%`, str.format, padding and wrapping."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        center, indent, fmt, wordwrap = (self.filters[n] for n in ("center", "indent", "format", "wordwrap"))

        def bounded_center(value: Any, width: Any = 80) -> Any:
            _check_width(width)
            return center(value, width)

        def bounded_indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> Any:
            pad = width if isinstance(width, int) else len(str(width))
            if pad * (str(value).count("\n") + 1) > MAX_OUTPUT:
                _refuse(f"the indented text would be longer than {MAX_OUTPUT} characters")
            return indent(value, width, *args, **kwargs)

        def bounded_format(value: Any, *args: Any, **kwargs: Any) -> Any:
            _check_percent(value, args or kwargs)
            return fmt(value, *args, **kwargs)

        def bounded_wordwrap(env: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            if len(str(value)) > MAX_WRAP:
                _refuse(f"wordwrap takes at most {MAX_WRAP} characters")
            return wordwrap(env, value, *args, **kwargs)

        bounded_wordwrap.jinja_pass_arg = wordwrap.jinja_pass_arg  # type: ignore[attr-defined]
        for name, fn in (("center", bounded_center), ("indent", bounded_indent), ("format", bounded_format),
                         ("wordwrap", bounded_wordwrap)):  # fmt: skip
            self.filters[name] = fn

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
            if right * math.log2(abs(left)) > MAX_NUMBER_BITS:
                _refuse(f"the power would have more than {MAX_NUMBER_BITS} bits")
        if operator == "%":
            _check_percent(left, right)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        # str.format / format_map are wrapped by Jinja when accessed: check each call's format and arguments.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> Any:
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                _check_str_format(fmt, (), args[0])
            else:
                _check_str_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's naming
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name in ("center", "ljust", "rjust", "zfill"):
            _check_width(args[0] if args else kwargs.get("width"))
        if isinstance(owner, str) and name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(size, int) and size * (owner.count("\t") + 1) > MAX_OUTPUT:
                _refuse(f"the expanded text would be longer than {MAX_OUTPUT} characters")
        return super().call(__context, __obj, *args, **kwargs)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """One sandboxed environment with StrictUndefined, shared by prompts and scripts."""
    env = _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        extensions=[_CountLoops],
    )
    env.globals["_dh_tick"] = str  # render() passes each rendering's own counter
    return env


@functools.lru_cache(maxsize=4096)
def compile_template(source: str, name: str) -> jinja2.Template:
    """Compile once per (source, name); syntax errors become TemplateError with the line."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}: line {exc.lineno}: template syntax error: {exc.message}") from exc


@functools.lru_cache(maxsize=4096)
def template_variables(source: str) -> frozenset[str]:
    """The top-level names a template reads (planning renders a text once for all the videos it does not tell
    apart); every name for a template that does not parse (the render reports it)."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(environment().parse(source)))
    except jinja2.TemplateSyntaxError:
        return frozenset({"video", "character"})


def render(source: str, name: str, context: Mapping[str, Any], hint: str = "define it under `vars:`") -> str:
    """Render `source` (called `name` in messages) with `context`; undefined variables are errors (`hint` says
    where the variables come from)."""
    template = compile_template(source, name)
    if too_slow := getattr(template, "dh_too_slow", None):  # once is enough: 1,000 videos, one slow template
        raise TemplateError(*too_slow)
    try:
        parts, size = [], 0
        for part in template.generate(**context, _dh_tick=_Budget().tick):  # as render() does, output bounded
            size += len(part)
            if size > MAX_OUTPUT:
                _refuse(f"the text would be longer than {MAX_OUTPUT} characters")
            parts.append(part)
        return "".join(parts)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{name}: line {_error_line(exc)}: {exc.message}", hint) from exc
    except _LoopLimit as exc:
        template.dh_too_slow = (
            f"{name}: line {_error_line(exc)}: the template is too slow: {exc}",
            "loop over fewer items: templates make short texts",
        )
        raise TemplateError(*template.dh_too_slow) from exc
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
