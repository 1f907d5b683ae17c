"""What a run leaves beside the videos: report.json (machines), report.html (people), state.json (next plan)."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batch.cache import Cache, tmp_sibling, write_atomic, write_if_changed
from batch.errors import UsageError
from batch.manifest import thaw
from batch.plan import Plan, VideoPlan, load_state, ownership, state_path
from batch.run import RunResult
from batch.shard import Shard, shard_file

logger = logging.getLogger(__name__)


def write_state(plan: Plan, is_cached: Any, shard: Shard | None = None) -> None:
    """Remember the fingerprint of every step now in the cache, so the next plan can say what changed. A shard also
    writes its videos' part alone (state.shard-I-of-N.json), which `dhbatch report merge` folds into state.json on
    the machine that gathers the shards' folders."""
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
    _write_state(path, plan, videos)
    if shard is not None:
        mine = {vp.video.id: videos[vp.video.id] for vp in plan.videos}
        _write_state(path.with_name(shard_file(path.name, shard)), plan, mine)


def _write_state(path: Path, plan: Plan, videos: dict[str, Any]) -> None:
    data = {"format": 1, **ownership(plan.manifest), "videos": videos}
    write_if_changed(path, json.dumps(data, indent=1, sort_keys=True).encode())


def write_report(plan: Plan, result: RunResult, shard: Shard | None = None, retired: Iterable[str] = ()) -> Path:
    """report.json and report.html for the manifest's videos: this run's, and for the videos a `--only` run left out,
    their entries from the previous report (marked `earlier_run`), so the report always covers the whole manifest;
    those whose MP4 this build `retired` (they changed since) are marked stale. A shard's report
    (report.shard-I-of-N.json) covers its own videos, each with its shard and its place in the manifest, for `dhbatch
    report merge`."""
    out_dir = plan.build_dir / plan.manifest.name
    data = result.as_dict()
    ids = [v.id for v in plan.manifest.videos]
    ran = {v["id"] for v in data["videos"]}
    if shard is not None:
        index = {vid: i for i, vid in enumerate(ids)}
        data["shard"] = str(shard)
        for v in data["videos"]:
            v.update(shard=str(shard), index=index[v["id"]])
    elif set(ids) - ran:
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
    return _write_report(out_dir, shard_file("report.json", shard), data)


def _write_report(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    """`name` (report.json or a shard's) and the HTML page beside it, with a thumbnail of each published video."""
    write_atomic(out_dir / name, json.dumps(data, indent=2, sort_keys=True).encode())
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
    html_path = out_dir / name.removesuffix(".json")
    write_atomic(html_path.with_name(html_path.name + ".html"), render_html(data, thumbs, out_dir).encode("utf-8"))
    return out_dir / name


@dataclasses.dataclass(frozen=True)
class Merged:
    """What `merge_reports` made of a folder of shard reports."""

    report: Path
    count: int
    found: tuple[int, ...]
    missing: tuple[int, ...]
    #: Shard reports of another split (an older --shard I/M in the same folder), left out.
    ignored: tuple[str, ...]
    summary: dict[str, int]


_SHARD_REPORT = re.compile(r"^report\.shard-(\d+)-of-(\d+)\.json$")


def merge_reports(out_dir: Path) -> Merged:
    """Combine build/<manifest>/report.shard-I-of-N.json (the folders of N CI jobs gathered into one) into report.json
    and report.html, each video with its shard, and their state.shard-I-of-N.json into state.json, so `plan` sees
    every shard's work. Where shard reports of several splits lie, the newest split is merged."""
    found: dict[int, dict[int, Path]] = {}
    for path in out_dir.glob("report.shard-*-of-*.json") if out_dir.is_dir() else ():
        if match := _SHARD_REPORT.match(path.name):
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if not found:
        raise UsageError(
            f"no shard reports (report.shard-I-of-N.json) in {out_dir}",
            "give the folder the shard builds wrote (build/<manifest>/), with every shard's files gathered into it",
        )
    count = max(found, key=lambda n: max(p.stat().st_mtime_ns for p in found[n].values()))
    ignored = tuple(sorted(p.name for n, paths in found.items() if n != count for p in paths.values()))
    shards = dict(sorted(found[count].items()))
    reports = []
    for index, path in shards.items():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
                raise ValueError("not a shard report")
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read this shard report ({exc})", "build that shard again") from exc
        reports.append((index, data))
    videos = sorted(
        (v for _, data in reports for v in data["videos"]), key=lambda v: (v.get("index", 1 << 60), v["id"])
    )
    statuses = ("built", "cached", "failed", "skipped")
    merged = {
        "manifest": reports[0][1].get("manifest", ""),
        "seconds": max(float(data.get("seconds", 0.0)) for _, data in reports),  # the fleet's wall time
        "device": ", ".join(dict.fromkeys(str(data.get("device", "")) for _, data in reports)),
        "model_loads": {},
        "summary": {s: sum(v.get("status") == s for v in videos) for s in statuses},
        "warnings": sum(int(data.get("warnings", 0)) for _, data in reports),
        "shards": [
            {"shard": f"{i}/{count}", "seconds": data.get("seconds"), "device": data.get("device")}
            for i, data in reports
        ],
        "missing_shards": [f"{i}/{count}" for i in range(1, count + 1) if i not in shards],
        "videos": videos,
    }
    for _, data in reports:
        for name, n in (data.get("model_loads") or {}).items():
            merged["model_loads"][name] = merged["model_loads"].get(name, 0) + n
    _merge_states(out_dir, count)
    report = _write_report(out_dir, "report.json", merged)
    return Merged(
        report,
        count,
        tuple(shards),
        tuple(i for i in range(1, count + 1) if i not in shards),
        ignored,
        merged["summary"],
    )


def _merge_states(out_dir: Path, count: int) -> None:
    """Fold the shards' state.shard-I-of-N.json into state.json (a shard's entry for its videos wins)."""
    path = out_dir / "state.json"
    state = load_state(path)
    videos = state.get("videos") if isinstance(state.get("videos"), dict) else {}
    changed = False
    for index in range(1, count + 1):
        part = load_state(out_dir / f"state.shard-{index}-of-{count}.json")
        if isinstance(part.get("videos"), dict):
            videos.update(part["videos"])
            state.setdefault("format", part.get("format", 1))
            for key in ("manifest", "manifest_path"):
                state.setdefault(key, part.get(key))
            changed = True
    if changed:
        state["videos"] = videos
        write_atomic(path, json.dumps(state, indent=1, sort_keys=True).encode())


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

        from renderer.encode import middle_frame

        frame = middle_frame(video)
        if frame is None:
            return None
        img = Image.fromarray(frame)
        img.thumbnail((256, 256))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dest)  # runs may overlap; a killed run's is swept by the next (sweep_stale_tmp)
        try:
            img.save(tmp, format="PNG", compress_level=1)  # a fast zlib level: a small image, written per build
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
    except Exception as exc:  # noqa: BLE001 - a missing thumbnail must never fail a build
        logger.debug("no thumbnail for %s: %s", video, exc)
        return None


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} .sum span{margin-right:1.2em}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:.5em;text-align:left;vertical-align:top}
.built{color:#0a6} .cached{color:#357} .failed,.skipped,.stale{color:#c22} .warn{color:#a50} img{width:128px;border-radius:4px} img.old{opacity:.45}
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


def _placed_html(step: dict[str, Any]) -> str:
    """Where a cluster built a step, and how long it waited for a worker."""
    e = html.escape
    return f" · on {e(step['worker'])} ({e(step.get('node', ''))}, {e(step.get('device', ''))}), queued {step.get('queued', 0):.1f}s"


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
        if thumb and not v["output"]:  # the last good output's frame: an earlier build, not this one
            thumb = thumb.replace("<img ", '<img class=old title="the last good MP4, from an earlier build" ')
        if v["output"]:
            link = f'<a href="{e(Path(v["output"]).name)}">{e(v["id"])}.mp4</a>'
        elif v.get("last_good"):  # an earlier build's output, out of the outputs' glob
            link = f'<a href="{LAST_GOOD}/{e(v["id"])}.mp4">last good MP4</a> (an earlier build)'
        else:
            link = ""
        steps = "<br>".join(
            f"<b>{e(s['stage'])}</b> {e(s['status'])} · {e(s['reason'])}"
            + (f" · {s['seconds']:.2f}s" if s["status"] in ("ran", "failed") else "")
            + (_placed_html(s) if s.get("worker") not in (None, "", "local") else "")
            + (f" · <span class=failed>{e(s['error'])}</span>" if s.get("error") else "")
            + _artifact_html(s.get("artifact"), out_dir)
            + (f" · <i>{e(str(s['info'].get('prompt', '')))}</i>" if s.get("info", {}).get("prompt") else "")
            + "".join(f" · <span class=warn>warning: {e(text)}</span>" for text in s.get("warnings", []))
            + (_written_script(s.get("info"), Path(data["manifest"]).parent, out_dir) if s["stage"] == "write" else "")
            for s in v["steps"]
        )
        err = f"<div class=failed>{e(v['error'])}</div>" if v.get("error") else ""
        if v.get("earlier_run"):
            err += "<div>(an earlier run: not in this run's --only)</div>"
        if v.get("shard"):
            err += f"<div>shard {e(v['shard'])}</div>"
        rows.append(
            f"<tr><td>{thumb}</td><td><b>{e(v['id'])}</b><br>{link}<br>renderer: {e(v['renderer'])}</td>"
            f"<td class={e(v['status'])}>{e(v['status'])}{err}</td><td class=steps>{steps}</td></tr>"
        )
    summary = " ".join(f"<span class={k}>{k}: {n}</span>" for k, n in data["summary"].items())
    if data.get("warnings"):
        summary += f" <span class=warn>warnings: {data['warnings']}</span>"
    if data.get("only"):
        summary += f" <span>this run: --only {e(' '.join(data['only']))}</span>"
    if data.get("shards"):
        summary += f" <span>shards: {len(data['shards'])}</span>"
    if data.get("missing_shards"):
        summary += f" <span class=failed>missing shards: {e(', '.join(data['missing_shards']))}</span>"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Digital Human Batch — {e(Path(data['manifest']).name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(Path(data['manifest']).name)}</h1>"
        f"<p class=sum>{summary} <span>time: {data['seconds']:.1f}s</span> <span>device: {e(data['device'])}</span></p>"
        f"<table><tr><th></th><th>video</th><th>status</th><th>steps</th></tr>{''.join(rows)}</table></body></html>"
    )
