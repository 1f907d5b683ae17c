"""A tiny random-weight Stable Diffusion pipeline for tests (diffusers' `get_dummy_components` habit).

Real classes at toy sizes with fixed seeds: a 2-block UNet (32/64 channels), a 2-block VAE (64 px image ↔ 32 px
latent), a 2-layer CLIP text encoder and the hand-built 524-token BPE tokenizer in fixtures/tiny-clip-tokenizer.
Saved with `save_pretrained`, the folder is ~7 MB and loads like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).with_name("fixtures") / "tiny-clip-tokenizer"


def tiny_components() -> dict[str, Any]:
    """Components of a StableDiffusionPipeline at toy sizes; the same every call (seeded init)."""
    from renderer.compat import import_torchvision

    import_torchvision()
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def save_tiny_pipeline(folder: Path, variant: str | None = None) -> Path:
    """Write the tiny pipeline as a diffusers folder (model_index.json, safetensors) and return the folder."""
    from renderer.compat import import_torchvision

    import_torchvision()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True, variant=variant)
    return folder
