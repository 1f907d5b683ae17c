"""Builds on a real Ray cluster started on this machine (one for the module): the same keys and bytes as a local
build, warm models per actor, GPU actors on a GPU-like resource, a worker killed mid-chunk, Ctrl-C, and an address
that cannot be reached."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batch.cache import Cache
from batch.manifest import load_manifest
from batch.plan import plan_manifest
from batch.run import Runner, RunResult
from tests._fake_stages import make_registry
from tests._project import write_project

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent

#: Eight videos: four characters (each its own portrait file) × two scripts that name them.
EIGHT = """\
version: 1
defaults:
  llm: {engine: none}
  voice: {engine: piper}
  video: {renderer: puppet}
characters:
  a: {name: Ann, image: a.png}
  b: {name: Bob, image: b.png}
  c: {name: Cy, image: c.png}
  d: {name: Di, image: d.png}
scripts:
  hello: {text: "Hello, I am {{ character.name }}."}
  bye: {text: "Goodbye from {{ character.name }}."}
matrix:
  characters: [a, b, c, d]
  scripts: [hello, bye]
"""


@pytest.fixture(scope="module")
def cluster() -> Any:
    """One local Ray for the module: two CPU slots and four GPU-like slots ("fake_gpu") to schedule GPU actors on."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        resources={"fake_gpu": 4},
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024 * 1024,
        runtime_env={"env_vars": {"PYTHONPATH": path}},  # the actors import this checkout and tests._fake_stages
    )
    yield ray
    ray.shutdown()


class CountingCache(Cache):
    """The real cache, counting commits per key (a step committed twice would show here)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.commits: collections.Counter[str] = collections.Counter()

    def commit(self, stage: str, key: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.commits[key] += 1
        return super().commit(stage, key, *args, **kwargs)


def _eight(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for c in "abcd":
        (root / f"{c}.png").write_bytes(f"portrait {c}".encode())
    (root / "m.yaml").write_text(EIGHT)
    return root / "m.yaml"


def _build(root: Path, registry: dict[str, Any] | None, executor: Any = None, **kwargs: Any) -> RunResult:
    manifest = load_manifest(root / "m.yaml")
    cache = kwargs.pop("cache", None) or CountingCache(root / "build" / "cache")
    plan = plan_manifest(manifest, cache, build_dir=root / "build", checkpoints=root / "checkpoints")
    runner = Runner(
        plan, cache, checkpoints=root / "checkpoints", device="cpu", progress=False, stages=registry, executor=executor
    )
    result = runner.run()
    result.cache = cache  # type: ignore[attr-defined]
    return result


def _ray(root: Path, registry: dict[str, Any] | None, **kwargs: Any) -> Any:
    from batch.executors.ray import RayExecutor

    return RayExecutor("ray", scratch=root / "build" / "cache" / "tmp", device="cpu", stages=registry, **kwargs)


def _outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "build" / "m").glob("*.mp4"))}


def _timed(registry: dict[str, Any], log: Path, slow: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """Wrap the fake stages: each chunk logs `stage start end pid keys` (from whichever process runs it); chunks of
    stage `slow` take `seconds` longer, and log `start` first (so a test can kill the process at work)."""

    def wrap(fn: Any) -> Any:
        def stage(jobs: list[Any], pool: Any) -> list[Any]:
            t0 = time.time()
            keys = ",".join(j.key[:12] for j in jobs)
            if jobs[0].stage == slow:
                with open(log, "a") as fh:
                    fh.write(f"start {os.getpid()} {keys}\n")
                time.sleep(seconds)
            out = fn(jobs, pool)
            with open(log, "a") as fh:
                fh.write(f"{jobs[0].stage} {t0} {time.time()} {os.getpid()} {keys}\n")
            return out

        return stage

    return {target: wrap(fn) for target, fn in registry.items()}


def test_cluster_demo_has_the_local_keys_and_bytes(cluster: Any, tmp_path: Path) -> None:
    """The demo (Piper voice, puppet, mux: the real stages, in Ray actors) built with --cluster gives the same step
    keys and byte-identical MP4s as a local build, and the report says where each step ran."""
    from batch.cli import main

    local, remote = tmp_path / "local", tmp_path / "ray"
    demo = [str(REPO / "manifests" / "demo.yaml"), "--device", "cpu", "--only", "eileen-recorded", "grace-hello"]
    assert main(["-q", "build", *demo, "--build-dir", str(local)]) == 0  # a recording and a script: every stage
    assert main(["-q", "build", *demo, "--build-dir", str(remote), "--cluster", "ray"]) == 0
    for name in ("cache/steps", "demo"):
        assert sorted(p.relative_to(local).as_posix() for p in (local / name).rglob("*") if p.name != "step.json") == (
            sorted(p.relative_to(remote).as_posix() for p in (remote / name).rglob("*") if p.name != "step.json")
        )
    videos = sorted((local / "demo").glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        assert video.read_bytes() == (remote / "demo" / video.name).read_bytes(), video.name
    report = json.loads((remote / "demo" / "report.json").read_text())
    steps = [s for v in report["videos"] for s in v["steps"] if s["status"] == "ran"]
    assert {s["worker"] for s in steps} == {"cpu-0", "cpu-1"} and all(s["node"] and s["device"] for s in steps)
    assert (
        report["device"] == "a local Ray: 2 CPU workers"
        and ", queued " in (remote / "demo" / "report.html").read_text()
    )
    # --jobs sets how many CPU workers the cluster gives the build (default: its CPUs).
    assert (
        main(["-q", "build", *demo, "--build-dir", str(remote), "--cluster", "ray", "--jobs", "1", "--force", "mux"])
        == 0
    )
    report = json.loads((remote / "demo" / "report.json").read_text())
    assert report["device"] == "a local Ray: 1 CPU worker"
    assert {s["worker"] for v in report["videos"] for s in v["steps"] if s["status"] == "ran"} == {"cpu-0"}


def test_cluster_two_cpu_actors_share_eight_videos_each_loading_once(cluster: Any, tmp_path: Path) -> None:
    """Two CPU actors share 24 steps: both work, each loads each model once (the report's model_loads), outputs
    travel as bytes and equal a local build's; stages overlap across videos (a render starts before the last voice
    ends)."""
    local, remote = _eight(tmp_path / "local").parent, _eight(tmp_path / "ray").parent
    _build(local, make_registry())
    log = tmp_path / "log"
    registry = _timed(make_registry(), log, slow="voice", seconds=0.3)
    result = _build(remote, registry, _ray(remote, registry, transfer="bytes"))
    assert [v.status for v in result.videos] == ["built"] * 8
    assert _outputs(remote) == _outputs(local) and len(_outputs(local)) == 8
    ran = [s for v in result.videos for s in v.steps if s.status == "ran"]
    assert {s.worker for s in ran} == {"cpu-0", "cpu-1"}
    loads = result.model_loads
    assert set(loads) == {f"cpu-{i}/fake-{stage}/cpu/float32" for i in (0, 1) for stage in ("voice", "animate", "mux")}
    assert set(loads.values()) == {1}
    assert len({line.split()[3] for line in log.read_text().splitlines() if not line.startswith("start")}) == 2
    chunks = [line.split() for line in log.read_text().splitlines() if not line.startswith("start")]
    last_voice = max(float(c[2]) for c in chunks if c[0] == "voice")
    assert any(float(c[1]) < last_voice for c in chunks if c[0] == "animate")
    assert max(result.cache.commits.values()) == 1


def test_cluster_gpu_actors_one_per_device_with_warm_pools(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four GPU-like slots (a custom resource): four GPU actors, one per device; the GPU renderer's chunks spread
    over them, each actor loads the renderer once; CPU stages stay on the CPU actors; a failing step is not
    retried."""
    from batch.stages import sadtalker_files

    path = _eight(tmp_path)
    path.write_text(path.read_text().replace("renderer: puppet", "renderer: sadtalker").replace("Bob", "FAIL"))
    for name in sadtalker_files(256, "crop"):
        (tmp_path / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoints" / name).write_bytes(b"weights")
    log = tmp_path / "log"
    registry = _timed(make_registry(log=tmp_path / "steps"), log, slow="animate", seconds=0.3)
    result = _build(tmp_path, registry, _ray(tmp_path, registry, gpu_resource="fake_gpu"))
    status = collections.Counter(v.status for v in result.videos)
    assert status == {"built": 6, "failed": 2}
    errors = {v.error for v in result.videos if v.status == "failed"}  # a worker's error reads like a local one's
    assert errors == {f"voice: scripts.{s}: the text asks to fail — remove FAIL" for s in ("hello", "bye")}
    ran = [s for v in result.videos for s in v.steps if s.status == "ran"]
    renders = [s for s in ran if s.stage == "animate"]
    gpu_workers = {s.worker for s in renders}
    assert len(gpu_workers) >= 2 and all(w.startswith("gpu-") for w in gpu_workers)
    devices = {s.worker: s.device for s in renders}
    assert len(set(devices.values())) == len(devices)  # one actor per device
    assert all(d.startswith("fake_gpu:") for d in devices.values())
    assert {s.worker for s in ran if s.stage in ("voice", "mux")} <= {"cpu-0", "cpu-1"}
    animate_loads = {k: n for k, n in result.model_loads.items() if "fake-animate" in k}
    assert set(animate_loads) == {f"{w}/fake-animate/cpu/float32" for w in gpu_workers}
    assert set(animate_loads.values()) == {1}
    failing = [line for line in (tmp_path / "steps").read_text().splitlines() if line.startswith("voice ")]
    assert len(failing) == len({line.split()[1] for line in failing})  # every voice ran once, the failing ones too
    assert result.device == "a local Ray: 4 fake_gpu + 2 CPU workers"


def test_cluster_worker_killed_mid_chunk_is_replaced(cluster: Any, tmp_path: Path) -> None:
    """SIGKILL to the actor process running a chunk (half its output written): the chunk runs again elsewhere, the
    build finishes with every video as a local build makes it, and no step is committed twice."""
    local, remote = _eight(tmp_path / "local").parent, _eight(tmp_path / "ray").parent
    _build(local, make_registry())
    log = tmp_path / "log"
    registry = _timed(make_registry(delay=0.2), log, slow="animate", seconds=0.6)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            starts = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
            for start in (s for s in starts if s[0] == "start"):
                os.kill(int(start[1]), signal.SIGKILL)
                killed.append(int(start[1]))
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    result = _build(remote, registry, _ray(remote, registry))
    thread.join()
    assert killed, "no animate chunk started"
    assert [v.status for v in result.videos] == ["built"] * 8
    assert _outputs(remote) == _outputs(local)
    assert max(result.cache.commits.values()) == 1 and len(result.cache.commits) == 24
    pids = {line.split()[3] for line in log.read_text().splitlines() if line.startswith("animate")}
    assert str(killed[0]) not in pids  # the killed chunk finished elsewhere (or in the restarted actor)


def test_cluster_jobs_reported_as_they_finish_survive_their_worker(cluster: Any, tmp_path: Path) -> None:
    """A stage that reports each job as it finishes (`done`): each reaches the driver at once (`Chunk.on_result`,
    which commits it), and when the worker is killed mid-chunk only the jobs not reported yet run again."""
    from batch.executors import Chunk
    from renderer.base import StepJob

    log = tmp_path / "log"

    def stage(jobs: list[Any], pool: Any, done: Any = None) -> list[Any]:
        out = []
        for i, job in enumerate(jobs):
            (Path(job.out_dir) / "video.mp4").write_bytes(job.key.encode())
            out.append({"made_by": os.getpid()})
            done(i, out[-1])
            with open(log, "a") as fh:
                fh.write(f"{job.key} {os.getpid()}\n")
            time.sleep(0.4)
        return out

    executor = _ray(tmp_path, {"tests:stage": stage}, transfer="bytes")
    jobs = []
    for i in range(4):
        (tmp_path / f"out{i}").mkdir()
        jobs.append(StepJob(stage="mux", key=f"job{i}", settings={}, inputs={}, out_dir=tmp_path / f"out{i}"))
    reported: list[int] = []
    chunk = Chunk(0, "mux", "tests:stage", jobs, gpu=False, submitted=time.monotonic())
    chunk.on_result = lambda index, result, where: reported.append(index)
    killed: list[int] = []

    def killer() -> None:  # once job1 is made, kill the process making them (job0 has been reported by then)
        deadline = time.time() + 60
        while time.time() < deadline:
            made = dict(line.split() for line in log.read_text().splitlines()) if log.exists() else {}
            if "job1" in made:
                os.kill(int(made["job1"]), signal.SIGKILL)
                killed.append(int(made["job1"]))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        executor.submit(chunk)
        results: list[Any] = []
        while not results:
            results = executor.wait()
    finally:
        thread.join()
        executor.close()
    assert killed
    made = collections.Counter(line.split()[0] for line in log.read_text().splitlines())
    assert made["job0"] == 1 and made["job3"] == 1  # job0 was not made again; job3 only after the kill
    assert reported.count(0) == 1 and sorted(set(reported)) == [0, 1, 2, 3]
    assert [(tmp_path / f"out{i}" / "video.mp4").read_bytes() for i in range(4)] == [
        f"job{i}".encode() for i in range(4)
    ]
    assert len(results[0].results) == 4 and results[0].results[3]["made_by"] != killed[0]


def test_cluster_ctrl_c_keeps_what_finished_and_the_next_run_resumes(cluster: Any, tmp_path: Path) -> None:
    """Ctrl-C while actors work: the run stops, nothing half-built is kept, what finished is cached; the next run
    builds only the rest."""
    root = _eight(tmp_path).parent
    log = tmp_path / "log"
    registry = _timed(make_registry(), log, slow="animate", seconds=0.5)

    def interrupt() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if log.exists() and sum(line.startswith("animate") for line in log.read_text().splitlines()) >= 2:
                signal.raise_signal(signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=interrupt)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        _build(root, registry, _ray(root, registry))
    thread.join()
    tmp = root / "build" / "cache" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())
    cache = CountingCache(root / "build" / "cache")
    plan = plan_manifest(load_manifest(root / "m.yaml"), cache, build_dir=root / "build", checkpoints=root / "x")
    done = {s.key for v in plan.videos for s in v.steps if cache.is_cached(s.stage, s.key)}
    assert done and any(v.stale for v in plan.videos)
    result = _build(root, make_registry(), cache=cache)
    assert {v.status for v in result.videos} <= {"built", "cached"} and not result.failed
    assert not done & set(cache.commits)  # what the interrupted run finished was not built again


@pytest.mark.parametrize("via_env", [False, True], ids=["ray-client-address", "auto-with-RAY_ADDRESS"])
def test_cluster_unreachable_address_is_a_usage_error(tmp_path: Path, via_env: bool) -> None:
    """An address where no cluster answers, given on the command line or in RAY_ADDRESS for `auto`: exit 2 with
    what to do, in seconds."""
    write_project(tmp_path)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address, env = f"ray://127.0.0.1:{port}", dict(os.environ)
    if via_env:
        address, env["RAY_ADDRESS"] = "auto", f"127.0.0.1:{port}"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "batch.cli", "build", str(tmp_path / "m.yaml"), "--cluster", address],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr and time.time() - t0 < 30
    assert not list((tmp_path / "build" / "cache").rglob("step.json"))


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="starts its own Ray in a subprocess: RUN_SLOW=1")
def test_cluster_cli_killed_with_sigterm_exits_143_and_resumes(tmp_path: Path) -> None:
    """`build --cluster ray` sent SIGTERM mid-build (ray.init replaces the handler; the CLI's is put back): it stops
    as Ctrl-C does, exit 143 with the CLI's message and no temporary folder left, and the same command finishes."""
    cmd = [sys.executable, "-m", "batch.cli", "build", str(REPO / "manifests" / "demo.yaml"), "--device", "cpu"]
    cmd += ["--build-dir", str(tmp_path), "--cluster", "ray"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:  # progress lines: the first steps are handed to the workers
        lines.append(line)
        if "steps to run" in line:
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, "".join(lines) + rest
    assert "interrupted: nothing partial was kept" in rest and "SIGTERM received" not in rest
    assert not any((tmp_path / "cache" / "tmp").iterdir())
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "5/5 videos ready" in again.stdout
