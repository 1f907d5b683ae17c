"""Seconds per portrait for Stable Diffusion 2.1-base-sized models, batch 1 vs batch 8 (the image stage's batching).

The UNet, VAE and text encoder are built from SD 2.1-base's configs (written out below) with random weights, so no
download is needed: speed depends on shapes, not on weight values. On CUDA it runs fp16, 30 steps at 512², classifier-
free guidance on (as the stage does), and prints warm seconds per image; the goal is ≤ 0.2 s/image batched on an H100.
Options: --compile (torch.compile the UNet; with --cuda-graphs its "reduce-overhead" mode captures CUDA graphs),
--channels-last, --scheduler. Without a GPU it says so and runs a tiny-size smoke run of the same code path.

    python bench/bench_sd.py                      # GPU: 30 steps, 512², batch 1 and 8
    python bench/bench_sd.py --compile --cuda-graphs --batch-sizes 8 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch import scratch_dir  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-clip-tokenizer"
GOAL_S_PER_IMAGE = 0.2
# Short enough for the fixture's byte-level tokenizer to stay within CLIP's 77 tokens (the encoder always sees 77).
PROMPT = "passport photo of a CEO, neutral expression, 85mm"

# stabilityai/stable-diffusion-2-1-base, unet/config.json
SD21_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
# vae/config.json
SD21_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
# text_encoder/config.json (OpenCLIP ViT-H/14 text tower, penultimate layer: 23 layers)
SD21_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "layer_norm_eps": 1e-05,
}
# scheduler/scheduler_config.json
SD21_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# Toy sizes for the CPU smoke run (same classes, same code path).
TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
}
TINY_VAE = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}


def build_pipeline(tiny: bool, device: str, dtype: Any, scheduler: str) -> Any:
    """A StableDiffusionPipeline with random weights at SD 2.1-base (or toy) sizes, on `device` in `dtype`."""
    from renderer.compat import import_torchvision

    import_torchvision()  # a CUDA torchvision beside a CPU torch breaks diffusers' imports (renderer/compat.py)
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    text_config = dict(TINY_TEXT if tiny else SD21_TEXT)
    text_config.setdefault("vocab_size", len(tokenizer))
    text_config.setdefault("max_position_embeddings", 77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text_config.update(ids, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # Parameters are created directly on the device: initialising 1.3 B random weights on CPU takes minutes.
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD21_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD21_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    sched_cls = getattr(diffusers, scheduler)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched_cls.from_config(SD21_SCHEDULER),  # from_config drops keys a scheduler does not take
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed(call: Any, repeats: int, device: str) -> tuple[float, float]:
    """(first-call seconds, best of `repeats` warm calls) of `call()`, GPU work included."""
    import torch

    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        first = once()
        return first, min(once() for _ in range(repeats))


def time_batch(pipe: Any, batch: int, steps: int, size: int, repeats: int, device: str) -> tuple[float, float]:
    """One pipeline call of `batch` images with per-image generators, timed by `_timed`."""
    import torch

    def call() -> None:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in range(batch)]
        # output_type="np": the float image the stage turns into PIL; conversion (~2 ms/image) is left out, and
        # random fp16 weights may give NaNs that PIL conversion would warn about.
        pipe(
            prompt=[PROMPT] * batch,
            negative_prompt=["blurry, cartoon"] * batch,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=generators,
            output_type="np",
        )

    return _timed(call, repeats, device)


def _stage_settings(steps: int, size: int, model: str | None = None):
    from renderer.portrait import ImageSettings

    settings = {"num_inference_steps": steps, "size": size, "guidance_scale": 7.5, "negative_prompt": "blurry, cartoon"}
    return ImageSettings.from_mapping(settings if model is None else {**settings, "model": model})


def through_stage(pipe: Any, device: str, steps: int, size: int) -> Any:
    """Save `pipe` as a diffusers folder and load it back with the image stage's own loader and options."""

    from renderer.base import ModelPool
    from renderer.portrait import configure, load_pipeline

    folder = scratch_dir("bench_sd_") / "sd"
    pipe.save_pretrained(folder, variant="fp16" if device.startswith("cuda") else None)
    del pipe
    settings = _stage_settings(steps, size, model=str(folder))
    return configure(load_pipeline(settings, folder.parent, device, ModelPool()), settings)


def time_stage(pipe: Any, batch: int, steps: int, size: int, repeats: int, device: str) -> tuple[float, float]:
    """Like time_batch, through renderer.portrait.generate (per-image seeds, PIL images out)."""
    from renderer.portrait import generate

    settings = _stage_settings(steps, size)

    def call() -> None:
        images = generate(pipe, [PROMPT] * batch, list(range(batch)), settings)
        assert len(images) == batch and images[0].size == (size, size)

    return _timed(call, repeats, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per batch size; the best is reported")
    parser.add_argument("--scheduler", default="PNDMScheduler", help="diffusers scheduler class (SD 2.1-base: PNDM)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (first call compiles)")
    parser.add_argument("--cuda-graphs", action="store_true", help='with --compile: mode="reduce-overhead"')
    parser.add_argument(
        "--autotune", action="store_true", help='with --compile: mode="max-autotune-no-cudagraphs" (long compile)'
    )
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--channels-last", action="store_true", help="UNet/VAE in channels_last memory format")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse attention q/k/v projections (diffusers)")
    parser.add_argument(
        "--stage",
        action="store_true",
        help="save the pipeline, load it through the image stage's loader (renderer/portrait.py) and time its "
        "generate() (PIL output included): the product's own path",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes even on a GPU (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    from renderer.compat import import_torchvision

    import_torchvision()
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    steps, size, batches = args.steps, args.size, args.batch_sizes
    if not cuda:
        print("no CUDA GPU present: running a tiny-size smoke run on CPU (the SD 2.1 numbers need a GPU)")
    repeats = args.repeats
    if tiny:
        steps, size, batches, repeats = 2, 64, [1, 2], 1
    gpu = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"

    started = time.perf_counter()
    pipe = build_pipeline(tiny, device, dtype, args.scheduler)
    build_s = time.perf_counter() - started
    if args.stage:
        pipe = through_stage(pipe, device, steps, size)
        build_s = time.perf_counter() - started
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if args.fuse_qkv:
        pipe.fuse_qkv_projections()
    if args.compile:
        mode = "reduce-overhead" if args.cuda_graphs else "max-autotune-no-cudagraphs" if args.autotune else None
        pipe.unet = torch.compile(pipe.unet, mode=mode)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    rows = []
    for batch in batches:
        if args.stage:
            first, warm = time_stage(pipe, batch, steps, size, repeats, device)
        else:
            first, warm = time_batch(pipe, batch, steps, size, repeats, device)
        rows.append({"batch": batch, "first_s": first, "warm_s": warm, "s_per_image": warm / batch})

    report = {
        "device": gpu,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": "tiny (smoke)" if tiny else "SD 2.1-base shapes, random weights",
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "size": size,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "channels_last": args.channels_last,
        "fuse_qkv": args.fuse_qkv,
        "via_stage": args.stage,
        "autotune": args.autotune,
        "cudnn_benchmark": args.cudnn_benchmark,
        "build_s": build_s,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    options = ("compile", "cuda_graphs", "autotune", "cudnn_benchmark", "channels_last", "fuse_qkv", "via_stage")
    extras = [k for k in options if report[k]]
    print(
        f"{report['model']} on {gpu}: {report['dtype']}, {steps} steps, {size}², guidance on, "
        f"options: {', '.join(extras) or 'none'}; build {build_s:.1f} s"
    )
    print(f"{'batch':>5} {'first call s':>12} {'warm call s':>11} {'s/image':>8}")
    for row in rows:
        print(f"{row['batch']:>5} {row['first_s']:>12.3f} {row['warm_s']:>11.3f} {row['s_per_image']:>8.3f}")
    if not tiny:
        best = min(row["s_per_image"] for row in rows)
        verdict = "meets" if best <= GOAL_S_PER_IMAGE else "misses"
        print(f"best {best:.3f} s/image {verdict} the goal of {GOAL_S_PER_IMAGE} s/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
