"""A build on Ray against the local runner, and what a render farm of 8 or 64 GPUs would make of 10,000 videos.

1. The demo manifest ×N (its two portraits × two scripts, N times with different words, plus the recording) built by
   `dhbatch build` in one local process (`--jobs 1`, and `--jobs 2` for reference) and with `--cluster ray` (a local
   Ray started by the build: two CPU actors on this 2-core machine), each from an empty build folder. Goal: the
   cluster build ≥ 1.7× faster than one local process; Ray's start-up is measured on its own and stated. The MP4s
   must be byte-identical.
2. From per-stage costs (the CPU stages as measured in part 1, scaled to 30-second videos; the GPU stages from the
   H200 figures in bench/results/2026-11-26-h200*), an event simulation of 10,000 videos on 8 and 64 GPUs with the
   executor's policy (GPU chunks to GPU actors, CPU steps to CPU actors, later stages first, a model load per
   actor): makespan, GPU utilisation, and what bounds it.

usage: python bench/bench_cluster.py [--copies N] [--repeat R] [--skip-build]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: GPU costs measured on an H200 (bench/results/2026-11-26-h200b: the renderer at 256, batch 16, float16, graphs;
#: 2026-11-26-h200: Stable Diffusion 2.1 base through the image stage at batch 16).
RENDER_FPS = 287.5
#: Per clip, around the render loop (preparation, 3DMM coefficients, encoder): 20 warm clips took 16.9 s against a
#: 10.0 s render loop (h200b, call 3).
RENDER_OVERHEAD_S = (16.9 - 10.0) / 20
PORTRAIT_S = 0.193
#: Model loads per actor, first use (assumed, not measured here: SadTalker's graph capture and SD's weights).
LOAD_S = {"image": 10.0, "animate": 10.0, "voice": 1.0, "mux": 0.0}
VIDEO_S = 30.0
FPS = 25


def demo_copies(root: Path, copies: int) -> Path:
    """The demo's characters and files, with its two scripts N times over (other words each time: other keys)."""
    for sub in ("portraits", "audio"):
        shutil.copytree(REPO / "manifests" / sub, root / sub)
    text = (REPO / "manifests" / "demo.yaml").read_text()
    head, _, _ = text.partition("scripts:")
    scripts, names = [], []
    for i in range(copies):
        scripts.append(
            f"  hello{i}:\n    text: Hello, I am {{{{ character.name }}}}. Welcome to {{{{ company }}}}, part {i + 1}.\n"
            f"  thanks{i}:\n    text: Thank you for watching part {i + 1}. See you next time at {{{{ company }}}}!\n"
        )
        names += [f"hello{i}", f"thanks{i}"]
    body = (
        "scripts:\n" + "".join(scripts) + "  recorded:\n    audio: audio/greeting.wav\n"
        f"matrix:\n  characters: [eileen, grace]\n  scripts: [{', '.join(names)}]\n"
        "videos:\n  - id: eileen-recorded\n    character: eileen\n    script: recorded\n"
    )
    path = root / "demo.yaml"
    path.write_text(head + body)
    return path


def _cpu() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def build(manifest: Path, out: Path, *extra: str) -> tuple[float, float]:
    """Seconds a `dhbatch build` took, and the share of the machine's CPU time that stayed idle meanwhile (near 0:
    the machine was saturated, by this build or by others)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "batch.cli", "-q", "build", str(manifest), "--build-dir", str(out), "--device", "cpu"]
    idle0, total0 = _cpu()
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    idle1, total1 = _cpu()
    if proc.returncode != 0:
        sys.exit(f"build {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, (idle1 - idle0) / max(1, total1 - total0)


def ray_startup() -> float:
    code = (
        "import time, ray\nt = time.perf_counter()\nray.init(include_dashboard=False, logging_level='ERROR')\n"
        "ray.get(ray.remote(lambda: 1).remote())\nprint(time.perf_counter() - t)\nray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def stage_costs(build_dir: Path, name: str) -> dict[str, float]:
    """CPU seconds per second of video for each stage, from a local build's report and its WAVs."""
    report = json.loads((build_dir / name / "report.json").read_text())
    per: dict[str, list[float]] = defaultdict(list)
    for video in report["videos"]:
        steps = {s["stage"]: s for s in video["steps"]}
        audio = next((s for s in ("voice", "audio") if s in steps), None)
        key = steps[audio]["key"]
        with wave.open(str(build_dir / "cache" / "steps" / audio / key[:2] / key / "speech.wav")) as wav:
            length = wav.getnframes() / wav.getframerate()
        for stage, step in steps.items():
            if step["status"] == "ran":
                per[stage].append(step["seconds"] / length)
    return {stage: sum(v) / len(v) for stage, v in per.items()}


def _stage_seconds(build_dir: Path) -> float:
    report = json.loads((build_dir / "demo" / "report.json").read_text())
    return sum(s["seconds"] for v in report["videos"] for s in v["steps"] if s["status"] == "ran")


def part1(copies: int, repeat: int) -> dict[str, float]:
    """Each way built `repeat` times, the ways taking turns (the machine's other load changes by the minute); the
    medians are compared, and the compute the stages did (the builds' reports) beside the wall times."""
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        root = Path(tmp)
        manifest = demo_copies(root / "project", copies)
        videos = 4 * copies + 1
        print(f"== 1. the demo ×{copies}: {videos} videos, every step built (load average {os.getloadavg()[0]:.1f})")
        start = ray_startup()
        ways = {"local": (), "jobs2": ("--jobs", "2"), "ray": ("--cluster", "ray")}
        runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for i in range(repeat):
            for way, extra in ways.items():
                runs[way].append(build(manifest, root / f"{way}{i}", *extra))
        wall = {way: statistics.median(w for w, _ in r) for way, r in runs.items()}
        idle = {way: statistics.median(i for _, i in r) for way, r in runs.items()}
        work = {way: _stage_seconds(root / f"{way}0") for way in ways}
        local, jobs2, ray = wall["local"], wall["jobs2"], wall["ray"]
        print(f"(medians of {repeat}; idle: the machine's CPU left idle meanwhile; work: the stages' seconds summed)")
        print(
            f"local, one process (--jobs 1):  {local:6.1f} s          idle {idle['local']:.0%}  work {work['local']:.1f} s"
        )
        print(
            f"local, --jobs 2:                {jobs2:6.1f} s  {local / jobs2:.2f}x   idle {idle['jobs2']:.0%}  work {work['jobs2']:.1f} s"
        )
        print(
            f"--cluster ray, 2 CPU actors:    {ray:6.1f} s  {local / ray:.2f}x   idle {idle['ray']:.0%}  work {work['ray']:.1f} s (goal >= 1.7x)"
        )
        print(
            f"Ray's start-up (ray.init and a first task, alone): {start:.1f} s; without it {local / (ray - start):.2f}x"
        )
        same = all(
            p.read_bytes() == (root / "ray0" / "demo" / p.name).read_bytes()
            for p in (root / "local0" / "demo").glob("*.mp4")
        )
        print(f"MP4s byte-identical local vs cluster: {same}")
        ray_report = json.loads((root / "ray0" / "demo" / "report.json").read_text())
        print(f"model loads on the cluster: {ray_report['model_loads']}")
        return stage_costs(root / "local0", "demo")


def simulate(videos: int, gpus: int, cpus: int, costs: dict[str, float], per_character: int = 10) -> dict[str, float]:
    """Event simulation of the Ray executor's policy: a video's voice (CPU) and its character's portrait (GPU) come
    first, then its render (GPU), then the mux (CPU); free workers take the latest-stage ready step first."""
    order = {"image": 0, "voice": 1, "animate": 2, "mux": 3}
    kind = {"image": "gpu", "voice": "cpu", "animate": "gpu", "mux": "cpu"}
    cost = {
        "image": PORTRAIT_S,
        "voice": costs.get("voice", 0.1) * VIDEO_S,
        "animate": VIDEO_S * FPS / RENDER_FPS + RENDER_OVERHEAD_S,
        "mux": costs.get("mux", 0.02) * VIDEO_S,
    }
    characters = max(1, videos // per_character)
    ready: dict[str, list] = {"gpu": [], "cpu": []}
    seq = 0

    def push(stage: str, item: int) -> None:
        nonlocal seq
        heapq.heappush(ready[kind[stage]], (-order[stage], seq, stage, item))
        seq += 1

    for c in range(characters):
        push("image", c)
    for v in range(videos):
        push("voice", v)
    portrait_done, voice_done = set(), set()
    waiting: dict[int, list[int]] = defaultdict(list)  # character -> videos whose voice is done
    free = {"gpu": [(0.0, f"gpu{i}") for i in range(gpus)], "cpu": [(0.0, f"cpu{i}") for i in range(cpus)]}
    for heap in free.values():
        heapq.heapify(heap)
    loaded: set[tuple[str, str]] = set()
    events: list = []  # (time, seq, stage, item, worker kind, worker)
    busy = {"gpu": 0.0, "cpu": 0.0}
    now = end = 0.0
    while True:
        for k in ("gpu", "cpu"):
            while ready[k] and free[k] and free[k][0][0] <= now:
                _, worker = heapq.heappop(free[k])
                _, _, stage, item = heapq.heappop(ready[k])
                took = cost[stage] + (0.0 if (worker, stage) in loaded else LOAD_S[stage])
                loaded.add((worker, stage))
                busy[k] += took
                heapq.heappush(events, (now + took, seq, stage, item, k, worker))
                seq += 1
        if not events:
            break
        now, _, stage, item, k, worker = heapq.heappop(events)
        end = max(end, now)
        heapq.heappush(free[k], (now, worker))
        if stage == "image":
            portrait_done.add(item)
            for v in waiting.pop(item, []):
                push("animate", v)
        elif stage == "voice":
            voice_done.add(item)
            if item // per_character in portrait_done:
                push("animate", item)
            else:
                waiting[item // per_character].append(item)
        elif stage == "animate":
            push("mux", item)
    gpu_work = characters * cost["image"] + videos * cost["animate"]
    cpu_work = videos * (cost["voice"] + cost["mux"])
    return {
        "makespan": end,
        "gpu_util": busy["gpu"] / (gpus * end),
        "cpu_util": busy["cpu"] / (cpus * end),
        "gpu_bound": gpu_work / gpus,
        "cpu_bound": cpu_work / cpus,
        "render_s": cost["animate"],
        "voice_s": cost["voice"],
    }


def part2(costs: dict[str, float]) -> None:
    print(
        f"\n== 2. 10,000 videos of {VIDEO_S:.0f} s (a portrait per 10 videos), simulated; CPU stages from part 1: "
        + ", ".join(f"{s} {c:.3f} s/s of video" for s, c in sorted(costs.items()))
    )
    print(
        f"GPU: render {RENDER_FPS} frames/s + {RENDER_OVERHEAD_S:.2f} s per clip, portrait {PORTRAIT_S} s (H200); "
        f"model loads per actor {LOAD_S}"
    )
    for gpus in (8, 64):
        for cpus_per_gpu in (1, 4, 16):
            r = simulate(10_000, gpus, gpus * cpus_per_gpu, costs)
            bound = "GPUs" if r["gpu_bound"] >= r["cpu_bound"] else "CPU stages (voice, mux)"
            print(
                f"{gpus:3d} GPUs, {gpus * cpus_per_gpu:4d} CPU actors: makespan {r['makespan'] / 3600:6.2f} h, "
                f"GPU utilisation {r['gpu_util']:5.1%}, CPU {r['cpu_util']:5.1%}; bound by {bound} "
                f"(GPU work/GPU {r['gpu_bound'] / 3600:.2f} h, CPU work/actor {r['cpu_bound'] / 3600:.2f} h)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="the demo's scripts this many times (4N+1 videos)")
    parser.add_argument("--repeat", type=int, default=1, help="build each way this many times, taking turns")
    parser.add_argument(
        "--skip-build", action="store_true", help="only the simulation (CPU costs: voice 0.15, mux 0.02)"
    )
    args = parser.parse_args()
    costs = {"voice": 0.15, "mux": 0.02} if args.skip_build else part1(args.copies, args.repeat)
    part2(costs)


if __name__ == "__main__":
    main()
