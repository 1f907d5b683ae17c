"""A full disk, on a small file system the test mounts (a 1 MB tmpfs: needs root, else skipped with the reason): the
build always exits 3 naming the file it could not write and about how much space it needs; the videos built before
stay (published if the manifest did not change them, else in last-good/); the next run, after space is freed,
resumes without redoing what was committed."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._fake_cli import dhbatch_fake
from tests._project import write_project


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _decodes(path: Path) -> bool:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0)) == 6


def test_disk_full_exits_3_names_the_file_keeps_videos_and_resumes(tmp_path: Path, small_disk: Path) -> None:
    project = tmp_path / "project"
    m = write_project(project)
    log = tmp_path / "log"
    fake = {"FAKE_LOG": str(log), "FAKE_MP4": "1"}
    build_dir = small_disk / "build"
    assert dhbatch_fake("build", str(m), "-q", "--build-dir", str(build_dir), **fake).returncode == 0
    out = build_dir / "m"
    published = {p.name: p.read_bytes() for p in out.glob("*.mp4")}
    assert len(published) == 5

    write_project(project, hello="A new hello, and a new goodbye.")  # two videos to build again
    m.write_text(m.read_text().replace("Goodbye from", "Farewell from"))  # and two more
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 3 * 4096))  # room for about three files: the disk fills mid-build
    before = len(log.read_text().splitlines())
    full = dhbatch_fake("build", str(m), "--build-dir", str(build_dir), **fake)
    assert full.returncode == 3, full.stdout + full.stderr
    assert "no space left on device: cannot write " + str(small_disk) in full.stderr, full.stderr
    assert "this build needs about" in full.stderr and "MB more" in full.stderr
    assert "Traceback" not in full.stderr and "re-render" not in full.stderr + full.stdout
    assert "videos ready" in full.stdout  # the per-video summary is printed
    for name, data in published.items():  # the videos built before stay, whole: published if still current, else
        kept = out / name if (out / name).is_file() else out / "last-good" / name  # kept as the last good one
        assert kept.read_bytes() == data or (kept.parent == out and _decodes(kept)), name
    assert (out / "cto-recorded.mp4").read_bytes() == published["cto-recorded.mp4"]  # unchanged: still published
    try:
        report = json.loads((out / "report.json").read_text())
        assert report["disk_full"]["path"].startswith(str(small_disk))
    except ValueError:
        pytest.fail("report.json is half-written")
    except KeyError:
        assert "the report was not written" in full.stderr  # it did not fit: said, and the old one is whole

    committed = {
        line.split()[1]
        for line in log.read_text().splitlines()[before:]
        if (
            build_dir / "cache" / "steps" / line.split()[0] / line.split()[1][:2] / line.split()[1] / "step.json"
        ).is_file()
    }
    filler.unlink()
    before = len(log.read_text().splitlines())
    resumed = dhbatch_fake("build", str(m), "-q", "--build-dir", str(build_dir), **fake)
    assert resumed.returncode == 0, resumed.stderr
    rebuilt = {line.split()[1] for line in log.read_text().splitlines()[before:]}
    assert not rebuilt & committed  # what was committed before the disk filled is not redone
    assert all(_decodes(p) for p in out.glob("*.mp4")) and len(list(out.glob("*.mp4"))) == 5
    assert dhbatch_fake("plan", str(m), "--build-dir", str(build_dir)).returncode == 0
