"""Builds that survive faults, through the CLI: an output folder owned for the length of a build, a read-only
no-op build, temporary files of dead runs swept, cache files that honour the umask, lock files removed, renames
synced to disk, each finished video committed at once, and bounded templates. (A full disk: test_disk_full.py;
kills at many points: test_crash.py.)"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._fake_cli import dhbatch_fake, start_fake
from tests._project import plan, write_project

REPO = Path(__file__).resolve().parent.parent


def dhbatch(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command line (real stages)."""
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _wait_for(check, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.is_file() else []


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root: (inode, size, mtime_ns)."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_faults_same_named_manifests_built_at_once_the_second_is_refused(tmp_path: Path) -> None:
    """a/m.yaml and b/m.yaml built at the same moment into one build folder both published into build/m/ and both
    exited 0; now the folder is locked for the length of a build and its owner checked under the lock: the second
    is refused at once with what to do (exit 2), the first finishes alone."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    for folder in ("a", "b"):
        write_project(repo / folder)
    log = tmp_path / "log"
    first = start_fake("build", "a/m.yaml", "-q", cwd=repo, FAKE_LOG=str(log), FAKE_DELAY="0.1")
    try:
        _wait_for(lambda: _lines(log), what="the first build to start building")
        t0 = time.monotonic()
        second = dhbatch_fake("build", "b/m.yaml", "-q", cwd=repo, FAKE_LOG=str(log))
        refused_in = time.monotonic() - t0
        assert first.poll() is None, "the first build should still be running"
    finally:
        out, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "is being built for a/m.yaml, and b/m.yaml has the same file name" in second.stderr
    assert "--build-dir" in second.stderr and "Traceback" not in second.stderr
    assert refused_in < 10  # at once, not after the first build
    assert first.returncode == 0, err
    pids = {line.split()[2] for line in _lines(log)}
    assert pids == {str(first.pid)}  # the second built nothing
    state = json.loads((repo / "build" / "m" / "state.json").read_text())
    assert state["manifest"] == "a/m.yaml" and len(list((repo / "build" / "m").glob("*.mp4"))) == 5
    # One after the other, as before: refused, with the same words.
    again = dhbatch_fake("build", "b/m.yaml", cwd=repo)
    assert again.returncode == 2 and "has the same file name" in again.stderr


def test_faults_same_manifest_built_twice_at_once_waits_and_builds_each_step_once(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    log = tmp_path / "log"
    first = start_fake("build", str(m), "-q", FAKE_LOG=str(log), FAKE_DELAY="0.3")
    _wait_for(lambda: _lines(log), what="the first build to start building")
    second = dhbatch_fake("build", str(m), FAKE_LOG=str(log))
    first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "waiting for another build of m.yaml" in second.stderr
    keys = [line.split()[1] for line in _lines(log)]
    assert len(keys) == len(set(keys))  # every step built once
    assert "all steps cached" in second.stdout


def test_faults_gc_refuses_while_a_build_writes_the_folder(tmp_path: Path) -> None:
    from batch.locking import lock_folder

    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    held = lock_folder(tmp_path / "build" / "m")  # as a build holds it
    try:
        refused = dhbatch_fake("gc", "m.yaml", "--yes", cwd=tmp_path)
    finally:
        held.release()
    assert refused.returncode == 2 and "a build is writing build/m" in refused.stderr
    assert dhbatch_fake("gc", str(m), "--yes").returncode == 0


def test_faults_noop_build_writes_nothing_also_in_a_read_only_folder(tmp_path: Path) -> None:
    """A build with nothing to do rewrote state.json (and the report) every time, so it failed on a read-only build
    folder (a cache restored read-only in CI) naming a temporary file. Now it writes nothing at all."""
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    build = tmp_path / "build"
    before = _snapshot(build)
    again = dhbatch_fake("build", str(m))
    assert again.returncode == 0 and "5/5 videos ready" in again.stdout, again.stderr
    after = _snapshot(build)
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if os.geteuid() != 0:
        return
    # The same on a read-only mount (as root, file modes do not stop writes; a mount does).
    if subprocess.run(["mount", "--bind", str(build), str(build)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(build)], check=True, capture_output=True)
        ro = dhbatch_fake("build", str(m))
        assert ro.returncode == 0 and "5/5 videos ready" in ro.stdout, ro.stderr
        assert dhbatch_fake("plan", str(m)).returncode == 0
    finally:
        subprocess.run(["umount", str(build)], check=True)


_DIE_MIDWAY = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
what, out = sys.argv[1], Path(sys.argv[2])

def die(*args, **kwargs):
    for arg in args:  # the temporary file the code is writing: leave it half-written, as a kill would
        if isinstance(arg, (str, Path)) and ".tmp" in str(arg):
            Path(arg).write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

if what == "thumbnail":
    from PIL import Image
    from batch.report import _thumbnail
    Image.Image.save = lambda self, fp, *a, **k: die(fp)
    _thumbnail(out / "cto-hello.mp4", out / "thumbs" / "cto-hello.png")
elif what == "publish":
    import shutil
    from batch.cache import publish
    shutil.copyfile = lambda src, dst, **k: die(dst)
    publish(out / "cto-hello.mp4", out / "again.mp4")
elif what == "state":
    import batch.cache
    real = os.replace
    os.replace = lambda src, dst: die(src)
    batch.cache.write_atomic(out / "state.json", b"{{}}")
"""


def test_faults_dead_runs_temporary_files_are_swept_at_the_next_start(tmp_path: Path) -> None:
    """Runs killed while writing a thumbnail, publishing a video or writing state.json leave their temporary files;
    thumbnails used to survive the next build for an hour. The next build sweeps them all when it starts."""
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q", FAKE_MP4="1").returncode == 0
    out = tmp_path / "build" / "m"
    (out / "thumbs" / "cto-hello.png").unlink(missing_ok=True)
    script = tmp_path / "die.py"
    script.write_text(_DIE_MIDWAY.format(repo=str(REPO)))
    for what in ("thumbnail", "publish", "state"):
        died = subprocess.run([sys.executable, str(script), what, str(out)], capture_output=True, text=True)
        assert died.returncode == -9, died.stderr
    left = sorted(p.name for p in out.rglob(".*tmp*"))
    assert len(left) == 3, left
    building = start_fake("build", str(m), "-q", FAKE_MP4="1", FAKE_DELAY="0.5")
    try:
        hello = m.read_text().replace("Hello, I am the boss.", "Hello again.")
        m.write_text(hello)
        _wait_for(lambda: not list(out.rglob(".*tmp*")), timeout=20, what="the sweep")
        assert building.poll() is None  # swept at the start, not at the end
    finally:
        building.communicate(timeout=120)
    assert building.returncode == 0


def test_faults_cache_files_honour_the_umask(tmp_path: Path) -> None:
    """Stages write through mkstemp (mode 0600), so a cache shared by CI jobs and users was readable by its writer
    alone; the cache now gives every file the umask's mode (umask 002: group-writable)."""
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q", umask=0o002, FAKE_MP4="1").returncode == 0
    cache = tmp_path / "build" / "cache" / "steps"
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "video.mp4" for p in files)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {0o664}, {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*") if p.is_dir()} == {0o775}
    published = tmp_path / "build" / "m" / "cto-hello.mp4"
    assert stat.S_IMODE(published.stat().st_mode) == 0o664


def test_faults_lock_files_are_removed_when_released(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "-q").returncode == 0
    locks = tmp_path / "build" / "cache" / "locks"
    assert locks.is_dir() and list(locks.iterdir()) == []


def test_faults_lock_file_removed_by_its_holder_is_never_held_twice(tmp_path: Path) -> None:
    """The removal is safe: a process that opened the lock file before its holder removed it notices, once it gets
    the lock, that the file is gone, and locks a new one; two processes never hold the key at once."""
    script = tmp_path / "hold.py"
    script.write_text(
        f"import sys, time, os\nsys.path.insert(0, {str(REPO)!r})\nfrom pathlib import Path\n"
        "from batch.locking import lock_file\n"
        "for _ in range(200):\n"
        "    held = lock_file(Path(sys.argv[1]))\n"
        "    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
        "    os.write(fd, b'in\\n'); time.sleep(0.0005); os.write(fd, b'out\\n'); os.close(fd)\n"
        "    held.release()\n"
    )
    lock, trace = tmp_path / "k.lock", tmp_path / "trace"
    procs = [subprocess.Popen([sys.executable, str(script), str(lock), str(trace)]) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    lines = trace.read_text().split()
    assert len(lines) == 1200 and lines == ["in", "out"] * 600  # never two inside at once
    assert not lock.exists()


def test_faults_renames_are_synced_with_their_folder(tmp_path: Path) -> None:
    """A power cut could lose a commit the log called done: after each rename the folder is synced too (as
    databases do). Seen with strace: every folder a build renames into gets an fsync after the rename."""
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        pytest.skip("strace is not installed")
    m = write_project(tmp_path)
    trace = tmp_path / "trace"
    cmd = ["strace", "-f", "-y", "-qq", "-e", "trace=rename,renameat,renameat2,fsync", "-o", str(trace)]
    proc = subprocess.run(
        [*cmd, sys.executable, str(REPO / "tests" / "_fake_cli.py"), "build", str(m), "-q"], capture_output=True
    )
    if proc.returncode != 0 and b"PTRACE" in proc.stderr:
        pytest.skip("ptrace is not permitted here")
    assert proc.returncode == 0, proc.stderr
    pending: dict[str, str] = {}  # folder -> a rename into it not yet followed by the folder's fsync
    for line in trace.read_text().splitlines():
        if rename := re.search(r'rename\w*\(.*"([^"]+)",.*"([^"]+)"', line):
            pending[str(Path(rename[2]).parent)] = rename[2]
        elif sync := re.search(r"fsync\(\d+<([^>]+)>", line):
            pending.pop(sync[1], None)
    assert pending == {}, pending
    assert any("/build/m" in line and "fsync" in line for line in trace.read_text().splitlines())


def test_faults_finished_animation_is_committed_before_its_chunk_ends(tmp_path: Path) -> None:
    """A killed build redid up to 3 finished animations: the animate stage (4 videos a chunk, 16 for SadTalker) was
    committed chunk by chunk. Each video is now committed as soon as it is finished, and a kill keeps it."""
    m = write_project(tmp_path)
    log = tmp_path / "log"
    building = start_fake("build", str(m), "-q", FAKE_LOG=str(log), FAKE_DELAY="0.3")
    try:
        _wait_for(lambda: any(line.startswith("animate ") for line in _lines(log)), what="an animation")
        first = next(line.split()[1] for line in _lines(log) if line.startswith("animate "))
        record = plan(tmp_path)[1].entry("animate", first) / "step.json"
        _wait_for(record.is_file, what="its commit")
        animated = [line for line in _lines(log) if line.startswith("animate ")]
        assert len(animated) < 4, animated  # committed while its chunk still runs
        building.kill()
    finally:
        building.communicate(timeout=60)
    done_before = {line.split()[1] for line in _lines(log) if line.startswith("animate ")}
    committed = {k for k in done_before if (plan(tmp_path)[1].entry("animate", k) / "step.json").is_file()}
    assert first in committed
    again = dhbatch_fake("build", str(m), "-q", FAKE_LOG=str(log))
    assert again.returncode == 0, again.stderr
    animations = [line.split()[1] for line in _lines(log) if line.startswith("animate ")]
    assert all(animations.count(k) == 1 for k in committed), (animations, committed)  # none redone


def test_faults_template_loops_are_bounded(tmp_path: Path) -> None:
    """A triple-nested loop in a script text hung `validate` and `plan` until killed; rendering is now bounded and
    the error names the template and the line."""
    m = write_project(tmp_path)
    slow = "Hi.\\n{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}"
    m.write_text(m.read_text().replace('"Hello, I am the boss."', f'"{slow}{{% endfor %}}{{% endfor %}}"'))
    for command in ("validate", "plan"):
        t0 = time.monotonic()
        done = dhbatch(command, str(m), timeout=30)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "scripts.hello.text" in done.stderr and "line 2" in done.stderr and "too slow" in done.stderr
        assert "Traceback" not in done.stderr and time.monotonic() - t0 < 15


def test_faults_media_errors_are_words_and_a_tiny_image_is_not_empty(tmp_path: Path) -> None:
    """FFmpeg errors were shown with their raw numbers ("[Errno 1094995529]"), and a 1-pixel portrait was called
    "empty": both are now said in words (real stages)."""
    from PIL import Image

    pytest.importorskip("dlib")
    from tests._audio_util import tone, write_wav

    Image.new("RGB", (1, 1), (200, 150, 120)).save(tmp_path / "dot.png")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    write_wav(tmp_path / "speech.wav", tone(1.0, 16000), 16000)
    (tmp_path / "m.yaml").write_text(
        "version: 1\ncharacters:\n  dot: {image: dot.png}\n"
        "scripts:\n  bad: {audio: corrupt.wav}\n  good: {audio: speech.wav}\n"
        "videos:\n  - {id: bad-audio, character: dot, script: bad}\n  - {id: tiny, character: dot, script: good}\n"
    )
    built = dhbatch("build", str(tmp_path / "m.yaml"), "--device", "cpu", timeout=300)
    assert built.returncode == 1, built.stderr
    report = {v["id"]: v for v in json.loads((tmp_path / "build" / "m" / "report.json").read_text())["videos"]}
    assert "Invalid data found when processing input" in report["bad-audio"]["error"]
    assert "Errno" not in report["bad-audio"]["error"] and "1094995529" not in built.stdout
    assert "dot.png is only 1x1 pixels: too small to hold a face" in report["tiny"]["error"], report["tiny"]
    assert "empty" not in report["tiny"]["error"]
