"""Shards: one manifest's videos split over N CI jobs (`--shard I/N`, 1-based like Playwright's).

Every job plans the same manifest on its own, so the split must be a pure function of the manifest: videos sorted by
expected cost (longest first; ties broken by a stable hash of the id, never Python's salted `hash`), each given to
the shard with the least expected cost so far (longest-processing-time first). Shards then finish together and, for
the same manifest, every machine computes the same partition. Adding a video may move others to another shard; with
a remote cache (batch/remote.py) a moved video is a download, not a rebuild.

Expected cost is seconds of speech: the WAV header of a recorded script, or the script's text length at a speaking
rate. Rendering time grows with it; the per-video work that does not (muxing, loading a portrait) is a constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import re
import wave
from collections.abc import Iterable
from pathlib import Path

from batch.errors import UsageError
from batch.manifest import Manifest, Script, Video

#: Characters of script text per second of speech (English TTS at its default rate speaks about 14-16).
CHARS_PER_SECOND = 15.0
#: Seconds of work per video that do not grow with its speech (mux, portrait loading, process overhead).
VIDEO_OVERHEAD_S = 2.0
#: Bytes per second of a 16 kHz mono 16-bit recording: the guess for an audio file whose header is not a WAV's.
_BYTES_PER_SECOND = 16_000 * 2


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """How the shard names its files: report.<tag>.json."""
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """`"2/5"` → Shard(2, 5); anything else is a usage error saying what is expected."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard {text!r}: expected I/N with 1 <= I <= N", "e.g. --shard 1/4 ... --shard 4/4")
    return Shard(int(match[1]), int(match[2]))


def shard_file(name: str, shard: Shard | None) -> str:
    """`report.json` → `report.shard-1-of-3.json` (unchanged without a shard)."""
    if shard is None:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.{shard.tag}{dot}{suffix}"


def expected_cost(script: Script) -> float:
    """Seconds of work a video of this script is expected to take, up to a constant factor."""
    if script.audio is not None:
        return VIDEO_OVERHEAD_S + _audio_seconds(script.audio)
    if script.brief is not None:  # written from documents: about `words` words of about 6 characters
        return VIDEO_OVERHEAD_S + script.words * 6 / CHARS_PER_SECOND
    return VIDEO_OVERHEAD_S + len(script.text or "") / CHARS_PER_SECOND


def _audio_seconds(path: Path) -> float:
    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes() / max(1, wav.getframerate())
    except (OSError, EOFError, wave.Error):
        try:
            return path.stat().st_size / _BYTES_PER_SECOND  # not a WAV (mp3, flac...): a guess from its size
        except OSError:
            return 0.0


def _stable_hash(video_id: str) -> int:
    return int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:8], "big")


def assign(manifest: Manifest, count: int) -> dict[str, int]:
    """{video id: shard index (1-based)} for every video of the manifest, balanced by expected cost."""
    costs = {sid: expected_cost(script) for sid, script in manifest.scripts.items()}
    order = sorted(manifest.videos, key=lambda v: (-costs[v.script], _stable_hash(v.id), v.id))
    loads = [(0.0, i) for i in range(1, count + 1)]  # a heap of (expected cost so far, shard index)
    out: dict[str, int] = {}
    for video in order:
        load, index = heapq.heappop(loads)
        out[video.id] = index
        heapq.heappush(loads, (load + costs[video.script], index))
    return out


def shard_videos(manifest: Manifest, videos: Iterable[Video], shard: Shard | None) -> tuple[Video, ...]:
    """The videos among `videos` that belong to `shard` (all of them without a shard), in manifest order."""
    videos = tuple(videos)
    if shard is None:
        return videos
    owner = assign(manifest, shard.count)
    return tuple(v for v in videos if owner[v.id] == shard.index)
