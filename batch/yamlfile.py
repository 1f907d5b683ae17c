"""Safe YAML loading that remembers where every value came from (file:line:column).

Only plain data is accepted: `yaml.safe_load` semantics (no object-constructing tags), a cap on alias expansion
(so a "billion laughs" file fails fast instead of eating memory), strict UTF-8, and duplicate keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
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
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        if "could not determine a constructor" in what:
            what = f"{what}; only plain YAML data is allowed (no !! tags)"
        raise _problem(display, mark, f"YAML error: {what}") from exc
    except yaml.YAMLError as exc:
        raise _problem(display, None, f"YAML error: {exc}") from exc
    except RecursionError as exc:
        raise _problem(display, None, "the document nests too deeply") from exc
    finally:
        loader.dispose()
    return Located(display, data, positions)


def _check_size(root: yaml.Node, display: str) -> None:
    """Refuse documents whose aliases expand beyond MAX_NODES values (alias bombs)."""
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
