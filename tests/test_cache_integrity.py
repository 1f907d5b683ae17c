"""Cache integrity through the CLI: every step record carries the sha256 of its outputs, checked before an output is
used or published and by `plan --verify`; a damaged entry is a warning and a rebuild, never a hit."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests._fake_cli import dhbatch_fake
from tests._project import plan, write_project


def _decodes(path: Path) -> int:
    """Frames decoded from the whole file (PyAV raises on a damaged stream)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _mux_entry(root: Path) -> tuple[Path, dict]:
    p, cache = plan(root)
    key = next(v for v in p.videos if v.video.id == "cto-hello").steps[-1].key
    folder = cache.entry("mux", key)
    return folder, json.loads((folder / "step.json").read_text())


def test_cache_records_carry_the_sha256_of_every_output(tmp_path: Path) -> None:
    import hashlib

    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    _, cache = plan(tmp_path)
    for stage, _, folder in cache.entries():
        rec = json.loads((folder / "step.json").read_text())
        assert set(rec["sha256"]) == set(rec["outputs"]), (stage, rec)
        for name, digest in rec["sha256"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_cache_damaged_output_of_the_same_size_is_rebuilt_not_published(tmp_path: Path) -> None:
    """Zeroing 4,000 bytes inside a cached MP4 (same size) made the next build republish an undecodable video with
    exit 0: now plan says why it must run, and build warns, rebuilds it and publishes a video that decodes."""
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q", FAKE_MP4="1").returncode == 0
    folder, rec = _mux_entry(tmp_path)
    video = folder / "video.mp4"
    data = bytearray(video.read_bytes())
    data[40:-200] = bytes(len(data) - 240)  # the frames (a tiny file: the issue zeroed 4,000 bytes of a big one)
    video.write_bytes(bytes(data))

    planned = dhbatch_fake("plan", str(m))
    assert planned.returncode == 1, planned.stdout + planned.stderr
    assert "cache entry: video.mp4 does not match its sha256 (damaged)" in planned.stdout
    built = dhbatch_fake("build", str(m), FAKE_MP4="1")
    assert built.returncode == 0, built.stderr
    assert "does not match its sha256" in built.stderr and "rebuilding it" in built.stderr
    published = tmp_path / "build" / "m" / "cto-hello.mp4"
    assert _decodes(published) == 6
    assert json.loads((folder / "step.json").read_text())["sha256"] == rec["sha256"]  # the same bytes again
    assert dhbatch_fake("plan", str(m)).returncode == 0


def test_cache_plan_verify_reads_every_byte(tmp_path: Path) -> None:
    """A damaged file whose size and mtime did not change (bit rot) passes the memoised check; `plan --verify`
    reads the bytes and finds it."""
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    folder, _ = _mux_entry(tmp_path)
    video = folder / "video.mp4"
    st = video.stat()
    video.write_bytes(b"X" * st.st_size)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dhbatch_fake("plan", str(m)).returncode == 0  # trusted through the memo: size and mtime unchanged
    deep = dhbatch_fake("plan", str(m), "--verify")
    assert deep.returncode == 1 and "video.mp4 does not match its sha256" in deep.stdout, deep.stdout
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    assert dhbatch_fake("plan", str(m), "--verify").returncode == 0


def test_cache_record_from_before_checksums_is_trusted_once_and_sealed(tmp_path: Path) -> None:
    """Records written before checksums existed are not rebuilt (a cache may hold hours of GPU work): the next build
    reuses them and writes their sha256 into the record."""
    m = write_project(tmp_path)
    log = tmp_path / "log"
    assert dhbatch_fake("build", str(m), "-q", FAKE_LOG=str(log)).returncode == 0
    _, cache = plan(tmp_path)
    for _, _, folder in cache.entries():
        rec = json.loads((folder / "step.json").read_text())
        del rec["sha256"]
        (folder / "step.json").write_text(json.dumps(rec))
    (tmp_path / "build" / "cache" / "hashes.json").unlink()
    built_before = log.read_text().count("\n")
    again = dhbatch_fake("build", str(m), "-q", FAKE_LOG=str(log))
    assert again.returncode == 0 and log.read_text().count("\n") == built_before  # nothing rebuilt
    for _, _, folder in cache.entries():
        assert "sha256" in json.loads((folder / "step.json").read_text())
