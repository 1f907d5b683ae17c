"""Stage "image": a Stable Diffusion portrait per character, batched across characters.

Anatomy (diffusers' habit): `load_pipeline()` loads weights once per run through the pool, `check_inputs()` fails fast
on a bad setting, `generate()` turns prompts + seeds into images, and `run()` is the stage: 1. group jobs whose
pipeline settings match, 2. generate each group in batches of `image.batch_size`, 3. check that a face is there,
4. save ``portrait.png``.

Every image gets its own seeded generator, so a character's portrait depends on its prompt and seed only, not on
which other characters share its batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderer.base import (
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
    job_error,
)

if TYPE_CHECKING:
    from PIL import Image

    from renderer.faces import Face

logger = logging.getLogger(__name__)

#: diffusers scheduler classes behind the `image.scheduler` names.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
}
DTYPES = ("auto", "float16", "float32")
_CHECKPOINTS_HINT = "run `make checkpoints`, or set image.model to a diffusers folder (or give the character an image:)"


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """The `image` manifest section."""

    model: str = "stable-diffusion-2-1-base"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    scheduler: str | None = None
    size: int = 512
    batch_size: int = 8
    dtype: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> ImageSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in fields})


@dataclasses.dataclass
class LoadedPipeline:
    """A pooled diffusers pipeline and the scheduler it was saved with (restored when `scheduler` is null)."""

    pipe: Any
    default_scheduler: Any
    source: str


def check_inputs(settings: ImageSettings, where: str = "") -> None:
    """Fail fast on settings diffusers would reject late or obscurely, naming the key and the value."""
    prefix = f"{where}: " if where else ""
    if settings.scheduler is not None and settings.scheduler not in SCHEDULERS:
        raise BadInputError(f"{prefix}image.scheduler {settings.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if settings.dtype not in DTYPES:
        raise BadInputError(f"{prefix}image.dtype {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(settings.size, int) or settings.size < 64 or settings.size % 8:
        raise BadInputError(f"{prefix}image.size must be a multiple of 8, at least 64; got {settings.size!r}")
    if not isinstance(settings.num_inference_steps, int) or settings.num_inference_steps < 1:
        raise BadInputError(f"{prefix}image.num_inference_steps must be ≥ 1, got {settings.num_inference_steps!r}")
    if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
        raise BadInputError(f"{prefix}image.batch_size must be ≥ 1, got {settings.batch_size!r}")


def torch_dtype_name(dtype: str, device: str) -> str:
    """`auto` means float16 on CUDA (half the memory, same look) and float32 elsewhere (CPU half is slow/partial)."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def resolve_model(model: str, checkpoints: Path) -> tuple[str, Path | None]:
    """Where to load `image.model` from: (source for from_pretrained, the folder expected under checkpoints), by
    the rule the cache keys use (batch.stages.named_weights).

    A name is a folder under `checkpoints/`; `org/name` that is not such a folder is a Hugging Face id, loaded from
    its snapshot in the local cache (never a folder of that name in the working directory); an absolute path (only
    from code: manifests may not give one) is used as is.
    """
    path = Path(model)
    if path.is_absolute():
        return str(path), None
    if ".." in path.parts:
        raise BadInputError(f"image.model {model!r} must be a name under checkpoints/ or a Hugging Face id")
    folder = Path(checkpoints) / path
    if folder.is_dir():
        return str(folder), folder
    if "/" in model:  # a Hugging Face id: its cached snapshot, never a same-named folder in the working directory
        from renderer.checkpoints import hub_snapshot

        snapshot = hub_snapshot(model) if model.count("/") == 1 else None
        if snapshot is None:
            raise MissingWeightsError(
                f"Stable Diffusion weights not found: {folder} is missing and {model!r} is not in the local Hugging "
                "Face cache",
                _CHECKPOINTS_HINT,
            )
        return str(snapshot), folder
    return model, folder


def load_pipeline(settings: ImageSettings, checkpoints: Path, device: str, pool: ModelPool) -> LoadedPipeline:
    """The warm pipeline for these settings; the pool loads it once per run whatever the batches."""
    dtype = torch_dtype_name(settings.dtype, device)
    source, folder = resolve_model(settings.model, checkpoints)
    model_id = f"sd:{source}" + (":offload" if settings.cpu_offload else "")
    return pool.get(model_id, device, dtype, lambda: _load(source, folder, settings, device, dtype))


def weights_variant(folder: Path) -> str | None:
    """ "fp16" for a folder holding only the fp16 weight files (what `make checkpoints` fetches), else None."""
    unet = folder / "unet"
    if not unet.is_dir() or any(unet.glob("diffusion_pytorch_model.safetensors")):
        return None
    return "fp16" if any(unet.glob("diffusion_pytorch_model.fp16.safetensors")) else None


def _load(source: str, folder: Path | None, settings: ImageSettings, device: str, dtype: str) -> LoadedPipeline:
    from renderer.compat import import_torchvision

    import_torchvision()  # diffusers/transformers import torchvision when installed; see renderer/compat.py
    import torch
    from diffusers import DiffusionPipeline

    if folder is not None and not folder.is_dir() and "/" not in settings.model:
        # A bare name that is not a folder under checkpoints/ cannot be a hub id either ("org/name").
        raise MissingWeightsError(f"Stable Diffusion weights not found: {folder} is missing", _CHECKPOINTS_HINT)
    path = Path(source)
    if folder is None and not path.exists():
        raise MissingWeightsError(f"Stable Diffusion weights not found: {path} does not exist", _CHECKPOINTS_HINT)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source,
            dtype=getattr(torch, dtype),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            variant=weights_variant(path),
        )
    except (OSError, ValueError) as exc:
        # OSError covers hub ids missing from the cache (LocalEntryNotFoundError) and broken folders; ValueError
        # bad paths (notes/dependencies.md §4).
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if folder is not None and not folder.is_dir():
            message = (
                f"Stable Diffusion weights not found: {folder} is missing"
                f" and {source!r} is not in the local Hugging Face cache"
            )
        else:
            message = f"cannot load Stable Diffusion from {source}: {reason}"
        raise MissingWeightsError(message, _CHECKPOINTS_HINT) from exc
    if settings.cpu_offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        if settings.cpu_offload:
            logger.warning("image.cpu_offload only applies to CUDA devices; ignored on %s", device)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe=pipe, default_scheduler=pipe.scheduler, source=source)


def configure(loaded: LoadedPipeline, settings: ImageSettings) -> Any:
    """Apply the per-group options that do not need a reload (scheduler, attention slicing); return the pipeline."""
    import diffusers

    pipe = loaded.pipe
    if settings.scheduler is None:
        pipe.scheduler = loaded.default_scheduler
    else:
        cls = getattr(diffusers, SCHEDULERS[settings.scheduler])
        pipe.scheduler = cls.from_config(loaded.default_scheduler.config)
    if settings.attention_slicing:
        pipe.enable_attention_slicing()
    else:
        pipe.disable_attention_slicing()
    return pipe


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: ImageSettings) -> list[Image.Image]:
    """Run the pipeline once for a batch: one generator per image, so each image depends on its own seed only."""
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = getattr(pipe, "_execution_device", None) or pipe.device
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
    with torch.inference_mode():
        out = pipe(
            prompt=list(prompts),
            negative_prompt=negative,
            height=settings.size,
            width=settings.size,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            output_type="pil",
        )
    return list(out.images)


def check_face(image: Image.Image, job: StepJob, pool: ModelPool) -> Face:
    """A portrait the animators cannot use is a failure now, not three stages later; the hint says what to change."""
    import numpy as np

    from renderer.faces import detect_face

    where = job.label or job.key
    try:
        return detect_face(np.asarray(image.convert("RGB"), dtype=np.uint8), f"the portrait for {where}", pool)
    except BadInputError as exc:
        raise BadInputError(
            f"no face in the generated portrait for {where} (seed {job.seed})", "set another seed or give image:"
        ) from exc


def run(jobs: Sequence[StepJob], pool: ModelPool) -> list[dict | RenderError]:
    """Write out_dir/portrait.png per job; jobs with equal settings and device share batches and one pipeline."""
    results: list[dict | RenderError | None] = [None] * len(jobs)
    # 1. Read inputs and group jobs that can share a pipeline call.
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for index, job in enumerate(jobs):
        try:
            settings = ImageSettings.from_mapping(job.settings)
            check_inputs(settings, job.label or job.key)
            prompt = _read_prompt(job)
        except RenderError as exc:
            results[index] = exc
            continue
        key = (job.device, str(job.checkpoints), *dataclasses.astuple(settings))
        groups.setdefault(key, []).append((index, prompt))

    for members in groups.values():
        first = jobs[members[0][0]]
        settings = ImageSettings.from_mapping(first.settings)
        try:
            loaded = load_pipeline(settings, first.checkpoints, first.device, pool)
        except RenderError as exc:
            for index, _ in members:
                results[index] = exc
            continue
        pipe = configure(loaded, settings)
        # 2. Generate in batches.
        for start in range(0, len(members), settings.batch_size):
            batch = members[start : start + settings.batch_size]
            batch_jobs = [jobs[i] for i, _ in batch]
            try:
                images = generate(pipe, [p for _, p in batch], [j.seed for j in batch_jobs], settings)
            except RenderError as exc:
                for index, _ in batch:
                    results[index] = exc
                continue
            except RuntimeError as exc:
                if "out of memory" not in str(exc).lower():
                    for (index, _), job in zip(batch, batch_jobs, strict=True):
                        results[index] = job_error(job, exc)
                    continue
                err = BackendError(
                    f"out of memory generating {len(batch)} portraits on {first.device}",
                    "lower image.batch_size, or set image.attention_slicing / image.cpu_offload: true",
                )
                for index, _ in batch:
                    results[index] = err
                continue
            # 3. Face check, 4. save.
            for (index, prompt), job, image in zip(batch, batch_jobs, images, strict=True):
                try:
                    image.save(job.out_dir / "portrait.png")
                    face = check_face(image, job, pool)
                except Exception as exc:  # noqa: BLE001 - no face, a full disk, a bug: this portrait only
                    results[index] = job_error(job, exc)
                    if isinstance(exc, BadInputError):  # no face: what was drawn is shown beside the error
                        results[index].artifact = job.out_dir / "portrait.png"
                    continue
                results[index] = {
                    "renderer": "stable-diffusion",
                    "model": settings.model,
                    "prompt": prompt,
                    "seed": job.seed,
                    "size": settings.size,
                    "num_inference_steps": settings.num_inference_steps,
                    "batch": len(batch),
                    "face_box": list(face.box),
                    "face_score": round(float(face.score), 3),
                    "warnings": [face.warning] if face.warning else [],
                }
    done = [r for r in results if r is not None]
    assert len(done) == len(jobs), "every job gets a result"
    return done


def _read_prompt(job: StepJob) -> str:
    where = job.label or job.key
    path = job.inputs.get("prompt")
    if path is None:
        raise BadInputError(f"{where}: the image stage got no prompt input")
    try:
        text = " ".join(Path(path).read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{where}: cannot read the prompt {path}: {exc}") from exc
    if not text:
        raise BadInputError(f"{where}: the prompt {path} is empty", "give the character a description")
    return text
