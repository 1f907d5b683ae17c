"""Where the SadTalker renderer's GPU time goes: torch.profiler table of a few render batches (CUDA only).

python bench/profile_sadtalker.py --size 256 --batch 8 --dtype float16
python bench/profile_sadtalker.py --by-module 4       # also GPU time per submodule, down to 4 levels deep

`--fused-conv-relu` / `--broadcast-upsample` switch on the renderer's kernel options (renderer/sadtalker/facerender.py).
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
    parser.add_argument("--by-module", type=int, default=0, metavar="DEPTH", help="GPU time per submodule")
    parser.add_argument(
        "--shapes",
        type=int,
        default=0,
        metavar="N",
        help="also the N costliest copies, casts and elementwise ops by input shape",
    )
    parser.add_argument("--fused-conv-relu", action="store_true")
    parser.add_argument("--broadcast-upsample", action="store_true")
    args = parser.parse_args()
    fr.FUSED_CONV_RELU, fr.BROADCAST_UPSAMPLE = args.fused_conv_relu, args.broadcast_upsample
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    renderer, source = bench_sadtalker.build_renderer("cuda")
    half = args.dtype != "float32"
    if half:  # as the stage loads it for a half dtype
        weights.cast_for_autocast(renderer, getattr(torch, args.dtype))
    print(
        f"{source}; size {args.size}, batch {args.batch}, {args.dtype}; fused conv+relu {args.fused_conv_relu}, "
        f"broadcast upsample {args.broadcast_upsample}"
    )
    if args.by_module:
        _label_modules(renderer, args.by_module)
    image = torch.rand(1, 3, args.size, args.size, device="cuda")
    semantics = torch.randn(1, 70, fr.WINDOW, device="cuda")
    windows = torch.randn(args.batch, 70, fr.WINDOW, device="cuda")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.autocast("cuda", dtype=getattr(torch, args.dtype), enabled=half):
        feature, kp_c, kp_s = bench_sadtalker.source_batch(renderer, image, semantics, args.batch)
        for _ in range(3):
            bench_sadtalker._step(renderer, kp_c, kp_s, feature, windows)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities, record_shapes=args.shapes > 0) as prof:
            for _ in range(args.batches):
                bench_sadtalker._step(renderer, kp_c, kp_s, feature, windows)
            torch.cuda.synchronize()
    from renderer.sadtalker import kernels

    print(kernels.report())
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.by_module:
        _print_modules(averages, args.batches)
    if args.shapes:
        _print_shapes(prof, args.shapes, args.batches)


def _print_shapes(prof, rows: int, batches: int) -> None:
    """The costliest non-convolution ops (GPU time per batch) by input shapes: where the remaining passes go."""
    kept = []
    for event in prof.key_averages(group_by_input_shape=True):
        gpu_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        if event.key.startswith("aten::") and "convolution" not in event.key and gpu_us > 0:
            kept.append((gpu_us / batches / 1e3, event.count // batches, event.key, str(event.input_shapes)[:150]))
    print(f"\nCostliest other ops by input shape (ms per batch; calls per batch), top {rows}")
    for ms, calls, key, shapes in sorted(kept, reverse=True)[:rows]:
        print(f"  {ms:7.2f}  {calls:3d}×  {key:28s} {shapes}")


def _label_modules(model, depth: int) -> None:
    """Wrap every submodule down to `depth` levels in a profiler range named "module:<path>"."""
    import torch

    def enter(module, _inputs):
        module._profile_range = torch.profiler.record_function(module._profile_name)
        module._profile_range.__enter__()

    def leave(module, _inputs, _output):
        module._profile_range.__exit__(None, None, None)

    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            module._profile_name = f"module:{name}"
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)


def _print_modules(averages, batches: int) -> None:
    """GPU time per labelled module and batch (a module's time includes its children's)."""
    rows = []
    for event in averages:
        if event.key.startswith("module:"):
            gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            rows.append((gpu_us / batches / 1e3, event.count // batches, event.key[len("module:") :]))
    print("\nGPU time per batch by module (ms, a module's children included; calls per batch)")
    for ms, calls, name in sorted(rows, key=lambda row: row[2]):
        print(f"  {ms:8.2f}  {calls:3d}×  {'  ' * name.count('.')}{name.rsplit('.', 1)[-1]}")


if __name__ == "__main__":
    main()
