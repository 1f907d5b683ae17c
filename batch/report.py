"""What a run leaves beside the videos: report.json (machines), report.html (people), state.json (next plan)."""

from __future__ import annotations

import html
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from batch.cache import write_atomic
from batch.manifest import manifest_identity, thaw
from batch.plan import Plan, load_state, state_path
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


def write_report(plan: Plan, result: RunResult) -> Path:
    """report.json and report.html for the manifest's videos: this run's, and for the videos a `--only` run left out,
    their entries from the previous report (marked `earlier_run`), so the report always covers the whole manifest."""
    out_dir = plan.build_dir / plan.manifest.name
    data = result.as_dict()
    ids = [v.id for v in plan.manifest.videos]
    ran = {v["id"] for v in data["videos"]}
    if set(ids) - ran:
        by_id = {v["id"]: v for v in data["videos"]}
        for old in _previous_videos(out_dir / "report.json"):
            if old["id"] in ids and old["id"] not in ran:
                by_id[old["id"]] = {**old, "earlier_run": True}
        data["videos"] = [by_id[i] for i in ids if i in by_id]
        data["only"] = sorted(ran)
        data["summary"] = {s: sum(v["status"] == s for v in data["videos"]) for s in data["summary"]}
        data["warnings"] = sum(len(step.get("warnings", [])) for v in data["videos"] for step in v["steps"])
    write_atomic(out_dir / "report.json", json.dumps(data, indent=2, sort_keys=True).encode())
    thumbs = {}
    for v in data["videos"]:
        # The published file, for this run's videos and the earlier ones alike (never a path from the old report).
        output = out_dir / f"{v['id']}.mp4"
        if v.get("output") and output.is_file():
            thumb = _thumbnail(output, out_dir / "thumbs" / f"{v['id']}.png")
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
        for stale in (out_dir / f"{vid}.mp4", out_dir / "thumbs" / f"{vid}.png"):
            if stale.parent in (out_dir, out_dir / "thumbs") and stale.name.startswith(vid):
                stale.unlink(missing_ok=True)
        del videos[vid]
    if gone:
        write_atomic(path, json.dumps(state, indent=1, sort_keys=True).encode())
    return gone


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
.built{color:#0a6} .cached{color:#357} .failed,.skipped{color:#c22} .warn{color:#a50} img{width:128px;border-radius:4px}
.steps{font-size:.85em;color:#555} .steps b{color:#222} code{font-size:.85em}
.script{color:#222;margin:.3em 0} .script ol{margin:.2em 0;padding-left:1.4em} .cite{font-family:monospace;margin-left:.3em}
"""


def _written_script(info: Any, root: Path, out_dir: Path) -> str:
    """A written script, sentence by sentence, each with links to the lines (or PDF page) of the passages it cites,
    relative to the report, so a reviewer can check every sentence against its source."""
    if not isinstance(info, dict) or not isinstance(info.get("sentences"), list):
        return ""
    e = html.escape
    items = []
    for sentence in info["sentences"]:
        links = []
        for cite in sentence.get("cites", []) if isinstance(sentence, dict) else []:
            target = os.path.relpath(root / str(cite.get("file", "")), out_dir).replace(os.sep, "/")
            href = e(target + str(cite.get("anchor", "")))
            links.append(f'<a class=cite href="{href}">{e(str(cite.get("where", "")))}</a>')
        text = e(str(sentence.get("text", ""))) if isinstance(sentence, dict) else ""
        items.append(f"<li>{text} {' '.join(links) or '<span class=warn>cites nothing</span>'}</li>")
    return f"<div class=script>script ({e(str(info.get('words')))} words):<ol>{''.join(items)}</ol></div>"


def render_html(data: dict[str, Any], thumbs: dict[str, str], out_dir: Path) -> str:
    e = html.escape
    rows = []
    for v in data["videos"]:
        thumb = f'<img src="{e(thumbs[v["id"]])}" alt="frame of {e(v["id"])}">' if v["id"] in thumbs else ""
        link = f'<a href="{e(Path(v["output"]).name)}">{e(v["id"])}.mp4</a>' if v["output"] else ""
        steps = "<br>".join(
            f"<b>{e(s['stage'])}</b> {e(s['status'])} · {e(s['reason'])}"
            + (f" · {s['seconds']:.2f}s" if s["status"] in ("ran", "failed") else "")
            + (f" · <span class=failed>{e(s['error'])}</span>" if s.get("error") else "")
            + (f" · <i>{e(str(s['info'].get('prompt', '')))}</i>" if s.get("info", {}).get("prompt") else "")
            + "".join(f" · <span class=warn>warning: {e(text)}</span>" for text in s.get("warnings", []))
            + (_written_script(s.get("info"), Path(data["manifest"]).parent, out_dir) if s["stage"] == "write" else "")
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
