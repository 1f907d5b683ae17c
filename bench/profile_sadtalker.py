"""Where the SadTalker renderer's GPU time goes: torch.profiler table of a few render batches (CUDA only).

python bench/profile_sadtalker.py --size 256 --batch 8 --dtype float16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sadtalker  # noqa: E402


def main() -> None:
    import torch

    from renderer.sadtalker import facerender as fr
    from renderer.sadtalker import weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batches", type=int, default=5, help="profiled batches, after three warm-up batches")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    renderer, source = bench_sadtalker.build_renderer("cuda")
    half = args.dtype != "float32"
    if half:  # as the stage loads it for a half dtype
        weights.cast_for_autocast(renderer, getattr(torch, args.dtype))
    print(f"{source}; size {args.size}, batch {args.batch}, {args.dtype}")
    image = torch.rand(1, 3, args.size, args.size, device="cuda")
    semantics = torch.randn(1, 70, fr.WINDOW, device="cuda")
    windows = torch.randn(args.batch, 70, fr.WINDOW, device="cuda")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.autocast("cuda", dtype=getattr(torch, args.dtype), enabled=half):
        state = renderer.prepare_source(image, semantics)
        feature = state.feature.expand(args.batch, -1, -1, -1, -1).contiguous()
        kp_c, kp_s = state.kp_canonical.expand(args.batch, -1, -1), state.kp_source.expand(args.batch, -1, -1)
        for _ in range(3):
            bench_sadtalker._step(renderer, kp_c, kp_s, feature, windows)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.batches):
                bench_sadtalker._step(renderer, kp_c, kp_s, feature, windows)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
