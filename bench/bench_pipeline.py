"""End-to-end figures for the offline pipeline (Piper → puppet → MP4) through the real runner.

1. Seconds of compute per second of video for each stage (voice, animate, mux) and together, at 256 and 512.
   Goal on a 2-core machine: together ≤ 1.0 at 256 and ≤ 2.0 at 512.
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


def project(root: Path, size: int, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "manifests" / "portraits" / "astronaut.jpg", root / "face.jpg")
    scripts = "\n".join(f'  s{i}: {{text: "{t}"}}' for i, t in enumerate(texts))
    (root / "m.yaml").write_text(
        f"version: 1\ndefaults:\n  video: {{renderer: puppet, size: {size}}}\n"
        f"characters:\n  a: {{image: face.jpg}}\nscripts:\n{scripts}\n"
        "matrix: {characters: all, scripts: all}\n"
    )
    return root / "m.yaml"


def stage_figures(size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = project(Path(tmp), size, [TEXT])
        manifest = load_manifest(path)
        cache = Cache(Path(tmp) / "build" / "cache")
        plan = plan_manifest(manifest, cache, build_dir=Path(tmp) / "build", checkpoints=Path(tmp) / "ck")
        result = Runner(plan, cache, checkpoints=Path(tmp) / "ck", device="cpu", progress=False).run()
        video = result.videos[0]
        assert video.status == "built", video.error
        mux = next(s for s in video.steps if s.stage == "mux")
        seconds_of_video = mux.info["video_duration"]
        per = {s.stage: s.seconds / seconds_of_video for s in video.steps}
        together = sum(per.values())
        goal = 1.0 if size == 256 else 2.0
        print(
            f"size {size}: {seconds_of_video:.1f} s of video; compute per second of video: "
            + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
            + f"; together {together:.3f} (goal ≤ {goal}) — {'OK' if together <= goal else 'SLOW'}"
        )


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
    args = ap.parse_args()
    for size in (256, 512):
        stage_figures(size)
    warm_vs_cold(args.clips)


if __name__ == "__main__":
    main()
