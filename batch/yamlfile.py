"""Safe YAML loading that remembers where every value came from (file:line:column).

Only plain data is accepted: `yaml.safe_load` semantics (no object-constructing tags), a cap on alias expansion
(so a "billion laughs" file fails fast instead of eating memory), strict UTF-8, and duplicate keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from batch.errors import ManifestError, Problem

#: Largest number of values a manifest may expand to once aliases are followed.
MAX_NODES = 200_000
#: Largest manifest file accepted, in bytes.
MAX_BYTES = 8 * 1024 * 1024

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Path_ = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Located:
    """A parsed YAML document plus the (line, column) of every value, by JSON path (1-based)."""

    file: str
    data: Any
    positions: dict[Path_, tuple[int, int]]

    def where(self, path: Path_) -> tuple[int, int]:
        """Position of `path`, or of its closest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), (1, 1))

    def problem(self, path: Path_, message: str) -> Problem:
        line, col = self.where(path)
        return Problem(self.file, line, col, dotted(path), message)


def dotted(path: Path_) -> str:
    """`("characters", "ceo", "voice")` → `characters.ceo.voice`; list indices as `[2]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(file: str, mark: Any, message: str) -> ManifestError:
    line = mark.line + 1 if mark is not None else 0
    col = mark.column + 1 if mark is not None else 0
    return ManifestError([Problem(file, line, col, "", message)])


def load_yaml(path: Path, display: str) -> Located:
    """Parse `path` safely; any problem becomes a ManifestError located in `display` (the name users see)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError([Problem(display, 0, 0, "", f"cannot read the file: {exc.strerror or exc}")]) from exc
    if len(raw) > MAX_BYTES:
        raise ManifestError(
            [Problem(display, 0, 0, "", f"file is {len(raw)} bytes; manifests are limited to {MAX_BYTES}")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ManifestError(
            [Problem(display, line, col, "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8")]
        ) from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ManifestError([Problem(display, 1, 1, "", "the file is empty; a manifest starts with `version: 1`")])
        _check_size(node, display)
        positions: dict[Path_, tuple[int, int]] = {}
        problems: list[Problem] = []
        _walk(node, (), positions, problems, display)
        if problems:
            raise ManifestError(problems)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        line, col, what = explain_yaml_error(text, exc)
        raise ManifestError([Problem(display, line, col, "", f"YAML error: {what}")]) from exc
    except yaml.reader.ReaderError as exc:  # located by a character offset: give line and column instead
        line, col = _line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        what = f"character {char!r} (U+{ord(char):04X}) is not allowed in YAML ({exc.reason}); remove it"
        raise ManifestError([Problem(display, line, col, "", f"YAML error: {what}")]) from exc
    except yaml.YAMLError as exc:
        raise _problem(display, None, f"YAML error: {exc}") from exc
    except RecursionError as exc:
        raise _problem(display, None, "the document nests too deeply") from exc
    finally:
        loader.dispose()
    return Located(display, data, positions)


def _check_size(root: yaml.Node, display: str) -> None:
    """Refuse documents whose aliases expand beyond MAX_NODES values (alias bombs)."""
    if _plain_size(root) <= MAX_NODES:  # no node reached twice: no alias, and small enough
        return
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose children are being sized: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not done:
            if id(node) in open_:
                raise _problem(display, node.start_mark, "an alias refers to a value that contains it; remove the loop")
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_.discard(id(node))
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_NODES:
            raise _problem(
                display,
                node.start_mark,
                f"the document expands to more than {MAX_NODES} values through aliases; remove the repeated anchors",
            )
        sizes[id(node)] = total


def _plain_size(root: yaml.Node) -> int:
    """The number of nodes of a document without aliases (one pass, a third of `_check_size`'s work on a large
    manifest), or MAX_NODES + 1 as soon as a node is reached twice (an alias: `_check_size` sizes what it expands
    to)."""
    seen: set[int] = set()
    stack = [root]
    mapping, sequence = yaml.MappingNode, yaml.SequenceNode
    while stack:
        node = stack.pop()
        if id(node) in seen:
            return MAX_NODES + 1
        seen.add(id(node))
        if isinstance(node, mapping):
            for key, value in node.value:
                stack += (key, value)
        elif isinstance(node, sequence):
            stack += node.value
    return len(seen)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


_STR, _FLOAT, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"


def _finite(text: str) -> bool:
    """Whether a YAML float scalar is a finite number (not .nan, .inf or a literal too large for a float)."""
    text = text.lower().replace("_", "")
    if "nan" in text or "inf" in text:
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:  # YAML 1.1 sexagesimal (1:30.5): finite
        return True


def _at(display: str, node: yaml.Node, path: Path_, message: str) -> Problem:
    return Problem(display, node.start_mark.line + 1, node.start_mark.column + 1, dotted(path), message)


def _walk(node: yaml.Node, path: Path_, positions: dict, problems: list[Problem], display: str, depth: int = 0) -> None:
    if depth > 64:
        problems.append(_at(display, node, path, "nested too deeply"))
        return
    if path not in positions:
        positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.ScalarNode) and node.tag == _FLOAT and not _finite(node.value):
        problems.append(_at(display, node, path, f"{node.value} is not a finite number; give a number"))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.MappingNode) and node.flow_style and key_node.flow_style:
                problems.append(  # `text: {{ name }}`: a Jinja expression read as a mapping inside a mapping
                    _at(
                        display,
                        node,
                        path,
                        "a value that starts with `{{` must be quoted, or YAML reads it as a "
                        'mapping; quote the whole value: "{{ ... }}"',
                    )
                )
                break
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(_at(display, key_node, path, "a key must be plain text, not a list or a mapping"))
                continue
            key = key_node.value
            if key_node.tag not in (_STR, _MERGE):
                kind = key_node.tag.rsplit(":", 1)[-1]
                problems.append(
                    _at(display, key_node, (*path, key), f"key {key!r} is read as {kind}, not text; quote it: '{key}'")
                )
            if key in seen and key != "<<":
                problems.append(
                    _at(display, key_node, (*path, key), f"duplicate key (first defined on line {seen[key]})")
                )
            seen[key] = key_node.start_mark.line + 1
            positions.setdefault((*path, key), (key_node.start_mark.line + 1, key_node.start_mark.column + 1))
            _walk(value_node, (*path, key), positions, problems, display, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), positions, problems, display, depth + 1)


# --- YAML errors in the manifest's terms ------------------------------------------------------------------------

_JINJA_VALUE = re.compile(r"(?:^|:\s+|^\s*-\s+|[\[{,]\s*)(\{\{)")
_BLOCK_KEY = re.compile(r"^(\s*)(?:-\s+)?([^\s:#'\"{}\[\],][^:#{}\[\],]*?):(?:\s+(.*?))?\s*$")


def _line_col(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset into `text`."""
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content_indent(line: str) -> int:
    """Where a line's key starts: after its indentation and any `- ` list markers."""
    m = re.match(r"^((?:\s*-\s+)*\s*)", line)
    return len(m.group(1)) if m else 0


def _previous(lines: list[str], index: int) -> int | None:
    """The closest line above `index` with content (not blank, not a comment)."""
    for i in range(min(index, len(lines)) - 1, -1, -1):
        if lines[i].strip() and not lines[i].lstrip().startswith("#"):
            return i
    return None


def _flow_value(text: str) -> str:
    """`text` up to where its value ends: the end of the line, or a `,`, `}` or `]` outside `{{ }}` and brackets
    opened within it (a value inside a flow mapping such as `{text: {{ name }} here, seed: 1}`)."""
    depth, i = 0, 0
    while i < len(text):
        if text.startswith(("{{", "}}"), i):
            i += 2
            continue
        c = text[i]
        if c in "{[":
            depth += 1
        elif c in "}]" or (c == "," and depth == 0):
            if depth == 0:
                return text[:i].rstrip()
            depth -= 1
        i += 1
    return text.split(" #", 1)[0].rstrip()


def _quoted(value: str) -> str:
    value = value.strip()
    return '"' + value.replace("\\", "/").replace('"', '\\"') + '"'


def explain_yaml_error(text: str, exc: yaml.MarkedYAMLError) -> tuple[int, int, str]:
    """(line, column, message) for a YAML syntax error, in the manifest's terms: a tab, an unquoted `{{ ... }}` or
    `key: value` inside a value, a Windows path, a bad indentation (located at the line that is wrong), an
    unclosed bracket. Falls back to PyYAML's own words."""
    mark = exc.problem_mark or exc.context_mark
    ctx = exc.context_mark
    lines = text.split("\n")
    li = mark.line if mark is not None else 0
    col = mark.column if mark is not None else 0
    cur = lines[li] if li < len(lines) else ""
    problem = exc.problem or ""
    context = exc.context or ""
    what = " ".join(x for x in (context, problem) if x)
    here = (li + 1, col + 1)

    if "could not determine a constructor" in what:
        return (*here, f"{what}; only plain YAML data is allowed (no !! tags)")

    # A tab in the indentation (of the error's line or the one its context starts on).
    for i in dict.fromkeys(x for x in (li, ctx.line if ctx is not None else li) if x < len(lines)):
        lead = lines[i][: len(lines[i]) - len(lines[i].lstrip(" \t"))]
        if "\t" in lead or "tab" in problem or cur[col : col + 1] == "\t":
            at = lines[i].find("\t")
            if at >= 0:
                return (
                    i + 1,
                    at + 1,
                    "a tab character: YAML indents with spaces only; replace the tab with spaces",
                )

    # A backslash inside double quotes: an escape to YAML, usually a Windows path.
    if "quoted scalar" in context and ("escape" in problem or "hexdecimal" in problem) and ctx is not None:
        start = lines[ctx.line][ctx.column :]
        value = start[1:].split('"', 1)[0]
        fixed = value.replace("\\", "/")
        if re.match(r"[A-Za-z]:[\\/]", value):
            return (
                ctx.line + 1,
                ctx.column + 1,
                f'"{value}" is a Windows path: a backslash inside double quotes starts an escape in YAML, and an '
                "absolute path is refused anyway; give the path relative to the manifest's folder, with forward "
                "slashes (e.g. portraits/face.jpg)",
            )
        return (
            ctx.line + 1,
            ctx.column + 1,
            "a backslash inside double quotes starts an escape in YAML: for a path use forward slashes "
            f'("{fixed}"), for a backslash itself write two',
        )

    # `{{ ... }}` at the start of a value is a YAML mapping unless the value is quoted.
    for i in dict.fromkeys(x for x in (li, ctx.line if ctx is not None else li) if x < len(lines)):
        m = _JINJA_VALUE.search(lines[i])
        if m and '"' not in lines[i][: m.start(1)] and "'" not in lines[i][: m.start(1)]:
            key = re.search(r"([^\s:{},\[\]'\"]+):\s*$", lines[i][: m.start(1)])
            value = _flow_value(lines[i][m.start(1) :])
            fix = f": {key.group(1)}: {_quoted(value)}" if key else ""
            return (
                i + 1,
                m.start(1) + 1,
                "a value that starts with `{{` must be quoted, or YAML reads it as a mapping; quote the whole value"
                + fix,
            )

    if "mapping values are not allowed" in problem or ("flow mapping" in context and cur[col : col + 1] == ":"):
        prev = _previous(lines, li)
        if "flow" not in context and prev is not None and _indent(cur) > _content_indent(lines[prev]):
            above = lines[prev].split("#", 1)[0].rstrip()
            if ":" not in above:  # `ceo` then an indented `image: x`: the colon is missing above
                word = above.strip().lstrip("- ").strip()
                return (
                    prev + 1,
                    _content_indent(lines[prev]) + 1,
                    f"`{word}` has no colon, so YAML reads it and line {li + 1} as one text; write `{word}:` if the "
                    "lines under it belong to it",
                )
            if not above.endswith(":"):
                key = _BLOCK_KEY.match(lines[prev])
                name = key.group(2) if key else above.strip()
                mine = _BLOCK_KEY.match(cur)
                return (
                    li + 1,
                    _indent(cur) + 1,
                    f"bad indentation: this line is indented more than line {prev + 1} (`{name}: ...`), so YAML reads "
                    f"it as the rest of that value; indent "
                    f"`{mine.group(2) if mine else cur.strip()}` by {_content_indent(lines[prev])} spaces like "
                    f"`{name}`",
                )
        # A `key: value` inside a value: the value needs quotes.
        if "flow" in context:
            keys = list(re.finditer(r"[{,]\s*([^\s:{},'\"]+):\s", cur[:col]))
            if keys:
                k = keys[-1]
                rest = cur[k.end() :]
                end = min((p for p in (rest.find(","), rest.find("}")) if p >= 0), default=len(rest))
                return (
                    li + 1,
                    k.start(1) + 1,
                    f"the value of `{k.group(1)}` contains ': ', which YAML reads as another key; quote the whole "
                    f"value: {k.group(1)}: {_quoted(rest[:end])}",
                )
        key = _BLOCK_KEY.match(cur)
        if key and key.group(3):
            return (
                li + 1,
                _content_indent(cur) + 1,
                f"the value of `{key.group(2)}` contains ': ', which YAML reads as another key; quote the whole value: "
                f"{key.group(2)}: {_quoted(key.group(3))}",
            )

    if context.startswith("while parsing a flow") and ctx is not None and mark is not None and mark.line > ctx.line:
        bracket = lines[ctx.line][ctx.column : ctx.column + 1] or "{"
        closing = "}" if bracket == "{" else "]"
        return (
            ctx.line + 1,
            ctx.column + 1,
            f"the `{bracket}` here is never closed: add `{closing}` where its value ends",
        )
    if "while scanning a quoted scalar" in context and ctx is not None:
        quote = lines[ctx.line][ctx.column : ctx.column + 1]
        return (ctx.line + 1, ctx.column + 1, f"the {quote} that opens this value is never closed; close it")

    if context.startswith("while parsing a block") and ("expected key" in problem or "indicator" in problem):
        if cur.lstrip().startswith("- ") and "mapping" in context:
            return (
                *here,
                f"a list item (`- `) among the keys of the mapping started on line {ctx.line + 1}: give it a key, "
                "or put the list under a key of its own",
            )
        prev = _previous(lines, li)
        like = []
        if prev is not None:
            key = _BLOCK_KEY.match(lines[prev])
            if key:
                like.append((_content_indent(lines[prev]), key.group(2), prev))
        if ctx is not None and ctx.line < len(lines):
            key = _BLOCK_KEY.match(lines[ctx.line])
            start = ctx.column + (2 if "collection" in context else 0)
            if key and start not in [x[0] for x in like]:
                like.append((start, key.group(2), ctx.line))
        options = " or ".join(f"{n} (like `{k}` on line {i + 1})" for n, k, i in like)
        spaces = _indent(cur)
        return (
            li + 1,
            spaces + 1,
            f"bad indentation: this line is indented by {spaces} space{'s' * (spaces != 1)}"
            + (f"; the keys around it are indented by {options}" if options else "")
            + "; line it up with the keys it belongs with",
        )
    return (*here, what)
