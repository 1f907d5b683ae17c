"""Planning speed at fleet scale: a generated 10,000-video manifest, fully cached. Goal: a no-op plan under 2 s.

Prints the time to load + validate + plan (best and median of 5; each cached output's sha256 checked through the
digest memo), the same for one shard of four (`--shard 1/4`: each CI job plans only its videos), the peak memory of
planning, and `plan --verify` (every cached byte read again). The cache is filled once with the runner's light test
stages (tests/_fake_stages.py), so only planning is timed; --dir keeps the filled folder for the next run (profiling:
--profile prints cProfile's top functions of one plan).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batch.cache import Cache  # noqa: E402
from batch.manifest import load_manifest  # noqa: E402
from batch.plan import Plan, plan_manifest  # noqa: E402
from batch.report import write_state  # noqa: E402
from batch.run import Runner  # noqa: E402
from batch.shard import Shard, shard_videos  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402

#: Characters in the generated manifest; scripts = videos / characters.
CHARACTERS = 100
#: Videos per runner call while filling (the driver's bookkeeping grows with the steps of one run).
FILL_SLICE = 500


def write_manifest(root: Path, videos: int) -> Path:
    scripts = max(1, videos // CHARACTERS)
    (root / "portraits").mkdir(parents=True)
    lines = ["version: 1", "vars: {company: Acme}", "defaults:", "  video: {renderer: puppet}", "characters:"]
    for c in range(CHARACTERS):
        (root / "portraits" / f"c{c}.png").write_bytes(f"portrait {c}".encode())
        lines += [f"  c{c}:", f"    name: Person {c}", f"    image: portraits/c{c}.png", f"    seed: {c}"]
    lines.append("scripts:")
    for s in range(scripts):
        lines += [f"  s{s}:", f'    text: "Hello from {{{{ company }}}}, I am {{{{ character.name }}}}. Line {s}."']
    lines.append("videos:")
    for c in range(CHARACTERS):
        for s in range(scripts):
            lines.append(f"  - {{id: c{c}-s{s}, character: c{c}, script: s{s}}}")
    path = root / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_once(path: Path, root: Path, deep: bool = False, shard: Shard | None = None) -> tuple[Plan, Cache]:
    manifest = load_manifest(path)
    cache = Cache(root / "build" / "cache", deep=deep)
    videos = shard_videos(manifest, manifest.videos, shard)
    plan = plan_manifest(manifest, cache, build_dir=root / "build", checkpoints=root / "checkpoints", videos=videos)
    return plan, cache


def fill(path: Path, root: Path) -> float:
    """Build every step with the fake stages, a slice of videos per run. Without fsync: a throwaway cache need not
    survive a power cut, and on a shared disk the syncs of 30,000 commits would take most of the time."""
    plan, cache = plan_once(path, root)
    t0 = time.perf_counter()
    fsync, os.fsync = os.fsync, lambda fd: None
    try:
        for i in range(0, len(plan.videos), FILL_SLICE):
            part = Plan(plan.manifest, plan.build_dir, plan.videos[i : i + FILL_SLICE])
            runner = Runner(
                part, cache, checkpoints=root / "checkpoints", device="cpu", progress=False, stages=make_registry()
            )
            runner.run()
    finally:
        os.fsync = fsync
    write_state(plan, cache.is_cached)
    return time.perf_counter() - t0


def timed(path: Path, root: Path, shard: Shard | None = None, repeat: int = 5) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of `repeat` plans (on a shared machine the CPU time is the steadier figure)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        plan, _ = plan_once(path, root, shard=shard)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert not plan.stale, "the cache should be complete"
        del plan
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10_000, help="videos in the manifest (default 10,000)")
    parser.add_argument("--dir", type=Path, help="work here and keep it (filled once) instead of a temporary folder")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of one plan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        path = root / "big.yaml"
        filled = None
        if not path.is_file():
            path = write_manifest(root, args.videos)
            filled = fill(path, root)
        if args.profile:
            cProfile.runctx("plan_once(path, root)", globals(), {"path": path, "root": root}, str(root / "plan.prof"))
            pstats.Stats(str(root / "plan.prof")).sort_stats("cumulative").print_stats(30)
        times, cpu = timed(path, root)
        shard_times, shard_cpu = timed(path, root, Shard(1, 4))
        t0 = time.perf_counter()
        plan_once(path, root, deep=True)
        deep = time.perf_counter() - t0
        tracemalloc.start()
        plan, _ = plan_once(path, root)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        steps = sum(len(v.steps) for v in plan.videos)
        print(
            f"manifest: {len(plan.videos)} videos, {steps} steps, {path.stat().st_size / 1024:.0f} KiB"
            + (f" (cache filled in {filled:.1f}s)" if filled is not None else " (cache filled before)")
        )
        print(
            f"plan, fully cached: best {min(times):.3f}s, median {statistics.median(times):.3f}s "
            f"(CPU best {min(cpu):.3f}s) (goal < 2 s) — {'OK' if min(times) < 2 else 'SLOW'}"
        )
        print(
            f"plan --shard 1/4: best {min(shard_times):.3f}s, median {statistics.median(shard_times):.3f}s "
            f"(CPU best {min(shard_cpu):.3f}s)"
        )
        print(f"load average while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        print(f"plan peak Python memory (tracemalloc): {peak / 1e6:.1f} MB")
        print(f"plan --verify (every cached output read and hashed): {deep:.3f}s")


if __name__ == "__main__":
    main()
