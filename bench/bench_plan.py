"""Planning speed: a generated 1,000-video manifest, fully cached. Goal: under 1 s on a 2-core machine.

Prints the time to load + validate + plan (best and median of 5; each cached output's sha256 checked through the
digest memo), the peak memory of planning, and `plan --verify` (every cached byte read again).
The cache is filled once with the runner's light test stages (tests/_fake_stages.py), so only planning is timed.
"""

from __future__ import annotations

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
from batch.plan import plan_manifest  # noqa: E402
from batch.report import write_state  # noqa: E402
from batch.run import Runner  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402

CHARACTERS, SCRIPTS = 50, 20


def write_manifest(root: Path) -> Path:
    (root / "portraits").mkdir(parents=True)
    lines = ["version: 1", "vars: {company: Acme}", "defaults:", "  video: {renderer: puppet}", "characters:"]
    for c in range(CHARACTERS):
        (root / "portraits" / f"c{c}.png").write_bytes(f"portrait {c}".encode())
        lines += [f"  c{c}:", f"    name: Person {c}", f"    image: portraits/c{c}.png", f"    seed: {c}"]
    lines.append("scripts:")
    for s in range(SCRIPTS):
        lines += [f"  s{s}:", f'    text: "Hello from {{{{ company }}}}, I am {{{{ character.name }}}}. Line {s}."']
    lines.append("videos:")
    for c in range(CHARACTERS):
        for s in range(SCRIPTS):
            lines.append(f"  - {{id: c{c}-s{s}, character: c{c}, script: s{s}}}")
    path = root / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_once(path: Path, root: Path, deep: bool = False):
    manifest = load_manifest(path)
    cache = Cache(root / "build" / "cache", deep=deep)
    return plan_manifest(manifest, cache, build_dir=root / "build", checkpoints=root / "checkpoints"), cache


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = write_manifest(root)
        plan, cache = plan_once(path, root)
        t0 = time.perf_counter()
        Runner(
            plan, cache, checkpoints=root / "checkpoints", device="cpu", progress=False, stages=make_registry()
        ).run()
        write_state(plan, cache.is_cached)
        fill = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            plan, _ = plan_once(path, root)
            times.append(time.perf_counter() - t0)
            assert not plan.stale, "the cache should be complete"
        t0 = time.perf_counter()
        plan_once(path, root, deep=True)
        deep = time.perf_counter() - t0
        tracemalloc.start()
        plan_once(path, root)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        steps = sum(len(v.steps) for v in plan.videos)
        print(
            f"manifest: {len(plan.videos)} videos, {steps} steps, {path.stat().st_size / 1024:.0f} KiB "
            f"(cache filled in {fill:.1f}s)"
        )
        print(
            f"plan, fully cached: best {min(times):.3f}s, median {statistics.median(times):.3f}s "
            f"(goal < 1 s) — {'OK' if min(times) < 1 else 'SLOW'}"
        )
        print(f"plan peak Python memory (tracemalloc): {peak / 1e6:.1f} MB")
        print(f"plan --verify (every cached output read and hashed): {deep:.3f}s")


if __name__ == "__main__":
    main()
