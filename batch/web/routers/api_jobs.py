"""API: builds. POST a manifest (or one video inline) → a job id; follow it, cancel it, run it again."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from batch.studio import NewVideo, StudioError, Upload
from batch.web.jobs import Job
from batch.web.models import ErrorOut, JobIn, JobOut, VideoIn
from batch.web.state import State, StudioState

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
ERRORS = {422: {"model": ErrorOut, "description": "bad request: the problems, located"}}


def _job(state: StudioState, job_id: int) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.post("", response_model=JobOut, status_code=201, responses=ERRORS)
def create_job(body: JobIn, state: State) -> dict[str, Any]:
    """Queue a build of a manifest, or write one video into manifests/studio.yaml and queue its build."""
    if body.video is not None:
        job = state.submit_video(new_video(body.video), body.webhook)
    else:
        job = state.submit_manifest(body.manifest or "", body.only, body.force, body.webhook)
    return state.describe(job)


@router.get("", response_model=list[JobOut])
def list_jobs(state: State) -> list[dict[str, Any]]:
    """The latest jobs, newest first."""
    return [state.describe(j) for j in state.store.list()]


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
def get_job(job_id: int, state: State) -> dict[str, Any]:
    """A job: status, place in line, per-stage progress, and once ended its videos with their output URLs."""
    return state.describe(_job(state, job_id))


@router.delete("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
def cancel_job(job_id: int, state: State) -> dict[str, Any]:
    """Cancel a job: a queued one at once, a running one when its build has stopped (nothing partial is kept)."""
    _job(state, job_id)
    job = state.queue.cancel(job_id)
    assert job is not None
    return state.describe(job)


@router.post("/{job_id}/rerun", response_model=JobOut, status_code=201, responses=ERRORS)
def rerun_job(job_id: int, state: State) -> dict[str, Any]:
    """Queue the same build again."""
    return state.describe(state.rerun(_job(state, job_id)))


@router.get("/{job_id}/log", response_class=PlainTextResponse)
def job_log(job_id: int, state: State) -> str:
    """The build's log (the end of it)."""
    _job(state, job_id)
    return state.queue.log(job_id)


def new_video(video: VideoIn) -> NewVideo:
    """The API's inline video as the studio's request (uploads decoded from base64)."""
    c, s = video.character, video.script
    return NewVideo(
        id=video.id or "",
        name=c.name or "",
        pick=c.pick or "",
        portrait=Upload(c.portrait_filename, _b64("character.portrait", c.portrait)) if c.portrait else None,
        description=c.description or "",
        seed=c.seed,
        text=s.text or "",
        recording=Upload(s.recording_filename, _b64("script.recording", s.recording)) if s.recording else None,
        voice=video.voice.model_dump(exclude_none=True) if video.voice else {},
    )


def _b64(field: str, data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StudioError([(field, "not valid base64")]) from exc
