"""The runner: stage-major execution, warm models, cache hits, atomic outputs, failure policy, concurrent runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.cache import Cache
from tests._fake_stages import make_registry
from tests._project import build, plan, write_project

SCRIPT = Path(__file__).parent / "_build_script.py"


def test_run_builds_all_videos_and_reports_each_step(tmp_path: Path) -> None:
    write_project(tmp_path)
    result = build(tmp_path, make_registry())
    assert sorted(v.status for v in result.videos) == ["built"] * 5
    for v in result.videos:
        assert Path(v.output).is_file() and Path(v.output).parent == tmp_path / "build" / "m"
    report = json.loads((tmp_path / "build" / "m" / "report.json").read_text())
    assert report["summary"] == {"built": 5, "cached": 0, "failed": 0, "skipped": 0}
    step = report["videos"][0]["steps"][0]
    assert set(step) >= {"stage", "key", "cached", "reason", "seconds", "status"} and step["reason"] == "new"
    assert step["status"] == "ran" and step["worker"] == "local" and step["device"] == "cpu" and step["queued"] >= 0
    assert (tmp_path / "build" / "m" / "report.html").read_text().count("<tr>") == 6


def test_run_stage_warnings_reach_the_report_and_the_build_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage's warnings (info["warnings"]) are shown under their video in report.json, report.html and the CLI's
    summary, and still are when the step is cached; notes on how a run made a step (info["run_notes"]) are shown by
    that run only."""
    from batch.cli import print_build

    write_project(tmp_path, hello="Hello, WARN me.", ceo="a NOTE-worthy CEO")
    for run in ("built", "cached"):
        result = build(tmp_path, make_registry())
        warned = {v.id: v.warnings for v in result.videos if v.warnings}
        note = [("prompt", "this run made it another way")] if run == "built" else []
        assert warned == {
            "ceo-hello": [*note, ("voice", "the text asks for a warning")],
            "cto-hello": [("voice", "the text asks for a warning")],
            **({"ceo-bye": note} if note else {}),
        }, run
        count = 4 if run == "built" else 2
        report = json.loads((tmp_path / "build" / "m" / "report.json").read_text())
        assert report["warnings"] == count
        steps = {(v["id"], s["stage"]): s for v in report["videos"] for s in v["steps"]}
        assert steps[("ceo-hello", "voice")]["warnings"] == ["the text asks for a warning"]
        assert steps[("ceo-bye", "voice")]["warnings"] == []
        html = (tmp_path / "build" / "m" / "report.html").read_text()
        assert html.count("<span class=warn>warning: the text asks for a warning</span>") == 2
        assert html.count("this run made it another way") == count - 2 and f"warnings: {count}" in html
        print_build(result, tmp_path / "build" / "m" / "report.json")
        out = capsys.readouterr().out.splitlines()
        at = next(i for i, line in enumerate(out) if " cto-hello: " in line)
        assert out[at].startswith(run) and out[at + 1] == "  warning: voice: the text asks for a warning"
        assert "5/5 videos ready" in out[-1] and f"({count} warnings)" in out[-1]


def test_run_loads_each_model_once_per_run(tmp_path: Path) -> None:
    write_project(tmp_path)
    result = build(tmp_path, make_registry())
    assert result.model_loads and all(n == 1 for n in result.model_loads.values())
    assert len(result.model_loads) == 6  # prompt, image, voice, audio, animate, mux: once each for 5 videos


def test_run_second_run_is_all_cached_and_calls_no_stage(tmp_path: Path) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())
    log = tmp_path / "log"
    result = build(tmp_path, make_registry(log=log))
    assert [v.status for v in result.videos] == ["cached"] * 5
    assert not log.exists()


def test_run_shared_steps_are_built_once(tmp_path: Path) -> None:
    write_project(tmp_path)
    log = tmp_path / "log"
    build(tmp_path, make_registry(log=log))
    lines = log.read_text().splitlines()
    keys = [line.split()[1] for line in lines]
    assert len(keys) == len(set(keys))
    # ceo's prompt and image serve two videos; "bye" is the same text for both characters.
    assert sum(line.startswith("image ") for line in lines) == 1
    assert sum(line.startswith("voice ") for line in lines) == 2


def test_run_failing_video_does_not_stop_the_others(tmp_path: Path) -> None:
    write_project(tmp_path, hello="Please FAIL here.")
    result = build(tmp_path, make_registry())
    status = {v.id: v.status for v in result.videos}
    assert status == {
        "ceo-hello": "failed",
        "cto-hello": "failed",
        "ceo-bye": "built",
        "cto-bye": "built",
        "cto-recorded": "built",
    }
    failed = next(v for v in result.videos if v.id == "cto-hello")
    assert failed.error == "voice: scripts.hello: the text asks to fail — remove FAIL"
    assert [s.status for s in failed.steps] == ["failed", "not run", "not run"]
    assert not (tmp_path / "build" / "m" / "cto-hello.mp4").exists()


def test_run_video_that_cannot_be_published_fails_alone(tmp_path: Path) -> None:
    """A folder standing where one video's MP4 goes: that video fails with the reason, the others are published and
    the report is written; once the path is free, the next run publishes it from the cache."""
    write_project(tmp_path)
    blocker = tmp_path / "build" / "m" / "ceo-bye.mp4"
    blocker.mkdir(parents=True)
    result = build(tmp_path, make_registry())
    status = {v.id: v.status for v in result.videos}
    assert status["ceo-bye"] == "failed" and sorted(status.values()).count("built") == 4
    failed = next(v for v in result.videos if v.id == "ceo-bye")
    assert failed.error.startswith(f"publish: cannot write {blocker}") and "run again" in failed.error
    report = json.loads((tmp_path / "build" / "m" / "report.json").read_text())
    assert report["summary"]["failed"] == 1
    blocker.rmdir()
    again = build(tmp_path, make_registry())
    assert {v.id: v.status for v in again.videos}["ceo-bye"] == "cached" and blocker.is_file()


def test_run_fail_fast_stops_at_first_failure(tmp_path: Path) -> None:
    write_project(tmp_path, hello="Please FAIL here.")
    result = build(tmp_path, make_registry(), fail_fast=True)
    status = {v.id: v.status for v in result.videos}
    assert status["ceo-hello"] == "failed" and status["ceo-bye"] == "skipped"
    assert all(s != "built" for s in status.values())


def test_run_failed_video_is_retried_next_run(tmp_path: Path) -> None:
    write_project(tmp_path, hello="Please FAIL here.")
    build(tmp_path, make_registry())
    write_project(tmp_path, hello="All good now.")
    result = build(tmp_path, make_registry())
    assert {v.id: v.status for v in result.videos}["cto-hello"] == "built"


def test_run_corrupt_record_is_a_miss_not_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())
    p, cache = plan(tmp_path)
    mux = p.videos[0].steps[-1]
    (cache.entry("mux", mux.key) / "step.json").write_text("{not json")
    p, cache = plan(tmp_path)
    assert "corrupt" in caplog.text
    assert not p.videos[0].decisions[-1].cached
    result = build(tmp_path, make_registry())
    assert result.videos[0].status == "built"


def test_run_truncated_output_is_a_miss(tmp_path: Path) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())
    p, cache = plan(tmp_path)
    mux = p.videos[0].steps[-1]
    out = cache.output("mux", mux.key, "video.mp4")
    out.write_bytes(out.read_bytes()[:10])
    p, _ = plan(tmp_path)
    assert p.videos[0].decisions[-1].reason == "cache entry: video.mp4 has 10 bytes, its record says 64"
    out.unlink()
    p, _ = plan(tmp_path)
    assert p.videos[0].decisions[-1].reason == "cache entry: video.mp4 is missing"


def test_run_killed_mid_write_leaves_no_hit_and_resumes(tmp_path: Path) -> None:
    write_project(tmp_path)
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(log), "30", "0"])
    tmp_dir = tmp_path / "build" / "cache" / "tmp"
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and not partial:
        partial = [p for p in tmp_dir.rglob("*") if p.is_file() and p.stat().st_size > 0] if tmp_dir.exists() else []
        time.sleep(0.05)
    assert partial, "the build never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    p, cache = plan(tmp_path)
    assert not any(d.cached for v in p.videos for d in v.decisions)
    assert not list((tmp_path / "build" / "cache").rglob("step.json"))
    result = build(tmp_path, make_registry())
    assert [v.status for v in result.videos] == ["built"] * 5
    assert not any(tmp_dir.iterdir())  # the dead run's temporary folder was swept


def test_run_two_processes_build_each_step_once(tmp_path: Path) -> None:
    write_project(tmp_path)
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(log), "0", "0.15"]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    keys = [line.split()[1] for line in log.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 15
    p, _ = plan(tmp_path)
    assert not p.stale


def test_run_lock_of_killed_process_is_recovered(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    code = (
        "import sys, time; sys.path.insert(0, {!r})\n"
        "from pathlib import Path\nfrom batch.cache import Cache\n"
        "c = Cache(Path({!r}))\n"
        "with c.locked(['k1']):\n    print('held', flush=True); time.sleep(60)\n"
    ).format(str(Path(__file__).resolve().parent.parent), str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    t0 = time.time()
    with cache.locked(["k1"]):
        pass
    assert time.time() - t0 < 5


def test_run_parallel_jobs_build_the_same_outputs(tmp_path: Path) -> None:
    serial, parallel = tmp_path / "a", tmp_path / "b"
    for root in (serial, parallel):
        write_project(root)
    build(serial, make_registry())
    log = tmp_path / "log"
    result = build(parallel, make_registry(log=log), jobs=2)
    assert [v.status for v in result.videos] == ["built"] * 5
    keys = [line.split()[1] for line in log.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 15
    for v in result.videos:
        assert Path(v.output).read_bytes() == (serial / "build" / "m" / f"{v.id}.mp4").read_bytes()


def _sadtalker_project(root: Path) -> None:
    """The test project with every video on the SadTalker renderer (fake checkpoint files: the stage is faked)."""
    from batch.stages import sadtalker_files

    path = write_project(root)
    path.write_text(path.read_text().replace("renderer: puppet", "renderer: sadtalker"))
    for name in sadtalker_files(256, "crop"):
        (root / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "checkpoints" / name).write_bytes(b"weights")


@pytest.mark.parametrize(("chunk", "calls"), [(16, [5]), (2, [2, 2, 1])])
def test_run_hands_the_gpu_renderer_large_chunks_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, calls: list[int]
) -> None:
    """The SadTalker stage batches frames across a chunk's videos on one GPU: it gets chunks of
    BATCHED_GPU_TARGETS[target] videos (the stage's own chunk is 4), and even with --jobs 4 never two at once."""
    import threading

    from batch import run

    target = "renderer.sadtalker.pipeline:run"
    monkeypatch.setitem(run.BATCHED_GPU_TARGETS, target, chunk)
    _sadtalker_project(tmp_path)
    registry = make_registry()
    fake, seen, lock, running = registry[target], [], threading.Lock(), []

    def stage(jobs, pool):
        with lock:
            running.append(1)
            overlapped = len(running) > 1
        time.sleep(0.05)
        with lock:
            seen.append((len(jobs), overlapped))
            running.pop()
        return fake(jobs, pool)

    registry[target] = stage
    result = build(tmp_path, registry, jobs=4)
    assert [v.status for v in result.videos] == ["built"] * 5
    assert sorted(n for n, _ in seen) == sorted(calls) and not any(overlapped for _, overlapped in seen)


def test_run_interrupted_with_parallel_jobs_waits_for_its_threads(tmp_path: Path) -> None:
    """Ctrl-C during a --jobs 2 stage: no chunk starts after it, the running ones end before the KeyboardInterrupt
    leaves the runner (threads left in native code while the interpreter exits crash the process), and nothing
    half-built is kept."""
    import threading

    from batch.stages import TARGETS

    write_project(tmp_path)
    registry = make_registry()
    fake_voice = registry[TARGETS["voice"]]
    started: list[str] = []
    finished: list[str] = []
    lock, both_at_work = threading.Lock(), threading.Barrier(2)

    def voice(jobs, pool):
        with lock:
            started.append(jobs[0].key)
            first = len(started) == 1
        both_at_work.wait(timeout=30)  # Ctrl-C comes while both threads run a chunk (however loaded the machine)
        if first:
            signal.raise_signal(signal.SIGINT)  # delivered to the main thread, which waits for the workers
        time.sleep(0.5)  # a chunk still at work when Ctrl-C comes
        out = fake_voice(jobs, pool)
        finished.append(jobs[0].key)
        return out

    registry[TARGETS["voice"]] = voice
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, registry, jobs=2)
    assert set(threading.enumerate()) <= before  # every worker thread has ended
    assert len(started) == 2 and sorted(finished) == sorted(
        started
    )  # the two running chunks ended; the third never started
    p, _ = plan(tmp_path)
    assert not (tmp_path / "build" / "cache" / "tmp").exists() or not any(
        (tmp_path / "build" / "cache" / "tmp").iterdir()
    )
    cached = {d.key for v in p.videos for d in v.decisions if d.cached and d.stage in ("voice", "animate", "mux")}
    assert cached == set(finished)  # what ended is kept (a rerun resumes from it); nothing after the interrupt


def test_run_with_nothing_new_leaves_the_published_files_alone(tmp_path: Path) -> None:
    """A cached build does not rewrite identical outputs (their times stay, for sync steps); a changed or damaged
    output is replaced from the cache."""
    write_project(tmp_path)
    build(tmp_path, make_registry())
    out = tmp_path / "build" / "m"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    time.sleep(0.01)
    build(tmp_path, make_registry())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before
    damaged = out / "ceo-bye.mp4"
    good = damaged.read_bytes()
    damaged.write_bytes(b"x" * len(good))
    build(tmp_path, make_registry())
    assert damaged.read_bytes() == good
    damaged.write_bytes(b"short")  # plan notices a published file of another size, and the build replaces it
    p, _ = plan(tmp_path)
    assert [v.video.id for v in p.videos if not v.published] == ["ceo-bye"] and p.stale
    build(tmp_path, make_registry())
    assert damaged.read_bytes() == good
    linked = (
        out / "cto-bye.mp4"
    )  # a link where the output goes is replaced by a copy (editing it never edits the cache)
    target = tmp_path / "elsewhere.mp4"
    target.write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(target)
    build(tmp_path, make_registry())
    assert not linked.is_symlink() and linked.read_bytes() == target.read_bytes()


def test_stage_file_error_fails_only_its_own_video(tmp_path: Path) -> None:
    """A full disk or an unreadable file while one job of a chunk runs: that job fails, named for its video, and
    the chunk's other jobs go on (not one message copied onto every video of the chunk)."""
    import errno

    from renderer.base import BackendError, StepJob, run_each

    jobs = [StepJob(stage="mux", key=k, settings={}, inputs={}, out_dir=tmp_path, label=f"videos.{k}") for k in "ab"]

    def one(job: StepJob) -> dict:
        if job.key == "a":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "video.mp4"))
        return {"ok": True}

    first, second = run_each(jobs, one)
    assert isinstance(first, BackendError) and str(first).startswith("videos.a: No space left on device (")
    assert second == {"ok": True}


def test_sweep_removes_only_dead_runs_temporary_files(tmp_path: Path) -> None:
    """Half-written publish/report files of a killed run are removed; a live run's, and other files, stay."""
    from batch.cache import sweep_stale_tmp

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".a.mp4.{dead_pid}.0a1b2c.tmp", tmp_path / f".a.png.{dead_pid}.123456.tmp.png"]
    live = tmp_path / f".b.mp4.{os.getpid()}.0a1b2c.tmp"
    mine = [tmp_path / "a.mp4", tmp_path / ".hidden.tmp"]
    recent = tmp_path / f".c.mp4.{dead_pid}.0a1b2c.tmp"  # maybe another host's run, still writing
    for path in (*stale, live, *mine, recent):
        path.write_bytes(b"x")
    for path in (*stale, live, *mine):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert sweep_stale_tmp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, *mine, recent))


def test_cache_lock_without_a_writable_folder_does_not_stop_a_build(tmp_path: Path) -> None:
    """A cache whose folder cannot take the lock file (read-only, or not a folder): builds and gc are not blocked."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = Cache(blocker / "cache")
    with cache.in_use() as shared:
        assert shared is True
    with cache.in_use(exclusive=True) as alone:
        assert alone is True
    held = Cache(tmp_path / "cache")
    with held.in_use(), held.in_use(exclusive=True) as alone:  # a build holds it: gc is refused
        assert alone is False


def test_stage_library_error_or_bug_fails_only_its_own_video(tmp_path: Path) -> None:
    """A media library's refusal and a plain bug in one job become that job's labelled error; the others go on."""
    import av

    from renderer.base import BackendError, StepJob, run_each

    jobs = [StepJob(stage="mux", key=k, settings={}, inputs={}, out_dir=tmp_path, label=f"videos.{k}") for k in "abc"]

    def one(job: StepJob) -> dict:
        if job.key == "a":
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        if job.key == "b":
            raise KeyError("width")
        return {"ok": True}

    first, second, third = run_each(jobs, one)
    assert isinstance(first, BackendError) and str(first).startswith("videos.a: FFmpeg: ")
    assert isinstance(second, BackendError) and "videos.b: internal error: KeyError: 'width'" in str(second)
    assert third == {"ok": True}


def test_cache_sweep_waits_an_hour_for_another_hosts_step(tmp_path: Path) -> None:
    """A step folder of this host's dead run goes at once; another host's (a cache shared over NFS), whose PID
    cannot be checked here, only after an hour untouched."""
    cache = Cache(tmp_path / "cache")
    mine = cache.new_tmp("a" * 64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    local_dead = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{int(dead.stdout)}.", 1))
    mine.rename(local_dead)
    fresh = cache.tmp / f"{'b' * 16}.{int(dead.stdout)}.0123abcd.other-host"
    stale = cache.tmp / f"{'c' * 16}.{int(dead.stdout)}.0123abcd.other-host"
    for folder in (fresh, stale):
        folder.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert cache.sweep_tmp() == 2
    assert [p.name for p in cache.tmp.iterdir()] == [fresh.name]


def test_model_that_fails_to_load_is_tried_once_per_stage(tmp_path: Path) -> None:
    """Missing or broken weights: the first job's load fails, the others get the same error without loading again
    (each its own copy, to be labelled with its own video); the next stage (after release) tries again."""
    from renderer.base import MissingWeightsError, ModelPool, labelled

    calls = []

    def loader():
        calls.append(1)
        raise MissingWeightsError("weights missing: gfpgan/GFPGANv1.4.pth", "run `make checkpoints`")

    pool = ModelPool()
    errors = []
    for label in ("videos.a", "videos.b"):
        with pytest.raises(MissingWeightsError) as info:
            pool.get("gfpgan", "cpu", "float32", loader)
        errors.append(labelled(info.value, label))
    assert len(calls) == 1
    assert [str(e).split(":")[0] for e in errors] == ["videos.a", "videos.b"]
    pool.release()
    with pytest.raises(MissingWeightsError):
        pool.get("gfpgan", "cpu", "float32", loader)
    assert len(calls) == 2
