"""API: the project's manifests, their videos, and what the new-video form offers (characters, voices)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from batch.studio import voice_choices
from batch.web import catalog
from batch.web.models import ManifestOut, VideoOut
from batch.web.state import State

router = APIRouter(prefix="/api", tags=["manifests"])


@router.get("/manifests", response_model=list[ManifestOut])
def list_manifests(state: State) -> list[dict[str, Any]]:
    """Every manifest in the project's manifests/ folder, with its last build (counts, time, videos)."""
    cfg = state.config
    return [catalog.overview(cfg.build_dir, name, path) for name, path in state.studio.manifest_paths().items()]


@router.get("/manifests/{name}/videos", response_model=list[VideoOut])
def list_videos(name: str, state: State) -> list[dict[str, Any]]:
    """A manifest's videos, failures first: status, renderer, warnings, each step's reason, output URLs."""
    path = state.manifest_path(name)
    if path is None:
        raise HTTPException(404, f"no manifest named {name!r}")
    return catalog.gallery(state.config.build_dir, state.config.checkpoints, name, path)["gallery"]


@router.get("/characters")
def list_characters(state: State) -> list[dict[str, str]]:
    """Characters a new video can pick (`character.pick`): "manifest:character"."""
    return [{"pick": c.value, "name": c.name, "kind": c.kind} for c in state.studio.characters()]


@router.get("/voices")
def list_voices(state: State) -> list[dict[str, str]]:
    """Voices a new video can use (`voice.engine`, `voice.model`)."""
    return [{"engine": e, "model": m} for e, m in voice_choices(state.config.checkpoints)]
