"""The studio's manifest: each video made on the web page (or sent inline to `POST /api/jobs`) becomes an entry of
`manifests/studio.yaml`, with its uploads kept beside it under `manifests/studio/`, so that it can be rebuilt with
`dhbatch build manifests/studio.yaml` and committed like any other manifest.

Uploaded files are named by their content (`studio/portraits/<sha256 prefix>.png`): no name a client sends ever
becomes a path. Each file is decoded before it is accepted (Pillow for portraits, the audio stage's decoder for
recordings). The new manifest is written to a temporary file beside the old one, validated like any manifest (schema,
references, files, templates), and only then moved into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from batch.cache import Cache, write_atomic
from batch.errors import DHBatchError, ManifestError, Problem
from batch.manifest import Character, Manifest, Video, display_path, load_manifest, thaw
from batch.plan import plan_manifest, template_problems
from batch.stages import PACKAGE_VOICES

#: The studio's manifest, in the project's manifests/ folder.
STUDIO = "studio"
#: Largest portrait and recording accepted, in bytes.
MAX_PORTRAIT_BYTES = 10 * 1024 * 1024
MAX_RECORDING_BYTES = 25 * 1024 * 1024
#: Largest portrait accepted, in pixels (Pillow's own bomb check is 89 million), and the smallest side.
MAX_PORTRAIT_PIXELS = 40_000_000
MIN_PORTRAIT_SIDE = 64
#: Portrait formats the renderers read, as Pillow names them → the suffix they are stored with.
PORTRAIT_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
#: Recording suffixes accepted (the content is decoded too: a suffix alone proves nothing).
RECORDING_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus", ".webm")
#: Video and character ids: the manifest schema's rule.
ID_RULE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(?<!\.)")

HEADER = (
    "# Videos made in the studio (`dhbatch serve`): one character, script and video per entry.\n"
    "# Edit it like any manifest; rebuild with `dhbatch build manifests/studio.yaml`.\n"
)


class StudioError(DHBatchError):
    """A request for a new video that cannot be made: each problem names the form field it is about."""

    exit_code = 2

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in self.problems))


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file a client sent. `filename` is only shown in messages and picks nothing on disk."""

    filename: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class NewVideo:
    """One video as the form describes it. Exactly one of pick / portrait / description gives the character, and
    one of text / recording the script."""

    id: str = ""
    name: str = ""
    #: A character of a project manifest: "manifest:character".
    pick: str = ""
    portrait: Upload | None = None
    description: str = ""
    seed: int = 0
    text: str = ""
    recording: Upload | None = None
    #: Voice settings (engine, model, rate) for a text script.
    voice: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A character that the form offers to pick."""

    value: str  # "manifest:character"
    manifest: str
    id: str
    name: str
    kind: str  # "portrait" or "description"


class Studio:
    """The studio manifest of a project whose manifests live in `manifests_dir`."""

    def __init__(
        self, manifests_dir: Path, lock_dir: Path, *, build_dir: Path | None = None, checkpoints: Path | None = None
    ) -> None:
        self.manifests_dir = manifests_dir.resolve()
        self.path = self.manifests_dir / f"{STUDIO}.yaml"
        #: With a build folder, a new video is also checked as `dhbatch validate` checks it before rendering (its
        #: portrait has a face, its recording decodes, the weights it needs are there) before it is written.
        self.build_dir = build_dir
        self.checkpoints = checkpoints if checkpoints is not None else Path("checkpoints")
        self._lock = threading.Lock()
        self._lock_file = lock_dir / "studio.yaml.lock"  # other processes writing the studio manifest

    # -- what the form offers -------------------------------------------------------------------------------------
    def manifest_paths(self) -> dict[str, Path]:
        """The project's manifests by name (the file's stem), sorted; the names are what URLs and picks use."""
        found: dict[str, Path] = {}
        for path in sorted(self.manifests_dir.glob("*.y*ml")):
            if path.suffix in (".yaml", ".yml") and path.is_file() and ID_RULE.fullmatch(path.stem):
                found.setdefault(path.stem, path)
        return found

    def characters(self) -> list[Choice]:
        """Every character of the project's valid manifests (an invalid manifest offers none)."""
        out = []
        for name, path in self.manifest_paths().items():
            try:
                manifest = load_manifest(path)
            except DHBatchError:
                continue
            for c in manifest.characters.values():
                kind = "portrait" if c.image is not None else "description"
                out.append(Choice(f"{name}:{c.id}", name, c.id, c.name, kind))
        return out

    # -- adding a video -------------------------------------------------------------------------------------------
    def add_video(self, new: NewVideo) -> str:
        """Write `new` into the studio manifest (validated, atomically) and return its video id."""
        problems: list[tuple[str, str]] = []
        if new.id and not ID_RULE.fullmatch(new.id):
            problems.append(("id", f"{new.id!r} is not a valid id: use letters, digits, '-', '_' and '.', at most 64"))
        given = [k for k, v in (("pick", new.pick), ("portrait", new.portrait), ("description", new.description)) if v]
        if len(given) != 1:
            problems.append(("character", "pick a character, upload a portrait, or describe one (exactly one)"))
        if bool(new.text.strip()) == bool(new.recording):
            problems.append(("script", "write a script or upload a recording (exactly one)"))
        if problems:
            raise StudioError(problems)
        # Uploads are checked before anything is written.
        portrait = check_portrait(new.portrait) if new.portrait else None
        recording = check_recording(new.recording) if new.recording else None
        picked = self._picked(new.pick) if new.pick else None
        with self._lock, FileLock(str(self._lock_file)):
            data = self._load()
            videos, characters, scripts = data["videos"], data["characters"], data["scripts"]
            taken = {v.get("id") for v in videos if isinstance(v, dict)}
            if new.id and new.id in taken:
                raise StudioError([("id", f"a video {new.id!r} is already in {display_path(self.path)}")])
            vid = new.id or _free_id(_slug(new.name or (picked[1].name if picked else "") or "video"), taken)
            if picked is not None and picked[0] == STUDIO:
                cid = picked[1].id  # a studio character is reused as it is
            else:
                cid = _free_id(vid, set(characters), first=vid)
                entry: dict[str, Any] = {"name": new.name} if new.name else {}
                if picked is not None:
                    entry = {**self._copy_character(picked[1]), **entry}
                elif portrait is not None:
                    entry.update(image=self._store("portraits", *portrait), seed=int(new.seed))
                else:
                    entry.update(description=new.description.strip(), seed=int(new.seed))
                characters[cid] = entry
            sid = _free_id(vid, set(scripts), first=vid)
            scripts[sid] = {"audio": self._store("recordings", *recording)} if recording else {"text": new.text.strip()}
            video: dict[str, Any] = {"id": vid, "character": cid, "script": sid}
            voice = {k: v for k, v in dict(new.voice).items() if v not in (None, "")}
            if "model" in voice and voice["model"] == next(iter(PACKAGE_VOICES.get(voice.get("engine", ""), ())), None):
                del voice["model"]  # the engine's default voice: left unset, as manifests usually have it
            if voice and not recording:
                video["overrides"] = {"voice": voice}
            videos.append(video)
            self._write(data, vid)
        return vid

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {
                "version": 1,
                "defaults": {"voice": {"engine": "piper"}, "video": {"renderer": "auto", "size": 256}},
                "characters": {},
                "scripts": {},
                "videos": [],
            }
        load_manifest(self.path)  # a studio manifest broken by hand: its problems, located, before any change
        data = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        for key, empty in (("characters", {}), ("scripts", {}), ("videos", [])):
            data.setdefault(key, empty)
        return data

    def _write(self, data: dict[str, Any], vid: str) -> None:
        """Validate the new manifest beside the old one (its relative paths resolve the same), then move it there."""
        text = HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{STUDIO}.", suffix=".new.yaml", dir=self.manifests_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                manifest = load_manifest(tmp)
                videos = [v for v in manifest.videos if v.id == vid]
                problems = template_problems(manifest, videos) or self._preflight(manifest, videos)
            except ManifestError as exc:
                problems = exc.problems
            if problems:
                shown = display_path(tmp)
                named = [
                    dataclasses.replace(p, file=display_path(self.path)) if p.file == shown else p for p in problems
                ]
                raise ManifestError(named, "the new video was not added; fix the form's values")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _preflight(self, manifest: Manifest, videos: list[Video]) -> list[Problem]:
        """What would fail the new video's build, found before rendering (batch/checks.py, as `dhbatch validate`)."""
        if self.build_dir is None:
            return []
        from batch.checks import preflight

        cache = Cache(self.build_dir / "cache")
        plan = plan_manifest(manifest, cache, build_dir=self.build_dir, checkpoints=self.checkpoints, videos=videos)
        findings, _ = preflight(plan, self.checkpoints, cache.root, cache.hasher, measure=True)
        cache.hasher.save()
        return [
            dataclasses.replace(f.problem, message=f"{f.problem.message} — {f.hint}" if f.hint else f.problem.message)
            for f in findings
            if f.severity == "error"
        ]

    def _picked(self, pick: str) -> tuple[str, Character]:
        name, _, cid = pick.partition(":")
        path = self.manifest_paths().get(name)
        if path is None:
            raise StudioError([("pick", f"no manifest named {name!r} in {display_path(self.manifests_dir)}")])
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            raise StudioError([("pick", f"manifests/{path.name} is invalid: {exc.problems[0]}")]) from exc
        if cid not in manifest.characters:
            raise StudioError([("pick", f"{path.name} has no character {cid!r}")])
        return name, manifest.characters[cid]

    def _copy_character(self, character: Character) -> dict[str, Any]:
        """A character of another manifest as a studio entry: its portrait by a path relative to the studio manifest
        (a copy under studio/portraits/ where it lies outside manifests/), its description, seed and settings."""
        entry: dict[str, Any] = {"name": character.name}
        if character.image is not None:
            if character.image.is_relative_to(self.manifests_dir):
                entry["image"] = character.image.relative_to(self.manifests_dir).as_posix()
            else:
                data = character.image.read_bytes()
                entry["image"] = self._store("portraits", data, PORTRAIT_FORMATS.get(_image_format(data), ".png"))
        if character.description is not None:
            entry["description"] = character.description
        entry["seed"] = character.seed
        overrides = thaw(character.overrides)
        if voice := overrides.pop("voice", None):
            entry["voice"] = voice
        if overrides:
            entry["overrides"] = overrides
        return entry

    def _store(self, kind: str, data: bytes, suffix: str) -> str:
        """Keep an upload under studio/<kind>/, named by its content; the path relative to the studio manifest."""
        rel = f"{STUDIO}/{kind}/{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
        path = self.manifests_dir / rel
        if not path.is_file():
            write_atomic(path, data)
        return rel


def voice_choices(checkpoints: Path) -> list[tuple[str, str]]:
    """(engine, model) pairs the form offers: each offline engine's bundled voices and the voices under
    checkpoints/<engine>/, then gTTS (online)."""
    found = []
    for engine, bundled in PACKAGE_VOICES.items():
        found += [(engine, name) for name in bundled]
        found += [(engine, p.stem) for p in sorted((checkpoints / engine).glob("*.onnx")) if p.stem not in bundled]
    return [*found, ("gtts", "")]


def check_portrait(upload: Upload) -> tuple[bytes, str]:
    """The upload's bytes and suffix if it decodes as a PNG or JPEG portrait of a sensible size; else StudioError."""
    if len(upload.data) > MAX_PORTRAIT_BYTES:
        raise StudioError(
            [("portrait", f"{upload.filename} is {_mb(len(upload.data))}; the limit is {_mb(MAX_PORTRAIT_BYTES)}")]
        )
    fmt = _image_format(upload.data)
    if fmt not in PORTRAIT_FORMATS:
        what = f"a {fmt} image" if fmt else "not an image"
        raise StudioError([("portrait", f"{upload.filename} is {what}; upload a PNG or JPEG portrait")])
    from PIL import Image

    try:
        with Image.open(io.BytesIO(upload.data)) as im:
            width, height = im.size
            if width * height > MAX_PORTRAIT_PIXELS or min(width, height) < MIN_PORTRAIT_SIDE:
                raise StudioError(
                    [
                        (
                            "portrait",
                            f"{upload.filename} is {width}×{height}; a portrait is {MIN_PORTRAIT_SIDE} to 6000 pixels a side",
                        )
                    ]
                )
            im.load()  # decode every pixel: a truncated or corrupt file fails here, not in the build
    except StudioError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise StudioError([("portrait", f"{upload.filename} cannot be decoded: {exc}")]) from exc
    return upload.data, PORTRAIT_FORMATS[fmt]


def check_recording(upload: Upload) -> tuple[bytes, str]:
    """The upload's bytes and suffix if it is an audio recording the audio stage decodes, with sound in it."""
    suffix = Path(upload.filename).suffix.lower()
    if suffix not in RECORDING_SUFFIXES:
        raise StudioError([("recording", f"{upload.filename}: upload a {', '.join(RECORDING_SUFFIXES)} recording")])
    if len(upload.data) > MAX_RECORDING_BYTES:
        raise StudioError(
            [("recording", f"{upload.filename} is {_mb(len(upload.data))}; the limit is {_mb(MAX_RECORDING_BYTES)}")]
        )
    from renderer.base import RenderError  # decoding is the audio stage's own code, loaded when used
    from renderer.voice import decode_to_wav

    with tempfile.TemporaryDirectory(prefix="dhbatch-upload-") as tmp:
        try:
            decode_to_wav(io.BytesIO(upload.data), Path(tmp) / "speech.wav", upload.filename)
        except RenderError as exc:
            raise StudioError([("recording", exc.message)]) from exc
    return upload.data, suffix


def _image_format(data: bytes) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return slug or "video"


def _free_id(base: str, taken: set[Any], first: str | None = None) -> str:
    """`first` when free, else base-2, base-3, ...; `base` is a valid id of at most 40 characters."""
    if first is not None and first not in taken:
        return first
    for n in range(1 if first is None else 2, 100_000):
        candidate = f"{base}-{n}"
        if candidate not in taken:
            return candidate
    return f"{base}-{uuid.uuid4().hex[:8]}"
