"""What a run leaves beside the videos: report.json (machines), report.html (people), state.json (next plan)."""

from __future__ import annotations

import html
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batch.cache import Cache, write_atomic
from batch.manifest import manifest_identity, thaw
from batch.plan import Plan, VideoPlan, load_state, state_path
from batch.run import RunResult

logger = logging.getLogger(__name__)


def write_state(plan: Plan, is_cached: Any) -> None:
    """Remember the fingerprint of every step now in the cache, so the next plan can say what changed."""
    path = state_path(plan.build_dir, plan.manifest)
    state = load_state(path)
    videos = state.get("videos") if isinstance(state.get("videos"), dict) else {}
    for vp in plan.videos:
        entry = videos.get(vp.video.id)
        entry = dict(entry) if isinstance(entry, dict) else {}
        for step in vp.steps:
            if is_cached(step.stage, step.key):
                entry[step.stage] = {"key": step.key, "fingerprint": thaw(step.fingerprint)}
        videos[vp.video.id] = entry
    data = {
        "format": 1,
        "manifest": manifest_identity(plan.manifest),
        "manifest_path": str(plan.manifest.path.resolve()),
        "videos": videos,
    }
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def write_report(plan: Plan, result: RunResult, retired: Iterable[str] = ()) -> Path:
    """report.json and report.html for the manifest's videos: this run's, and for the videos a `--only` run left out,
    their entries from the previous report (marked `earlier_run`), so the report always covers the whole manifest;
    those whose MP4 this build `retired` (they changed since) are marked stale."""
    out_dir = plan.build_dir / plan.manifest.name
    data = result.as_dict()
    ids = [v.id for v in plan.manifest.videos]
    ran = {v["id"] for v in data["videos"]}
    if set(ids) - ran:
        by_id = {v["id"]: v for v in data["videos"]}
        retired = set(retired)
        for old in _previous_videos(out_dir / "report.json"):
            if old["id"] in ids and old["id"] not in ran:
                entry = by_id[old["id"]] = {**old, "earlier_run": True}
                if old["id"] in retired:
                    entry.update(status="stale", output=None, error=STALE)
                kept = out_dir / LAST_GOOD / f"{old['id']}.mp4"
                entry["last_good"] = str(kept) if kept.is_file() else None
        data["videos"] = [by_id[i] for i in ids if i in by_id]
        data["only"] = sorted(ran)
        statuses = [*data["summary"], *(["stale"] if retired else [])]
        data["summary"] = {s: sum(v["status"] == s for v in data["videos"]) for s in statuses}
        data["warnings"] = sum(len(step.get("warnings", [])) for v in data["videos"] for step in v["steps"])
    write_atomic(out_dir / "report.json", json.dumps(data, indent=2, sort_keys=True).encode())
    thumbs = {}
    for v in data["videos"]:
        # The published file, for this run's videos and the earlier ones alike (never a path from the old report).
        output = out_dir / f"{v['id']}.mp4"
        kept = out_dir / LAST_GOOD / f"{v['id']}.mp4"
        thumb = None
        if v.get("output") and output.is_file():
            thumb = _thumbnail(output, out_dir / "thumbs" / f"{v['id']}.png")
        elif v.get("last_good") and kept.is_file():
            thumb = _thumbnail(kept, kept.with_suffix(".png"))
        if thumb is not None:
            thumbs[v["id"]] = thumb.relative_to(out_dir).as_posix()
    write_atomic(out_dir / "report.html", render_html(data, thumbs, out_dir).encode("utf-8"))
    return out_dir / "report.json"


def _previous_videos(path: Path) -> list[dict[str, Any]]:
    try:
        videos = json.loads(path.read_text(encoding="utf-8")).get("videos", [])
        return [v for v in videos if isinstance(v, dict) and isinstance(v.get("id"), str) and "steps" in v]
    except (OSError, ValueError, AttributeError):
        return []


def prune_removed(plan: Plan) -> list[str]:
    """Delete the published MP4s (and thumbnails) of videos that the manifest no longer has: the ids this tool
    published into build/<manifest>/ (state.json), not anything else there. Returns the ids removed."""
    path = state_path(plan.build_dir, plan.manifest)
    state = load_state(path)
    videos = state.get("videos")
    if not isinstance(videos, dict):
        return []
    gone = [i for i in plan.removed if i in videos]  # the planner's list, less what an earlier call removed
    out_dir = path.parent
    for vid in gone:
        keep = out_dir / LAST_GOOD
        for stale in (
            out_dir / f"{vid}.mp4",
            out_dir / "thumbs" / f"{vid}.png",
            keep / f"{vid}.mp4",
            keep / f"{vid}.png",
        ):
            if stale.parent in (out_dir, out_dir / "thumbs", keep) and stale.name.startswith(vid):
                stale.unlink(missing_ok=True)
        del videos[vid]
    if gone:
        write_atomic(path, json.dumps(state, indent=1, sort_keys=True).encode())
    return gone


#: Why a video left out of a `--only` run has no output now.
STALE = "changed since it was built, and not part of this run (--only): build it to update its MP4"
#: Where build/<manifest>/ keeps the last good MP4 of a video that is not built now, out of `build/<manifest>/*.mp4`.
LAST_GOOD = "last-good"


def retire_outdated(videos: Iterable[VideoPlan], cache: Cache, result: RunResult) -> list[str]:
    """Outputs never lie: every build/<manifest>/<id>.mp4 left after a build is the output of the manifest as it is
    now. The MP4 of a video that failed or was not run, or (outside a `--only` run) that changed since it was built,
    moves to build/<manifest>/last-good/<id>.mp4 with its thumbnail, replacing an older one there; a video built now
    drops its last-good copy. `videos`: the plans of every video of the manifest. Notes each of this run's videos'
    last-good file in `result`. Returns the ids whose MP4 moved."""
    ran = {v.id: v for v in result.videos}
    retired = []
    for vp in videos:
        vid, keep = vp.video.id, vp.output.parent / LAST_GOOD
        if vid in ran and ran[vid].output:  # built or cached now: the last good output is this one
            for old in (keep / f"{vid}.mp4", keep / f"{vid}.png"):
                old.unlink(missing_ok=True)
            continue
        final = vp.steps[-1]
        current = vid not in ran and vp.published and cache.is_cached(final.stage, final.key)
        if (vp.output.is_file() or vp.output.is_symlink()) and not current:
            keep.mkdir(exist_ok=True)
            os.replace(vp.output, keep / f"{vid}.mp4")
            thumb = vp.output.parent / "thumbs" / f"{vid}.png"
            if thumb.is_file():
                os.replace(thumb, keep / f"{vid}.png")
            retired.append(vid)
        if vid in ran and (keep / f"{vid}.mp4").is_file():
            ran[vid].last_good = str(keep / f"{vid}.mp4")
    return retired


def _thumbnail(video: Path, dest: Path) -> Path | None:
    """A frame from the middle of the video, refreshed when the video is newer (needs the renderer's decoder)."""
    try:
        if dest.is_file() and dest.stat().st_mtime_ns >= video.stat().st_mtime_ns:
            return dest
        from PIL import Image

        from renderer.encode import probe, read_frames

        middle = max(0, probe(video).frames // 2)
        frame = None
        for i, f in enumerate(read_frames(video)):
            frame = f
            if i >= middle:
                break
        if frame is None:
            return None
        img = Image.fromarray(frame)
        img.thumbnail((256, 256))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp.png")  # runs may overlap
        img.save(tmp)
        tmp.replace(dest)
        return dest
    except Exception as exc:  # noqa: BLE001 - a missing thumbnail must never fail a build
        logger.debug("no thumbnail for %s: %s", video, exc)
        return None


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} .sum span{margin-right:1.2em}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:.5em;text-align:left;vertical-align:top}
.built{color:#0a6} .cached{color:#357} .failed,.skipped,.stale{color:#c22} .warn{color:#a50} img{width:128px;border-radius:4px}
.steps{font-size:.85em;color:#555} .steps b{color:#222} code{font-size:.85em}
"""


def _artifact_html(artifact: str | None, out_dir: Path) -> str:
    """What a failed step made, beside its error: an image shown, another file linked (paths relative to the report,
    so the cache's failed/ folder is reached from build/<manifest>/)."""
    if not artifact:
        return ""
    href = html.escape(Path(os.path.relpath(artifact, out_dir)).as_posix())
    if Path(artifact).suffix.lower() in (".png", ".jpg", ".jpeg"):
        return f'<br><a href="{href}"><img src="{href}" alt="what the failed step made"></a>'
    return f' · <a href="{href}">what the failed step made</a>'


def render_html(data: dict[str, Any], thumbs: dict[str, str], out_dir: Path) -> str:
    e = html.escape
    rows = []
    for v in data["videos"]:
        thumb = f'<img src="{e(thumbs[v["id"]])}" alt="frame of {e(v["id"])}">' if v["id"] in thumbs else ""
        if v["output"]:
            link = f'<a href="{e(Path(v["output"]).name)}">{e(v["id"])}.mp4</a>'
        elif v.get("last_good"):  # an earlier build's output, out of the outputs' glob
            link = f'<a href="{LAST_GOOD}/{e(v["id"])}.mp4">last good MP4</a> (an earlier build)'
        else:
            link = ""
        steps = "<br>".join(
            f"<b>{e(s['stage'])}</b> {e(s['status'])} · {e(s['reason'])}"
            + (f" · {s['seconds']:.2f}s" if s["status"] in ("ran", "failed") else "")
            + (f" · <span class=failed>{e(s['error'])}</span>" if s.get("error") else "")
            + _artifact_html(s.get("artifact"), out_dir)
            + (f" · <i>{e(str(s['info'].get('prompt', '')))}</i>" if s.get("info", {}).get("prompt") else "")
            + "".join(f" · <span class=warn>warning: {e(text)}</span>" for text in s.get("warnings", []))
            for s in v["steps"]
        )
        err = f"<div class=failed>{e(v['error'])}</div>" if v.get("error") else ""
        if v.get("earlier_run"):
            err += "<div>(an earlier run: not in this run's --only)</div>"
        rows.append(
            f"<tr><td>{thumb}</td><td><b>{e(v['id'])}</b><br>{link}<br>renderer: {e(v['renderer'])}</td>"
            f"<td class={e(v['status'])}>{e(v['status'])}{err}</td><td class=steps>{steps}</td></tr>"
        )
    summary = " ".join(f"<span class={k}>{k}: {n}</span>" for k, n in data["summary"].items())
    if data.get("warnings"):
        summary += f" <span class=warn>warnings: {data['warnings']}</span>"
    if data.get("only"):
        summary += f" <span>this run: --only {e(' '.join(data['only']))}</span>"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Digital Human Batch — {e(Path(data['manifest']).name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(Path(data['manifest']).name)}</h1>"
        f"<p class=sum>{summary} <span>time: {data['seconds']:.1f}s</span> <span>device: {e(data['device'])}</span></p>"
        f"<table><tr><th></th><th>video</th><th>status</th><th>steps</th></tr>{''.join(rows)}</table></body></html>"
    )
