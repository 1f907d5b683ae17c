"""What every stage shares: the job it runs, typed errors, and the warm model pool.

This module must stay light (no torch at import): the runner imports it before any model loads.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

#: Video frame rate of every animated video (SadTalker's rate).
FPS = 25
#: Sample rate of every speech WAV handed to the animators (SadTalker's rate).
SAMPLE_RATE = 16_000
#: Audio samples per video frame: frame count = floor(samples / SAMPLES_PER_FRAME).
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS

T = TypeVar("T")


class RenderError(Exception):
    """A stage could not produce its output; the runner reports it for the affected videos.

    `message` says what failed and where, `hint` what to do about it; `artifact`, a file in the job's `out_dir` that
    shows what went wrong (the portrait that failed the face check), which the runner keeps in the cache's failed/
    folder and the report shows beside the error.
    """

    def __init__(self, message: str, hint: str = "", artifact: Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.artifact = artifact

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


def summarise(text: object, limit: int = 160) -> str:
    """A service's error text in one short line, never pasted raw: an HTML error page becomes its title (or first
    heading) and first words, a JSON body its `error`/`detail`/`message`, a validation dump (pydantic's "1
    validation error for ...") its first complaint; whitespace collapsed, cut to `limit` characters."""
    import html
    import json
    import re

    raw = str(text).strip()
    if raw[:1] in "{[":
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key in ("error", "detail", "message"):
                if data.get(key):
                    return summarise(data[key], limit)
        if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("msg"):
            return summarise(f"{'.'.join(map(str, data[0].get('loc', [])))}: {data[0]['msg']}", limit)
    if re.search(r"<(?:!doctype|html|head|body|title|h1)\b", raw, re.IGNORECASE):
        title = re.search(r"<(title|h1)[^>]*>(.*?)</\1>", raw, re.IGNORECASE | re.DOTALL)
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>|<[^>]+>", " ", raw, flags=re.IGNORECASE | re.DOTALL)
        words = html.unescape(title.group(2) if title else body)
        raw = f"an HTML page: {' '.join(words.split())}"
    else:
        dump = re.match(r"\d+ validation errors? for \w+\s*\n\s*(\S+)\s*\n\s*([^\[\n]+)", raw)
        if dump:
            raw = f"{dump.group(1)}: {dump.group(2).strip()}"
    line = " ".join(raw.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class MissingWeightsError(RenderError):
    """Model weights are absent; the hint names the files and `make checkpoints`."""


class BadInputError(RenderError):
    """An input is unusable: no face in a portrait, unreadable image, corrupt audio, empty text."""


class BackendError(RenderError):
    """A service or library failed: server unreachable, network needed, model not pulled."""


@dataclasses.dataclass(frozen=True)
class StepJob:
    """One step for a stage to run.

    The runner creates `out_dir` (an empty temporary folder); the stage writes its outputs there under the
    file names its stage documents, and the runner moves the folder into the cache atomically.
    """

    stage: str
    key: str
    #: Resolved settings of the stage's manifest section (e.g. the `voice` or `video` mapping).
    settings: Mapping[str, Any]
    #: Named input files, e.g. {"portrait": ..., "audio": ...}.
    inputs: Mapping[str, Path]
    out_dir: Path
    #: Text input: the rendered prompt request (prompt), the script text (voice).
    text: str = ""
    device: str = "cpu"
    seed: int = 0
    #: Root of the weights folder (`checkpoints/`).
    checkpoints: Path = Path("checkpoints")
    #: Where in the manifest this step comes from, for messages ("characters.ceo", "videos[2]").
    label: str = ""


class ModelPool:
    """Keeps one warm copy of each model for a whole run, keyed by model id, device and dtype."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], Any] = {}
        #: How many times each key was loaded (tests and the report read it).
        self.loads: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}
        self._failed: dict[tuple[str, str, str], RenderError] = {}

    def get(self, model_id: str, device: str, dtype: str, loader: Callable[[], T]) -> T:
        """Return the pooled model, calling `loader()` only the first time this key is asked for.

        Thread-safe: threads asking for the same model wait for one load (parallel CPU steps with --jobs, the
        SadTalker preparation thread); different models load in parallel."""
        key = (model_id, device, dtype)
        with self._lock:
            if key in self._models:
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._models:
                    return self._models[key]
                if key in self._failed:  # its weights are missing or broken: said once, not loaded again per job
                    raise copy.copy(self._failed[key])
            logger.info("loading %s on %s (%s)", model_id, device, dtype)
            try:
                model = loader()
            except RenderError as exc:
                with self._lock:
                    self._failed[key] = copy.copy(exc)
                raise
            with self._lock:
                self._models[key] = model
                self.loads[key] = self.loads.get(key, 0) + 1
                del self._loading[key]
            return model

    def release(self, device_prefix: str = "") -> None:
        """Drop pooled models (those on devices starting with `device_prefix`) and free GPU caches."""
        with self._lock:
            for key in [k for k in self._models if k[1].startswith(device_prefix)]:
                del self._models[key]
            self._failed.clear()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def labelled(exc: RenderError, label: str) -> RenderError:
    """Prefix a stage error with where in the manifest it comes from (once)."""
    if label and label not in exc.message:
        exc.message = f"{label}: {exc.message}"
        exc.args = (exc.message,)
    return exc


def run_each(
    jobs: Sequence[StepJob],
    one: Callable[[StepJob], dict[str, Any]],
    done: Callable[[int, Any], None] | None = None,
) -> list[dict[str, Any] | RenderError]:
    """The stage contract for stages that handle jobs one at a time: whatever a job raises becomes that job's result
    (`job_error`), labelled with its place in the manifest, and the other jobs go on. `done(index, result)`: told
    as each job finishes (the runner commits it at once)."""
    results: list[dict[str, Any] | RenderError] = []
    for index, job in enumerate(jobs):
        try:
            results.append(one(job))
        except Exception as exc:  # noqa: BLE001 - this job fails, not its chunk
            results.append(job_error(job, exc))
        if done is not None:
            done(index, results[-1])
    return results


def job_error(job: StepJob, exc: Exception) -> RenderError:
    """The result of a job that raised `exc`: a RenderError as it is; a file error (a full disk, an unreadable
    file) named for the job; anything else through `as_render_error`. Labelled with the job's place."""
    if isinstance(exc, RenderError):
        logger.debug("%s failed: %s", job.label or job.key, exc)
        return labelled(exc, job.label)
    if isinstance(exc, OSError) and not _is_ffmpeg_error(exc):
        logger.debug("%s failed", job.label or job.key, exc_info=True)
        where = f" ({exc.filename})" if exc.filename else ""
        err = BackendError(f"{exc.strerror or exc}{where}", "check free disk space and permissions")
        err.__cause__ = exc  # the runner tells a full disk by its errno
        return labelled(err, job.label)
    logger.debug("%s failed", job.label or job.key, exc_info=True)  # the traceback with -vv only
    err = as_render_error(exc)
    if err is not exc:
        err.__cause__ = exc
    return labelled(err, job.label)


def _is_ffmpeg_error(exc: BaseException) -> bool:
    try:
        import av
    except ImportError:
        return False
    return isinstance(exc, av.FFmpegError)


def as_render_error(exc: BaseException) -> RenderError:
    """A RenderError for an exception a stage did not expect: a media library's refusal says what it was; anything
    else is an internal error, reported with its type (the run goes on with the other jobs)."""
    if isinstance(exc, RenderError):
        return exc
    if _is_ffmpeg_error(exc):
        return BackendError(
            f"FFmpeg: {media_error(exc)}", "check the input files; if they play elsewhere, please report this"
        )
    return BackendError(f"internal error: {type(exc).__name__}: {exc}", "please report this (run with -vv for details)")


def media_error(exc: BaseException) -> str:
    """An FFmpeg (PyAV) error in words: "Invalid data found when processing input", without the raw error number
    (`[Errno 1094995529]`) or the file name that the caller's message already gives."""
    return getattr(exc, "strerror", None) or str(exc)


def resolve_device(spec: str) -> str:
    """Turn `auto|cpu|cuda[:N]|mps` into a concrete torch device string (imports torch)."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {spec!r} was asked for but CUDA is not available", "use --device cpu or auto")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise BackendError("device 'mps' was asked for but Apple's MPS is not available", "use --device cpu or auto")
    return spec


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and os.replace, so readers never see half a file."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
