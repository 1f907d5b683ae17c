"""Manifest format version 1: load, validate (all problems at once, located), resolve into frozen data."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import gc
import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path, PureWindowsPath
from types import MappingProxyType
from typing import Any

import jsonschema

from batch.errors import ManifestError, Problem
from batch.templates import TemplateError, compile_template
from batch.yamlfile import Located, dotted, load_yaml

SECTIONS = ("llm", "image", "voice", "video")
#: Documents a written script may be made from (`sources`), by file suffix: what renderer/retrieval.py reads.
SOURCE_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".html", ".htm", ".pdf")


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON schema that ships inside the package."""
    return json.loads(resources.files("batch").joinpath("schema/manifest.schema.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    return cls(schema())


@functools.lru_cache(maxsize=1)
def _video_validator() -> jsonschema.protocols.Validator | None:
    """A validator of one `videos` entry with its `$ref`s to `$defs/id` written out (the same schema, without a
    reference lookup per entry); None if the schema says more about `videos` than the type of its entries."""
    top = schema()
    videos = top["properties"].get("videos", {})
    if set(videos) != {"type", "items"} or set(videos["items"]) != {"$ref"}:
        return None
    entry = top["$defs"][videos["items"]["$ref"].rsplit("/", 1)[-1]]
    props = {
        name: top["$defs"][sub["$ref"].rsplit("/", 1)[-1]] if sub == {"$ref": "#/$defs/id"} else sub
        for name, sub in entry.get("properties", {}).items()
    }
    return _validator().evolve(schema={**entry, "properties": props})


def _quickly_valid(data: Any) -> bool:
    """Whether a document is valid, checked without collecting errors (a 10,000-video manifest in a fifth of the
    time): the document less its videos, then each video entry. False sends it through the full validation, which
    says what is wrong."""
    videos, entry = data.get("videos"), _video_validator()
    if not isinstance(videos, list) or entry is None:
        return False
    return _validator().is_valid({**data, "videos": []}) and all(entry.is_valid(v) for v in videos)


@functools.lru_cache(maxsize=1)
def section_defaults() -> Mapping[str, Mapping[str, Any]]:
    """Defaults of every settings section, read from the schema (the one place they are written)."""
    defs = schema()["$defs"]
    return MappingProxyType(
        {s: MappingProxyType({k: v.get("default") for k, v in defs[s]["properties"].items()}) for s in SECTIONS}
    )


def freeze(value: Any) -> Any:
    """Deep read-only copy of plain data (dict → MappingProxyType, list → tuple)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of freeze, for JSON output."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclasses.dataclass(frozen=True)
class Character:
    id: str
    name: str
    description: str | None
    image: Path | None
    seed: int
    #: Per-section overrides (voice included), merged over the manifest's defaults.
    overrides: Mapping[str, Mapping[str, Any]]
    location: Location


@dataclasses.dataclass(frozen=True)
class Script:
    id: str
    #: Jinja source of the text (from `text` or `text_file`), None for an audio script.
    text: str | None
    text_file: Path | None
    audio: Path | None
    vars: Mapping[str, Any]
    location: Location
    #: Where the text (or text_file key) is, for template errors.
    text_location: Location | None = None
    #: A written script (`brief` + `sources`): what to write about, the files matched by the `sources` globs (sorted,
    #: under the manifest's folder), the target length, and `llm` settings over `defaults.llm`.
    brief: str | None = None
    sources: tuple[Path, ...] = ()
    words: int = 80
    llm: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclasses.dataclass(frozen=True)
class Video:
    id: str
    character: str
    script: str
    overrides: Mapping[str, Mapping[str, Any]]
    location: Location


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: Path
    #: Name of the output folder: build/<name>/.
    name: str
    root: Path
    defaults: Mapping[str, Mapping[str, Any]]
    vars: Mapping[str, Any]
    characters: Mapping[str, Character]
    scripts: Mapping[str, Script]
    videos: tuple[Video, ...]
    #: The manifest and every file it includes, for hashing and messages.
    files: tuple[Path, ...]

    def settings(self, video: Video) -> Mapping[str, Mapping[str, Any]]:
        """Resolved settings of every section for a video: schema defaults ← defaults ← character ← video."""
        character = self.characters[video.character]
        out = {}
        for section in SECTIONS:
            merged = dict(section_defaults()[section])
            for layer in (self.defaults, character.overrides, video.overrides):
                merged.update(layer.get(section, {}))
            out[section] = MappingProxyType(merged)
        return MappingProxyType(out)


def display_path(path: Path) -> str:
    """How a path is shown in messages: relative to the current folder when below it."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, doc: Located, path: tuple, message: str) -> None:
        problem = doc.problem(path, message)
        if problem not in self.problems:  # each problem once, at its place
            self.problems.append(problem)


def _inside(root: Path, candidate: Path) -> bool:
    try:
        candidate.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_path(root: Path, base: Path, rel: str) -> Path:
    """`rel` resolved against `base`, symlinks followed; ValueError when it leaves `root`."""
    p = Path(rel)
    if PureWindowsPath(rel).drive:
        raise ValueError(
            f"{rel} is an absolute Windows path, and absolute paths are not allowed; give a path relative to the "
            "manifest's folder, with forward slashes"
        )
    if p.is_absolute():
        raise ValueError("absolute paths are not allowed; give a path relative to the manifest's folder")
    if "\\" in rel:
        raise ValueError(f"{rel} has backslashes (a Windows path); use forward slashes: {rel.replace(chr(92), '/')}")
    if any(ord(c) < 32 for c in rel):  # "portraits\new.png" in double quotes: YAML made a newline of "\n"
        raise ValueError(
            f"{rel!r} holds a control character (a backslash inside double quotes is an escape in YAML); "
            "write the path with forward slashes"
        )
    full = (base / p).resolve()
    if not _inside(root, full):
        raise ValueError(f"{rel!r} points outside the manifest's folder; keep files beside or below the manifest")
    return full


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a manifest loads or plans: they make tens of thousands of small
    containers that all live until the plan is done, which the collector would scan again and again (a third of
    the time of a 10,000-video plan). Nested uses keep it off until the outermost ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@gc_paused()
def load_manifest(path: Path | str) -> Manifest:
    """Load and validate a manifest and its includes; raise ManifestError listing every problem found."""
    path = Path(path)
    display = display_path(path)
    if not path.is_file():
        raise ManifestError([Problem(display, 0, 0, "", "no such manifest file")], "check the path")
    top = path.resolve()
    root = top.parent
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", top.stem) or ".." in top.stem:
        raise ManifestError(
            [Problem(display, 0, 0, "", f"the file name {top.stem!r} cannot name an output folder under build/")],
            "rename the manifest to letters, digits, '-', '_' and '.'",
        )
    problems = _Collector()
    docs: list[tuple[Located, Path]] = []
    _load_tree(top, root, display, problems, docs, stack=())
    if problems.problems:
        raise ManifestError(problems.problems)
    return _assemble(top, root, docs, problems)


def _load_tree(file: Path, root: Path, display: str, problems: _Collector, docs: list, stack: tuple[Path, ...]) -> None:
    doc = load_yaml(file, display)
    if not isinstance(doc.data, dict):
        raise ManifestError([Problem(display, 1, 1, "", "a manifest is a mapping that starts with `version: 1`")])
    errors = [] if _quickly_valid(doc.data) else _one_per_place(_validator().iter_errors(doc.data))
    for err in sorted(errors, key=lambda e: (doc.where(tuple(e.absolute_path)), e.message)):
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties":  # point at the unknown key itself
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            path = (*path, extra[0]) if extra else path
        problems.add(doc, path, _schema_message(err))
    if errors:
        return
    docs.append((doc, file))
    for i, rel in enumerate(doc.data.get("include", [])):
        try:
            inc = resolve_path(root, file.parent, rel)
        except ValueError as exc:
            problems.add(doc, ("include", i), str(exc))
            continue
        if inc in stack or inc == file:
            chain = " → ".join(display_path(p) for p in (*stack, file, inc))
            problems.add(doc, ("include", i), f"include cycle: {chain}")
            continue
        if not inc.is_file():
            problems.add(doc, ("include", i), f"included file {rel!r} does not exist")
            continue
        if any(loaded == inc for _, loaded in docs):  # reached again through another include (a diamond): once
            continue
        try:
            _load_tree(inc, root, display_path(inc), problems, docs, (*stack, file))
        except ManifestError as exc:
            problems.problems.extend(exc.problems)


_PLACEHOLDERS = {"{character}", "{script}"}
_ID_RULE = "use letters, digits, '-', '_' and '.' (no '..'), at most 64 characters"
_BAD_ID = "{!r} is not a valid id: " + _ID_RULE


#: How a JSON schema type is said to a person writing YAML.
_KINDS = {
    "object": "a mapping (`key: value` lines)",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def _expected_type(err: jsonschema.ValidationError) -> str | None:
    """The type a failed schema asked for (its own `type`, or the first branch's of a oneOf/anyOf)."""
    schema_ = err.schema if isinstance(err.schema, dict) else {}
    kind = schema_.get("type")
    if kind is None:
        for branch in schema_.get("oneOf", schema_.get("anyOf", [])):
            target = branch
            if "$ref" in branch:
                target = schema()["$defs"].get(branch["$ref"].rsplit("/", 1)[-1], {})
            if "type" in target:
                kind = target["type"]
                break
    if kind is None and {"properties", "required", "additionalProperties"} & set(schema_):
        kind = "object"
    return kind[0] if isinstance(kind, list) else kind


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def _type_message(instance: Any, expected: str | list[str]) -> str:
    kinds = [expected] if isinstance(expected, str) else list(expected)
    wanted = " or ".join(_KINDS.get(k, k) for k in kinds)
    if isinstance(instance, str) and {"integer", "number"} & set(kinds) and _number(instance) is not None:
        return f"{instance!r} is quoted: write {instance} without quotes (a number, not a string)"
    if isinstance(instance, str) and "boolean" in kinds:
        return f"{instance!r} is text; write true or false (without quotes)"
    got = {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number", float: "a number"}
    return f"{instance!r} is {got.get(type(instance), type(instance).__name__)}; give {wanted}"


def _enum_message(instance: Any, allowed: list[Any]) -> str:
    choices = ", ".join(str(a) for a in allowed)
    if isinstance(instance, str) and _number(instance) in allowed:
        return f"{instance!r} is quoted: write {instance} without quotes (a number, not a string; one of {choices})"
    guess = difflib.get_close_matches(str(instance), [str(a) for a in allowed], n=1)
    maybe = f"; did you mean {guess[0]!r}?" if guess and isinstance(instance, str) else ""
    return f"{instance!r} is not one of {choices}{maybe}"


def _one_per_place(errors: Iterable[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """One error per place in the document (the most telling one), so a value is never reported twice: an empty
    value fails its type and every oneOf branch at once."""
    rank = {"type": 0, "additionalProperties": 1, "required": 2}
    best: dict[tuple, jsonschema.ValidationError] = {}
    for err in errors:
        place = tuple(err.absolute_path)
        if place not in best or rank.get(err.validator, 5) < rank.get(best[place].validator, 5):
            best[place] = err
    return list(best.values())


def _schema_message(err: jsonschema.ValidationError) -> str:
    """Shorter, user-facing messages for the common schema failures."""
    if err.validator == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(known))
        guesses = [g for x in extra for g in difflib.get_close_matches(x, known, n=1)]
        maybe = f"; did you mean {', '.join(map(repr, guesses))}?" if guesses else ""
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} (allowed: {', '.join(known)}){maybe}"
    if err.validator == "const" and err.absolute_path and list(err.absolute_path) == ["version"]:
        return f"unsupported manifest version {err.instance!r}; this tool reads version 1"
    if (
        err.validator == "oneOf"
        and isinstance(err.instance, dict)
        and {"text", "text_file", "audio"} & set(err.schema.get("properties", {}))
    ):
        given = [k for k in ("text", "text_file", "audio", "brief") if k in err.instance]
        return f"a script needs exactly one of text, text_file, audio or brief (given: {', '.join(given) or 'none'})"
    if err.validator == "dependentRequired":
        needs = {"brief": "sources (the files to write it from)"}
        key = next((k for k, v in err.validator_value.items() if k in err.instance and set(v) - set(err.instance)), "")
        return f"{key!r} needs {needs.get(key, 'brief (what to write about)')}" if key else err.message
    if err.validator == "anyOf" and "description" in err.schema.get("properties", {}):
        return "a character needs a description (to draw it) or an image (a portrait file)"
    if err.validator == "propertyNames":
        return _BAD_ID.format(err.instance)
    if err.validator == "pattern" and err.schema.get("pattern") == schema()["$defs"]["id"]["pattern"]:
        return _BAD_ID.format(err.instance)
    if err.instance is None:
        return f"has no value; give {_KINDS.get(_expected_type(err), 'a value')}"
    if err.validator == "type":
        return _type_message(err.instance, err.validator_value)
    if err.validator == "enum":
        return _enum_message(err.instance, err.validator_value)
    if err.validator in ("oneOf", "anyOf") and err.context:
        return _schema_message(jsonschema.exceptions.best_match(err.context))
    if err.validator == "pattern" and list(err.path)[-1:] == ["model"]:
        return (
            f"{err.instance!r} must name weights inside checkpoints/: a name or a relative path without '..' (not "
            "absolute, not '~'); keep other weights under a folder given with --checkpoints, or link them in"
        )
    return err.message


def _assemble(top: Path, root: Path, docs: list[tuple[Located, Path]], problems: _Collector) -> Manifest:
    # docs[0] is the top manifest; includes follow in depth-first order. The top file wins for defaults and vars.
    defaults: dict[str, dict[str, Any]] = {}
    variables: dict[str, Any] = {}
    for doc, _ in reversed(docs):
        for section, values in doc.data.get("defaults", {}).items():
            defaults.setdefault(section, {}).update(values)
        variables.update(doc.data.get("vars", {}))

    characters: dict[str, Character] = {}
    char_where: dict[str, Location] = {}
    scripts: dict[str, Script] = {}
    script_where: dict[str, Location] = {}
    for doc, file in docs:
        for cid, c in doc.data.get("characters", {}).items():
            loc = _loc(doc, ("characters", cid))
            if cid in characters:
                problems.add(doc, ("characters", cid), f"character {cid!r} is already defined at {char_where[cid]}")
                continue
            image = _file(doc, root, file, ("characters", cid, "image"), c.get("image"), problems)
            overrides = copy.deepcopy(c.get("overrides", {}))
            if "voice" in c:
                overrides["voice"] = {**overrides.get("voice", {}), **c["voice"]}
            characters[cid] = Character(
                cid, c.get("name", cid), c.get("description"), image, int(c.get("seed", 0)), freeze(overrides), loc
            )
            char_where[cid] = loc
        for sid, s in doc.data.get("scripts", {}).items():
            loc = _loc(doc, ("scripts", sid))
            if sid in scripts:
                problems.add(doc, ("scripts", sid), f"script {sid!r} is already defined at {script_where[sid]}")
                continue
            text = s.get("text")
            text_file = _file(doc, root, file, ("scripts", sid, "text_file"), s.get("text_file"), problems)
            if text_file is not None:
                try:
                    text = text_file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    problems.add(doc, ("scripts", sid, "text_file"), f"cannot read the text file: {exc}")
            audio = _file(doc, root, file, ("scripts", sid, "audio"), s.get("audio"), problems)
            field = "text_file" if "text_file" in s else "text"
            if text is not None:
                try:
                    compile_template(text, f"scripts.{sid}.{field}")
                except TemplateError as exc:
                    problems.add(doc, ("scripts", sid, field), exc.message.removeprefix(f"scripts.{sid}.{field}: "))
            tloc = _loc(doc, ("scripts", sid, field)) if field in s else None
            written: dict[str, Any] = {}
            if "brief" in s:
                tloc = _loc(doc, ("scripts", sid, "brief"))
                written = {
                    "brief": s["brief"],
                    "sources": _sources(doc, root, file, ("scripts", sid, "sources"), s["sources"], problems),
                    "words": s.get("words", schema()["$defs"]["script"]["properties"]["words"]["default"]),
                    "llm": freeze(s.get("llm", {})),
                }
            scripts[sid] = Script(sid, text, text_file, audio, freeze(s.get("vars", {})), loc, tloc, **written)
            script_where[sid] = loc

    videos: list[Video] = []
    seen: dict[str, Location] = {}

    # Ids a matrix makes: the id rule, up to 200 characters (a character id and a script id of 64 each, and more).
    id_pattern = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,199}(?<!\.)")

    def add_video(doc: Located, path: tuple, vid: str, char: str, script: str, overrides: Any) -> None:
        loc = _loc(doc, path)
        ok = True
        if path[0] == "matrix" and not id_pattern.fullmatch(vid):  # `videos[].id` is checked by the schema
            rule = _ID_RULE.replace("at most 64", "at most 200")
            problems.add(doc, (*path, "id"), f"makes the video id {vid!r}, which is not valid: {rule}")
            return
        if char not in characters:
            problems.add(doc, (*path, "character"), f"unknown character {char!r} (known: {_known(characters)})")
            ok = False
        if script not in scripts:
            problems.add(doc, (*path, "script"), f"unknown script {script!r} (known: {_known(scripts)})")
            ok = False
        if vid in seen:
            problems.add(
                doc,
                (*path, "id") if path[0] == "videos" else path,
                f"duplicate video id {vid!r} (first at {seen[vid]})",
            )
            ok = False
        if ok:
            seen[vid] = loc
            videos.append(Video(vid, char, script, freeze(overrides or {}), loc))

    for doc, _ in docs:
        for i, v in enumerate(doc.data.get("videos", [])):
            add_video(doc, ("videos", i), v["id"], v["character"], v["script"], v.get("overrides"))
        matrices = doc.data.get("matrix", [])
        for j, m in enumerate(matrices if isinstance(matrices, list) else [matrices]):
            mpath = ("matrix", j) if isinstance(matrices, list) else ("matrix",)
            chars = list(characters) if m["characters"] == "all" else m["characters"]
            scrs = list(scripts) if m["scripts"] == "all" else m["scripts"]
            pattern = m.get("id", "{character}-{script}")
            unknown = sorted({f"{{{name}}}" for name in re.findall(r"\{([^{}]*)\}", pattern)} - _PLACEHOLDERS)
            if unknown:  # said once for the pattern, not once per video it would make
                problems.add(
                    doc,
                    (*mpath, "id"),
                    f"unknown placeholder{'s' * (len(unknown) > 1)} {', '.join(unknown)} in the id pattern "
                    f"{pattern!r}; use {{character}} and {{script}}",
                )
                continue
            for c in chars:
                for s in scrs:
                    vid = pattern.replace("{character}", c).replace("{script}", s)
                    add_video(doc, mpath, vid, c, s, m.get("overrides"))
    for doc, _ in docs[:1]:
        if not videos and not problems.problems:
            problems.add(doc, (), "the manifest makes no videos: add `videos:` or a `matrix:`")
    if problems.problems:
        raise ManifestError(problems.problems)
    return Manifest(
        path=top,
        name=top.stem,
        root=root,
        defaults=freeze(defaults),
        vars=freeze(variables),
        characters=MappingProxyType(characters),
        scripts=MappingProxyType(scripts),
        videos=tuple(videos),
        files=tuple(f for _, f in docs),
    )


def _marked_root(manifest: Path) -> Path | None:
    """The nearest ancestor of the manifest with .git or checkpoints/, if any."""
    start = manifest.resolve().parent
    return next((f for f in (start, *start.parents) if (f / ".git").exists() or (f / "checkpoints").is_dir()), None)


def project_root(manifest: Path) -> Path:
    """The folder holding build/ and checkpoints/: the nearest ancestor of the manifest with .git, else its folder."""
    return _marked_root(manifest) or manifest.resolve().parent


def manifest_identity(manifest: Manifest) -> str:
    """The manifest's path from its project root (the same in every checkout of the repository); its absolute path
    where it has no project root (no .git or checkpoints/ above it)."""
    path = manifest.path.resolve()
    root = _marked_root(manifest.path)
    return path.as_posix() if root is None else path.relative_to(root).as_posix()


def _known(ids: Mapping[str, Any]) -> str:
    return ", ".join(sorted(ids)) or "none"


def _loc(doc: Located, path: tuple) -> Location:
    line, col = doc.where(path)
    return Location(doc.file, line, col)


def _file(doc: Located, root: Path, file: Path, path: tuple, rel: str | None, problems: _Collector) -> Path | None:
    if rel is None:
        return None
    try:
        full = resolve_path(root, file.parent, rel)
    except ValueError as exc:
        problems.add(doc, path, str(exc))
        return None
    if not full.is_file():
        problems.add(doc, path, f"file {rel!r} does not exist ({display_path(full)})")
        return None
    return full


def _sources(
    doc: Located, root: Path, file: Path, path: tuple, patterns: list[str], problems: _Collector
) -> tuple[Path, ...]:
    """The files a written script's `sources` name: each entry a file or a glob (`**` included) relative to the
    manifest's folder, which must match at least one readable document of a known kind inside that folder."""
    found: dict[Path, None] = {}
    for i, pattern in enumerate(patterns):
        where = (*path, i)
        if Path(pattern).is_absolute() or pattern.startswith("~"):
            problems.add(doc, where, f"{pattern!r}: absolute paths are not allowed; give one relative to the manifest")
            continue
        hits = sorted(glob.glob(os.path.join(glob.escape(str(file.parent)), pattern), recursive=True))
        files = []
        for hit in hits:
            full = Path(hit).resolve()
            if not _inside(root, full):
                outside = f"{pattern!r} reaches {os.path.relpath(hit, file.parent)!r}, outside the manifest's folder"
                problems.add(doc, where, f"{outside}; keep sources beside or below the manifest")
                files = None
                break
            if full.is_file():
                files.append(full)
        if files is None:
            continue
        if not files:
            what = "matches no file" if glob.has_magic(pattern) else "does not exist"
            problems.add(doc, where, f"{pattern!r} {what} (looked in {display_path(file.parent)})")
            continue
        bad = [f for f in files if f.suffix.lower() not in SOURCE_SUFFIXES]
        if bad:
            problems.add(
                doc,
                where,
                f"{pattern!r} matches {display_path(bad[0])}, which is not a document this tool reads "
                f"(supported: {', '.join(SOURCE_SUFFIXES)}); narrow the pattern",
            )
            continue
        found.update(dict.fromkeys(files))
    return tuple(sorted(found))


__all__ = [
    "Character",
    "Location",
    "Manifest",
    "Script",
    "Video",
    "dotted",
    "freeze",
    "load_manifest",
    "section_defaults",
    "thaw",
]
