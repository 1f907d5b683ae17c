"""A no-op plan reads no step record: an entry found sound before is a hit while its record and outputs are unchanged
(the digest memo's inode, size and mtime). Anything that changes them sends the check back to the record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests._fake_stages import make_registry
from tests._project import build, plan, write_project


def _final(root: Path) -> tuple[Path, str]:
    p, cache = plan(root)
    step = next(v for v in p.videos if v.video.id == "cto-hello").steps[-1]
    return cache.entry(step.stage, step.key), step.key


def test_plan_memo_hit_without_reading_the_record(tmp_path: Path, monkeypatch) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())
    plan(tmp_path)  # notes every sound entry in the memo
    opened = []
    real = Path.read_text

    def spy(self: Path, *args: object, **kwargs: object) -> str:
        opened.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", spy)
    p, _ = plan(tmp_path)
    assert not p.stale and "step.json" not in opened


def test_plan_memo_misses_a_changed_output_or_record(tmp_path: Path) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())
    plan(tmp_path)
    folder, key = _final(tmp_path)
    video = folder / "video.mp4"
    data = video.read_bytes()
    video.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes, a new mtime
    p, _ = plan(tmp_path)
    decision = next(d for v in p.videos for d in v.decisions if d.key == key)
    assert not decision.cached and "sha256" in decision.reason

    build(tmp_path, make_registry())  # rebuilt; planned twice: the memo knows it again
    plan(tmp_path)
    folder, key = _final(tmp_path)
    rec = json.loads((folder / "step.json").read_text())
    (folder / "step.json").write_text(json.dumps({**rec, "key": "0" * 64}))  # another record in its place
    os.utime(folder / "step.json", ns=(1, 1))
    p, _ = plan(tmp_path)
    assert not next(d for v in p.videos for d in v.decisions if d.key == key).cached
