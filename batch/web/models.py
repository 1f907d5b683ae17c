"""The API's request and response bodies (pydantic; they make the OpenAPI document at /api/openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batch.errors import DHBatchError, ManifestError
from batch.studio import StudioError

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CharacterIn(Strict):
    """Exactly one of: `pick` (a character of a project manifest, "manifest:character"), `portrait` (a PNG or JPEG,
    base64), or `description` (drawn by the LLM and Stable Diffusion)."""

    pick: str | None = Field(None, examples=["demo:eileen"])
    portrait: str | None = Field(None, description="base64 of a PNG or JPEG file")
    portrait_filename: str = "portrait"
    description: str | None = None
    name: str | None = None
    seed: int = Field(0, ge=0, le=4294967295)


class ScriptIn(Strict):
    """Exactly one of: `text` (what the character says), or `recording` (an audio file, base64)."""

    text: str | None = Field(None, max_length=20_000)
    recording: str | None = Field(None, description="base64 of a wav, mp3, flac, ogg, m4a, opus or webm file")
    recording_filename: str = "recording.wav"


class VoiceIn(Strict):
    engine: Literal["piper", "gtts"] = "piper"
    model: str | None = None
    rate: float | None = Field(None, gt=0.2, le=4)


class VideoIn(Strict):
    """One video described inline, as the page's form does: written into manifests/studio.yaml, then built."""

    id: str | None = Field(None, description="video id (default: made from the character's name)")
    character: CharacterIn
    script: ScriptIn
    voice: VoiceIn | None = None


class JobIn(Strict):
    """A build: a project manifest (optionally `only` some videos, `force` some stages), or one inline `video`."""

    manifest: str | None = Field(None, description="a manifest's name: the file name in manifests/ without .yaml")
    only: list[str] = Field(default_factory=list, description="video ids (default: all)")
    force: list[str] = Field(default_factory=list, description="stages to rebuild even if cached, or 'all'")
    video: VideoIn | None = None
    webhook: str | None = Field(None, description="called with the job (JSON POST) when it ends; trusted hosts only")

    @model_validator(mode="after")
    def _one_kind(self) -> JobIn:
        if (self.manifest is None) == (self.video is None):
            raise ValueError("give either `manifest` or `video`")
        if self.video is not None and (self.only or self.force):
            raise ValueError("`only` and `force` go with `manifest`")
        return self


class StageProgress(BaseModel):
    stage: str
    done: int
    total: int


class StepOut(BaseModel):
    stage: str
    status: str
    reason: str
    seconds: float | None = None
    error: str | None = None
    artifact_url: str | None = Field(None, description="what a failed step made (a drawn portrait), to look at")


class CiteOut(BaseModel):
    file: str
    where: str = Field(description="file:lines (or file page N) of the passage")
    anchor: str | None = None


class SentenceOut(BaseModel):
    text: str
    cites: list[CiteOut] = []


class ScriptOut(BaseModel):
    text: str
    sentences: list[SentenceOut]


class VideoOut(BaseModel):
    id: str
    status: str
    renderer: str = ""
    says: str = Field("", description="what the video says: its script, or which recording it plays")
    script: ScriptOut | None = Field(
        None, description="a script written from documents: each sentence with the passages it cites"
    )
    error: str | None = None
    warnings: list[str] = []
    steps: list[StepOut] = []
    video_url: str | None = None
    thumbnail_url: str | None = None


class JobOut(BaseModel):
    id: int
    status: JobStatus
    manifest: str
    only: list[str]
    force: list[str]
    position: int | None = Field(None, description="place in the line while queued (1: next)")
    created: float
    started: float | None
    finished: float | None
    exit_code: int | None
    error: str | None
    progress: list[StageProgress]
    videos: list[VideoOut]
    url: str
    log_url: str
    webhook: str | None
    webhook_status: str | None
    rerun_of: int | None


class LastBuild(BaseModel):
    time: str | None
    finished: float
    seconds: float | None
    device: str | None
    summary: dict[str, int]
    warnings: int
    videos: list[VideoOut]


class ManifestOut(BaseModel):
    name: str
    file: str
    videos: int | None = Field(None, description="how many videos it makes (None: it is invalid)")
    problems: list[str]
    last_build: LastBuild | None


class ErrorOut(BaseModel):
    error: str
    hint: str = ""
    problems: list[dict[str, Any]] = Field(default_factory=list, description="located manifest problems")


def error_body(exc: DHBatchError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": exc.message, "hint": exc.hint}
    if isinstance(exc, ManifestError):
        body["error"] = f"invalid manifest ({len(exc.problems)} problem{'s' * (len(exc.problems) != 1)})"
        body["problems"] = [
            {"file": p.file, "line": p.line, "column": p.column, "path": p.path, "message": p.message, "text": str(p)}
            for p in exc.problems
        ]
    if isinstance(exc, StudioError):
        body["problems"] = [{"field": field, "message": message} for field, message in exc.problems]
    return body
