"""Peak memory of one SadTalker render batch (mapping net → generator → uint8 frames), per size and batch.

Each setting runs in a fresh process, so the figures do not mix: on a CPU the rise of the resident set during the
batch above where it stood before (its high-water mark reset just before), on CUDA the peak allocated by PyTorch during the batch. Half dtypes autocast with
the weights stored in that dtype, as the stage runs them (default: float16 on CUDA, float32 on a CPU). The frames'
checksum shows that two versions of the renderer compute the same thing.

    python bench/bench_render_memory.py [--device cpu|cuda] [--dtype ...] [--sizes 256 512] [--batches 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sadtalker  # noqa: E402


def _high_water_bytes() -> int:
    """VmHWM: the peak resident set since the last reset (`/proc/self/clear_refs`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(device: str, size: int, batch: int, dtype: str) -> dict:
    import numpy as np
    import torch

    from renderer.sadtalker import facerender as fr
    from renderer.sadtalker import weights
    from renderer.sadtalker.pipeline import _autocast

    renderer, source = bench_sadtalker.build_renderer(device)
    if dtype != "float32":
        renderer = weights.cast_for_autocast(renderer, getattr(torch, dtype))
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, size, size), dtype=np.float32)).to(device)
    semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32)).to(device)
    windows = torch.from_numpy(rng.normal(size=(batch, 70, fr.WINDOW)).astype(np.float32)).to(device)
    with torch.inference_mode(), _autocast(device, dtype):
        feature, kp_c, kp_s = bench_sadtalker.source_batch(renderer, image, semantics, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:  # the current resident set, and its high-water mark reset to it (large blocks are mapped and unmapped
            # one by one, see main: the resident set follows the live tensors)
            before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
            Path("/proc/self/clear_refs").write_text("5")
        frames = bench_sadtalker._step(renderer, kp_c, kp_s, feature, windows)
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _high_water_bytes()
    return {"rise_mib": (peak - before) / 2**20, "checksum": int(frames.astype(np.int64).sum()), "weights": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="autocast dtype (auto: float16 on CUDA, float32 on a CPU)")  # fmt: skip
    parser.add_argument("--child", nargs=2, type=int, metavar=("SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype if args.dtype != "auto" else "float16" if args.device.startswith("cuda") else "float32"
    if args.child:
        print(json.dumps(child(args.device, *args.child, dtype)))
        return
    what = "peak allocated by PyTorch" if args.device.startswith("cuda") else "peak RSS rise"
    what += f", {dtype}"
    print(f"one render batch on {args.device}: {what}")
    for size in args.sizes:
        for batch in args.batches:
            cmd = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--dtype",
                dtype,
                "--child",
                str(size),
                str(batch),
            ]
            # glibc then maps every block of 128 KiB or more on its own and returns it when freed, so the resident
            # set follows the live tensors and its peak is the batch's (by default freed blocks stay resident).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if out.returncode != 0:
                print(f"  {size:>4} × {batch:<3} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"  {size:>4} × {batch:<3} {got['rise_mib']:8.0f} MiB ({got['rise_mib'] / batch:6.0f} per frame), "
                f"frames checksum {got['checksum']} ({got['weights']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
