"""End-to-end figures for the offline pipeline (voice → puppet → MP4) through the real runner.

1. Seconds of compute per second of video for each stage (voice, animate, mux) and together, at 256 and 512, with
   each offline voice: Hibari (the demo's women) and Piper (the default, male; its model alone costs about 0.08 s
   of CPU per second of speech, on one thread or two). `--voice` picks one. Goal on a 2-core machine: together
   ≤ 0.1 at 256 and ≤ 0.3 at 512 (issue 24). Printed twice: wall time per stage (what the runner records) and the process's CPU time
   for the whole build (user + system, all threads): on a machine shared with other jobs the wall time grows with
   their load, the CPU time much less.
2. Warm run vs one process per clip: N short clips built in one `dhbatch build` (each model loaded once) against
   N separate processes (each reloading Python, Piper and dlib — the seed's way).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batch.cache import Cache  # noqa: E402
from batch.manifest import load_manifest  # noqa: E402
from batch.plan import plan_manifest  # noqa: E402
from batch.run import Runner  # noqa: E402

TEXT = (
    "Good evening and welcome to the nightly build. Tonight we render every character in the catalogue. "
    "Each portrait learns to speak from a single photograph and a short script. "
    "The voice is synthesised offline, the face follows the sound, and the video is encoded as it is drawn. "
    "Nothing is downloaded, and nothing is rendered twice."
)


def project(root: Path, size: int, texts: list[str], voice: str = "piper") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "manifests" / "portraits" / "astronaut.jpg", root / "face.jpg")
    scripts = "\n".join(f'  s{i}: {{text: "{t}"}}' for i, t in enumerate(texts))
    (root / "m.yaml").write_text(
        f"version: 1\ndefaults:\n  voice: {{engine: {voice}}}\n  video: {{renderer: puppet, size: {size}}}\n"
        f"characters:\n  a: {{image: face.jpg}}\nscripts:\n{scripts}\n"
        "matrix: {characters: all, scripts: all}\n"
    )
    return root / "m.yaml"


def build(root: Path, size: int, texts: list[str], voice: str) -> tuple[list, float]:
    """Build clips through the runner in one run; returns (their video reports, the process's CPU seconds)."""
    path = project(root, size, texts, voice)
    cache = Cache(root / "build" / "cache")
    plan = plan_manifest(load_manifest(path), cache, build_dir=root / "build", checkpoints=root / "ck")
    cpu = time.process_time()
    result = Runner(plan, cache, checkpoints=root / "ck", device="cpu", progress=False).run()
    cpu = time.process_time() - cpu
    assert all(v.status == "built" for v in result.videos), [v.error for v in result.videos]
    return sorted(result.videos, key=lambda v: v.id), cpu


def duration(video: object) -> float:
    return next(s for s in video.steps if s.stage == "mux").info["video_duration"]


def stage_figures(size: int, voice: str) -> None:
    """Cold: one clip in a run of its own, loading the models (dlib, the voice) included (the first run in the
    process also imports the libraries). Warm: what a second clip adds to a run (the CPU time of a run with both
    clips less that of a run with the first alone, both after the cold one, so neither imports anything): the
    per-second figure of a long build. The wall time per stage is the runner's own record for that clip."""
    second = TEXT.replace("Good evening", "Good morning")
    with tempfile.TemporaryDirectory() as tmp:
        (alone,), cpu_cold = build(Path(tmp) / "cold", size, [TEXT], voice)
        _, cpu_one = build(Path(tmp) / "one", size, [TEXT], voice)
        both, cpu_two = build(Path(tmp) / "two", size, [TEXT, second], voice)
    for label, video, cpu in (("cold", alone, cpu_cold), ("warm", both[1], cpu_two - cpu_one)):
        seconds = duration(video)
        per = {s.stage: s.seconds / seconds for s in video.steps}
        goal = GOALS[size]
        verdict = ("OK" if cpu / seconds <= goal else "SLOW") if label == "warm" else "models loading included"
        print(
            f"size {size}, {voice}, {label}: {seconds:.1f} s of video; wall s per s of video "
            + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
            + f" (together {sum(per.values()):.3f}); CPU s per s of video {cpu / seconds:.3f} (goal ≤ {goal}: "
            + f"{verdict})"
        )


GOALS = {256: 0.1, 512: 0.3}


def warm_vs_cold(n: int) -> None:
    texts = [f"Clip number {i}. Thank you for watching this short message." for i in range(n)]
    dhbatch = [sys.executable, "-m", "batch.cli", "-q", "build"]
    with tempfile.TemporaryDirectory() as tmp:
        warm = project(Path(tmp) / "warm", 256, texts)
        t0 = time.perf_counter()
        subprocess.run([*dhbatch, str(warm), "--device", "cpu"], check=True)
        warm_s = time.perf_counter() - t0
        cold = project(Path(tmp) / "cold", 256, texts)
        t0 = time.perf_counter()
        for i in range(n):
            subprocess.run([*dhbatch, str(cold), "--device", "cpu", "--only", f"a-s{i}"], check=True)
        cold_s = time.perf_counter() - t0
    print(
        f"{n} clips: one warm run {warm_s:.1f}s, one process per clip {cold_s:.1f}s — {cold_s / warm_s:.2f}× faster warm"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--voice", choices=("hibari", "piper", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=1, help="measure each size this many times (the machine is shared)")
    args = ap.parse_args()
    for _ in range(args.repeat):
        for size in (256, 512):
            for voice in ("hibari", "piper") if args.voice == "both" else (args.voice,):
                stage_figures(size, voice)
    if args.clips:
        warm_vs_cold(args.clips)


if __name__ == "__main__":
    main()
