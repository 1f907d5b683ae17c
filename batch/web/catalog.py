"""What the pages and the API show of a project: its manifests, each with its last build (report.json, as `dhbatch
build` wrote it) and what the next build would do (the plan, as `dhbatch plan` makes it)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

from batch.cache import Cache
from batch.errors import DHBatchError, ManifestError
from batch.manifest import Manifest, load_manifest
from batch.plan import plan_manifest
from batch.written import plan_scripts

logger = logging.getLogger(__name__)

#: Order of a gallery: failures first.
_RANK = {"failed": 0, "skipped": 1, "not built": 2, "built": 3, "cached": 3}


def when(seconds: float | None) -> str | None:
    """A time as the pages show it (UTC, to the second)."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def file_url(name: str, video_id: str, kind: str, stamp: float) -> str:
    """URL of a published video (`mp4`) or its thumbnail (`png`); the stamp makes a rebuilt file load anew."""
    folder = "" if kind == "mp4" else "thumbs/"
    return f"/files/{name}/{folder}{video_id}.{kind}?v={int(stamp)}"


def video_view(build_dir: Path, name: str, v: Any) -> dict[str, Any] | None:
    """One video of a build's JSON (report.json, or `build --json`) as the pages and the API show it (VideoOut)."""
    if not isinstance(v, dict) or not isinstance(v.get("id"), str):
        return None
    vid = v["id"]
    mp4, thumb = build_dir / name / f"{vid}.mp4", build_dir / name / "thumbs" / f"{vid}.png"
    published = bool(v.get("output")) and mp4.is_file()
    steps = [s for s in v.get("steps", []) if isinstance(s, dict)]
    return {
        "id": vid,
        "status": str(v.get("status", "")),
        "renderer": str(v.get("renderer", "")),
        "error": v.get("error"),
        "seconds": v.get("seconds"),
        "earlier_run": bool(v.get("earlier_run")),
        "warnings": [f"{s.get('stage')}: {w}" for s in steps for w in s.get("warnings", []) or []],
        "steps": [
            {
                "stage": str(s.get("stage", "")),
                "status": str(s.get("status", "")),
                "reason": str(s.get("reason", "")),
                "seconds": s.get("seconds"),
                "error": s.get("error"),
                "artifact_url": f"/files/{name}/failed/{vid}/{s.get('stage')}" if s.get("artifact") else None,
                "artifact_kind": "image" if str(s.get("artifact", "")).endswith((".png", ".jpg")) else "file",
            }
            for s in steps
        ],
        "video_url": file_url(name, vid, "mp4", mp4.stat().st_mtime) if published else None,
        "thumbnail_url": file_url(name, vid, "png", thumb.stat().st_mtime) if published and thumb.is_file() else None,
    }


def last_build(build_dir: Path, name: str) -> dict[str, Any] | None:
    """The manifest's last build from build/<name>/report.json, None when it was never built."""
    out_dir = build_dir / name
    report = out_dir / "report.json"
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        stamp = report.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
        return None
    videos = [view for v in data["videos"] if (view := video_view(build_dir, name, v)) is not None]
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    return {
        "time": when(stamp),
        "finished": stamp,
        "seconds": data.get("seconds"),
        "device": data.get("device"),
        "summary": {k: int(n) for k, n in summary.items() if isinstance(n, int)},
        "warnings": data.get("warnings", 0),
        "videos": videos,
    }


def failed_artifact(build_dir: Path, name: str, video: str, stage: str) -> Path | None:
    """What a failed step of the manifest's last build left for people to see (the portrait that failed the face
    check), as its report names it; only a file inside the build folder's cache."""
    try:
        data = json.loads((build_dir / name / "report.json").read_text(encoding="utf-8"))
        (v,) = [v for v in data["videos"] if v.get("id") == video]
        (artifact,) = [s["artifact"] for s in v["steps"] if s.get("stage") == stage and s.get("artifact")]
        path = Path(artifact).resolve()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    cache = (build_dir / "cache").resolve()
    return path if path.is_relative_to(cache) and path.is_file() else None


def overview(build_dir: Path, name: str, path: Path) -> dict[str, Any]:
    """A manifest for the project page: its videos' count (or its problems) and its last build."""
    manifest, problems = _load(path)
    return {
        "name": name,
        "file": f"manifests/{path.name}",
        "videos": len(manifest.videos) if manifest is not None else None,
        "problems": problems,
        "last_build": last_build(build_dir, name),
    }


def gallery(build_dir: Path, checkpoints: Path, name: str, path: Path) -> dict[str, Any]:
    """Every video of the manifest: its last build (failures first) and what the next build would do and why."""
    manifest, problems = _load(path)
    info = {**overview(build_dir, name, path), "problems": problems}
    built = {v["id"]: v for v in (info["last_build"] or {}).get("videos", [])}
    plans: dict[str, Any] = {}
    scripts: dict[str, dict[str, Any] | None] = {}
    if manifest is not None:
        try:
            cache = Cache(build_dir / "cache")
            plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints)
            plans = {vp.video.id: vp for vp in plan.videos}
            scripts = plan_scripts(plan, cache.record)
        except DHBatchError as exc:
            info["problems"] = [*problems, str(exc)]
    ids = [v.id for v in manifest.videos] if manifest is not None else list(built)
    videos = []
    for vid in ids:
        v = dict(built.get(vid) or {"id": vid, "status": "not built", "steps": [], "warnings": [], "error": None})
        vp = plans.get(vid)
        if vp is not None:
            v["renderer"] = v.get("renderer") or vp.renderer
            v["stale"] = vp.stale
            v["next"] = [{"stage": d.stage, "cached": d.cached, "reason": d.reason} for d in vp.decisions]
            v["says"] = _says(vp)
        if vid in scripts:  # written from documents: the script the cache holds, with each sentence's sources
            written = scripts[vid]
            v["script"] = (
                {"text": written.get("script", ""), "sentences": written.get("sentences", [])} if written else None
            )
            v["says"] = written.get("script", "") if written else "(written from its documents by the next build)"
        videos.append(v)
    info["gallery"] = failures_first(videos)
    return info


def failures_first(videos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed videos, then skipped, not built, and built ones; in their given order within each."""
    return sorted(videos, key=lambda v: _RANK.get(v["status"], 2))


def _says(vp: Any) -> str:
    """What the video says: its script rendered for it, or which recording it plays."""
    for step in vp.steps:
        if step.stage == "voice":
            return step.text
        if step.stage == "audio":
            return f"(recording {step.inputs[0].path.name})"
    return ""


def _load(path: Path) -> tuple[Manifest | None, list[str]]:
    try:
        return load_manifest(path), []
    except ManifestError as exc:
        return None, [str(p) for p in exc.problems]
    except DHBatchError as exc:
        return None, [str(exc)]
