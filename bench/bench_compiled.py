"""What `video.compile: true` costs and gives: the render step compiled ahead of time (renderer/sadtalker/compiled.py).

Prints, for one batch shape: the time to export and compile the step into a package (a fresh package folder), the
time a later run takes to load it, one batch's time compiled vs eager, and both against float32 (uint8 levels).
Weights follow the golden fill rule when ../shared/sadtalker is there (PyTorch's default initialisation otherwise).

    python bench/bench_compiled.py                                   # CPU: bfloat16, batch 2 (about 2 minutes)
    python bench/bench_compiled.py --device cuda --dtype float16 --batch 16
    python bench/bench_compiled.py --jit     # the fallback: torch.compile in two processes sharing a fresh
                                             # TorchInductor cache (cold, then warm; about 80 s on the CPU)
    python bench/bench_compiled.py --variant defaults   # only that way of making a package (compiled.VARIANTS)
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sadtalker  # noqa: E402
from scratch import scratch_dir  # noqa: E402


def main() -> None:
    import numpy as np
    import torch

    from renderer.sadtalker import compiled, weights
    from renderer.sadtalker import facerender as fr
    from renderer.sadtalker.graphs import RenderStep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--jit", action="store_true", help="time just-in-time compiling, cold then warm cache")
    parser.add_argument("--variant", choices=[v.name for v in compiled.VARIANTS],
                        help="make the package only this way (default: the stage's order)")  # fmt: skip
    parser.add_argument("--jit-once", action="store_true", help=argparse.SUPPRESS)  # one process of --jit
    args = parser.parse_args()
    if args.jit:
        return _jit_twice(sys.argv[1:])
    if args.variant:
        compiled.VARIANTS = tuple(v for v in compiled.VARIANTS if v.name == args.variant)
    logging.basicConfig(format="  %(name)s: %(message)s")
    logging.getLogger("renderer.sadtalker.compiled").setLevel(logging.INFO)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def synced(fn):
        started = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - started

    plain, source = bench_sadtalker.build_renderer(args.device)
    half = None if args.dtype == "float32" else getattr(torch, args.dtype)
    renderer = plain if half is None else weights.cast_for_autocast(copy.deepcopy(plain), half)
    print(f"{source}; {args.device}, size {args.size}, batch {args.batch}, {args.dtype}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, args.size, args.size), dtype=np.float32)).to(device)
    semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32)).to(device)
    windows = torch.from_numpy(rng.normal(size=(args.batch, 70, fr.WINDOW)).astype(np.float32)).to(device)
    with torch.inference_mode():
        tensors = (*bench_sadtalker.source_batch(plain, image, semantics, args.batch), windows)
        if args.jit_once:
            _, jit_s = synced(lambda: compiled._compile_just_in_time(RenderStep(renderer, half).eval(), tensors))
            print(f"  compiled just in time in {jit_s:.1f} s", flush=True)
            return
        folder = scratch_dir("bench_compiled_")
        _, compile_s = synced(lambda: compiled.compiled_step(renderer, tensors, half, folder))
        step, load_s = synced(lambda: compiled.compiled_step(renderer, tensors, half, folder))
        packages = list(folder.glob("render-*.pt2"))
        size = (
            f"{packages[0].name.split('-')[1]} package, {packages[0].stat().st_size / 2**20:.1f} MiB"
            if packages
            else "no package (compiled just in time)"
        )
        eager_step = RenderStep(renderer, half)
        synced(lambda: step(*tensors))  # warm-up
        frames, compiled_s = synced(lambda: step(*tensors))
        synced(lambda: eager_step(*tensors))
        eager, eager_s = synced(lambda: eager_step(*tensors))
        reference = RenderStep(plain, None)(*tensors)
    print(f"  compile: {compile_s:.1f} s ({size}); load in a later run: {load_s:.3f} s")
    print(f"  one batch: compiled {compiled_s:.2f} s, eager {eager_s:.2f} s ({eager_s / compiled_s:.2f}×)")
    for name, out in (("compiled", frames), ("eager", eager)):
        diff = (out.int() - reference.int()).abs().float()
        print(f"  {name} {args.dtype} vs eager float32: max {diff.max():.0f} levels, mean {diff.mean():.2f}")


def _jit_twice(argv: list[str]) -> None:
    """`--jit`: the same process twice, each compiling the step with torch.compile (the fallback where no package
    loads); both share a TorchInductor cache folder that starts empty, as on a machine compiling for the first time
    and then again in a later run."""
    import os
    import subprocess

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(scratch_dir("bench_inductor_cache_")))
    argv = [a for a in argv if a != "--jit"]
    for label in ("first run (cache empty)", "second run (cache warm)"):
        print(label, flush=True)
        done = subprocess.run([sys.executable, __file__, *argv, "--jit-once"], env=env, check=False)
        if done.returncode:
            sys.exit(done.returncode)


if __name__ == "__main__":
    main()
