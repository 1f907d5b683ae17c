"""Published videos, their thumbnails, and the page's own script and style sheet. A request names ids, never paths:
each part is checked against the id rule and the file must lie in build/<manifest>/."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from batch.studio import ID_RULE
from batch.web import catalog
from batch.web.state import State, StudioState

router = APIRouter(tags=["files"])
STATIC = Path(__file__).resolve().parent.parent / "static"
#: Every file of static/ that is served, with its type.
STATIC_FILES = {"studio.js": "text/javascript", "studio.css": "text/css"}


def _published(state: StudioState, manifest: str, video: str, kind: str) -> Path:
    if not (ID_RULE.fullmatch(manifest) and ID_RULE.fullmatch(video)):
        raise HTTPException(404, "no such file")
    root = state.config.build_dir.resolve() / manifest
    path = (root / ("thumbs" if kind == "png" else "") / f"{video}.{kind}").resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(404, "no such file")
    return path


@router.get("/files/{manifest}/{video}.mp4")
def video_file(manifest: str, video: str, state: State) -> FileResponse:
    """A published video (Range requests work, for the page's player)."""
    return FileResponse(_published(state, manifest, video, "mp4"), media_type="video/mp4")


@router.get("/files/{manifest}/thumbs/{video}.png")
def thumbnail(manifest: str, video: str, state: State) -> FileResponse:
    """A frame from the middle of a published video."""
    return FileResponse(_published(state, manifest, video, "png"), media_type="image/png")


@router.get("/files/{manifest}/failed/{video}/{stage}")
def failed_artifact(manifest: str, video: str, stage: str, state: State) -> FileResponse:
    """What a failed step left for people to see (e.g. a drawn portrait that failed the face check)."""
    path = catalog.failed_artifact(state.config.build_dir, manifest, video, stage)
    if path is None:
        raise HTTPException(404, "no such file")
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
    return FileResponse(path, media_type=kinds.get(path.suffix.lower(), "application/octet-stream"))


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})
