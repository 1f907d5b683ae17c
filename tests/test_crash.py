"""Crash safety: a real `dhbatch build` process (tests/_fake_cli.py: the whole CLI, with light stages that write real
MP4s) is killed at many points, chosen by step completion (the steps it has built so far, up to all of them, so that
committing, publishing and report writing are hit too) plus a little time, with SIGKILL, SIGINT or SIGTERM. After
each kill: every published MP4 decodes fully, every cache entry with a record holds exactly the bytes it records
(no false hit), and no step whose entry was complete is built again. 6 kills by default; RUN_SLOW=1: 50."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

from tests._fake_cli import dhbatch_fake, start_fake
from tests._project import plan, write_project

KILLS = 50 if os.environ.get("RUN_SLOW") == "1" else 6
#: Exit status of a build that ended on its own (0), by the signal sent as the CLI handles it (SIGINT: 130, SIGTERM:
#: 143), or by the signal itself: SIGKILL, or the others while Python shuts down (it restores their default actions).
ENDINGS = {signal.SIGKILL: {0, -9}, signal.SIGINT: {0, 130, -2}, signal.SIGTERM: {0, 143, -15}}


def _decoded_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.is_file() else []


def _sound_entries(root: Path) -> set[str]:
    """Keys of the cache entries that have a record; fails if any record does not match its files' bytes."""
    _, cache = plan(root)
    keys = set()
    for _, key, folder in cache.entries():
        record = folder / "step.json"
        if not record.is_file():
            continue  # never a hit: the record is written last
        rec = json.loads(record.read_text())
        for name, digest in rec["sha256"].items():
            data = (folder / name).read_bytes()
            assert len(data) == rec["outputs"][name] and hashlib.sha256(data).hexdigest() == digest, (folder, name)
            if name.endswith(".mp4"):
                assert _decoded_frames(folder / name) == 6, (folder, name)
        keys.add(key)
    return keys


def _published_decode(root: Path) -> int:
    videos = sorted((root / "build" / "m").glob("*.mp4"))
    for video in videos:
        assert _decoded_frames(video) == 6, video
    return len(videos)


def test_crash_builds_killed_at_many_points_keep_every_output_sound(tmp_path: Path) -> None:
    rng = random.Random(19)
    m = write_project(tmp_path)
    log = tmp_path / "log"
    complete: set[str] = set()  # keys whose entry was complete after some kill: never built again
    kinds = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM]
    for i in range(KILLS):
        if i % 2 == 0:  # new work (two videos' voice, animation and mux); odd rounds resume the killed one
            write_project(tmp_path, hello=f"Hello, this is take {i}.")
        p, _ = plan(tmp_path)
        todo = len({d.key for v in p.videos for d in v.decisions if not d.cached})
        target = rng.randint(0, todo)  # steps to wait for: 0 (start-up) .. all (commit, publish, report)
        sig = kinds[i % 3]
        before = len(_lines(log))
        started = tmp_path / f"started-{i}"
        proc = start_fake(
            "build", str(m), "-q", FAKE_LOG=str(log), FAKE_MP4="1", FAKE_DELAY="0.02", FAKE_STARTED=str(started)
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and not started.exists() and time.monotonic() < deadline:
            time.sleep(0.005)  # a signal while Python itself starts up is not the CLI's to handle
        while proc.poll() is None and len(_lines(log)) - before < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.08))
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in ENDINGS[sig], (i, sig, proc.returncode, err)
        assert "Traceback" not in err, err
        built = {line.split()[1] for line in _lines(log)[before:]}
        assert not built & complete, f"round {i}: steps built again: {built & complete}"
        complete |= _sound_entries(tmp_path)
        _published_decode(tmp_path)
    before = len(_lines(log))
    final = dhbatch_fake("build", str(m), "-q", FAKE_LOG=str(log), FAKE_MP4="1")
    assert final.returncode == 0, final.stderr
    assert not {line.split()[1] for line in _lines(log)[before:]} & complete
    assert _published_decode(tmp_path) == 5
    assert dhbatch_fake("plan", str(m)).returncode == 0
