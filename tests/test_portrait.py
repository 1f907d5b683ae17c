"""Stage "image" (renderer/portrait.py) on a tiny random-weight Stable Diffusion pipeline saved by the test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from renderer.base import BadInputError, MissingWeightsError, ModelPool, StepJob
from renderer.portrait import ImageSettings, configure, generate, load_pipeline, run

PROMPT = "passport photo of a CEO"
TINY = {"model": "tiny-sd", "num_inference_steps": 2, "size": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _sd_util import save_tiny_pipeline

    root = tmp_path_factory.mktemp("portrait") / "checkpoints"
    save_tiny_pipeline(root / "tiny-sd")
    return root


def settings_for(**overrides: object) -> dict:
    """A resolved `image` section: defaults of the manifest schema, then the overrides."""
    resolved = dict(dataclass_defaults())
    resolved.update(overrides)
    return resolved


def dataclass_defaults() -> dict:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(ImageSettings)}


def make_job(
    tmp_path: Path, checkpoints: Path, name: str, seed: int, prompt: str = PROMPT, **settings: object
) -> StepJob:
    out = tmp_path / name
    out.mkdir()
    prompt_file = tmp_path / f"{name}-prompt.txt"
    prompt_file.write_text(prompt + "\n", encoding="utf-8")
    return StepJob(
        stage="image",
        key=name,
        settings=settings_for(**settings),
        inputs={"prompt": prompt_file},
        out_dir=out,
        seed=seed,
        checkpoints=checkpoints,
        label=f"characters.{name}",
    )


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def tiny(checkpoints: Path) -> tuple[object, ImageSettings]:
    """The tiny pipeline loaded through the product's loader, as `run` loads it."""
    settings = ImageSettings.from_mapping(settings_for(**TINY))
    loaded = load_pipeline(settings, checkpoints, "cpu", ModelPool())
    return configure(loaded, settings), settings


def test_portrait_same_seed_gives_identical_pixels(tiny: tuple) -> None:
    pipe, settings = tiny
    [first] = generate(pipe, [PROMPT], [3], settings)
    [second] = generate(pipe, [PROMPT], [3], settings)
    [other] = generate(pipe, [PROMPT], [4], settings)

    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(second))
    assert np.abs(pixels(first) - pixels(other)).mean() > 10


def test_portrait_does_not_depend_on_its_batch_mates(tiny: tuple) -> None:
    pipe, settings = tiny
    [alone] = generate(pipe, [PROMPT], [3], settings)
    batch = generate(pipe, ["passport photo of a nurse", PROMPT], [11, 3], settings)

    assert len(batch) == 2
    # Batched convolutions may round differently; one grey level is the most a pixel may move.
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2
    assert np.abs(pixels(batch[0]) - pixels(alone)).mean() > 10


def test_portrait_output_slice_matches_recorded_values(tiny: tuple) -> None:
    pipe, settings = tiny
    [image] = generate(pipe, [PROMPT], [3], settings)
    corner = pixels(image)[-3:, -3:, -1].flatten()
    # Recorded once from this tiny pipeline (torch 2.13 CPU, diffusers 0.42.1), diffusers-style.
    expected = np.array([137, 114, 160, 122, 143, 169, 145, 152, 160])
    assert np.abs(corner - expected).max() <= 2, corner.tolist()


def test_portrait_negative_prompt_changes_the_image(tiny: tuple) -> None:
    pipe, settings = tiny
    import dataclasses

    [plain] = generate(pipe, [PROMPT], [3], settings)
    negative = dataclasses.replace(settings, negative_prompt="blurry, cartoon")
    [steered] = generate(pipe, [PROMPT], [3], negative)
    assert np.abs(pixels(plain) - pixels(steered)).max() > 0


def test_portrait_scheduler_option_swaps_and_restores(checkpoints: Path) -> None:
    import dataclasses

    pool = ModelPool()
    base = ImageSettings.from_mapping(settings_for(**TINY))
    loaded = load_pipeline(base, checkpoints, "cpu", pool)
    euler = dataclasses.replace(base, scheduler="euler")
    pipe = configure(loaded, euler)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    [image] = generate(pipe, [PROMPT], [3], euler)
    assert image.size == (64, 64)

    pipe = configure(load_pipeline(base, checkpoints, "cpu", pool), base)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert sum(pool.loads.values()) == 1  # a scheduler change does not reload the weights


def test_portrait_run_loads_once_and_rejects_faceless_images(tmp_path: Path, checkpoints: Path) -> None:
    """Random weights draw noise, so the stage's face check must fail each job clearly (and load the model once)."""
    pool = ModelPool()
    jobs = [make_job(tmp_path, checkpoints, "ceo", 3, **TINY), make_job(tmp_path, checkpoints, "nurse", 5, **TINY)]
    results = run(jobs, pool)

    assert [type(r) for r in results] == [BadInputError, BadInputError]
    assert str(results[0]) == (
        "no face in the generated portrait for characters.ceo (seed 3) — set another seed or give image:"
    )
    assert "characters.nurse (seed 5)" in results[1].message
    # What was drawn is the failed step's artifact (the runner keeps it in the cache and the report shows it).
    from PIL import Image

    for job, result in zip(jobs, results, strict=True):
        assert result.artifact == job.out_dir / "portrait.png"
        with Image.open(result.artifact) as drawn:
            assert drawn.size == (64, 64)
    # The pool also holds the face detector; each model was loaded once for both jobs.
    assert set(pool.loads.values()) == {1}
    [(model_id, device, dtype)] = [key for key in pool.loads if key[0].startswith("sd:")]
    assert model_id.endswith("tiny-sd") and device == "cpu" and dtype == "float32"


def test_portrait_missing_model_folder_names_make_checkpoints(tmp_path: Path) -> None:
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    [err] = run([make_job(tmp_path, empty, "ceo", 3)], ModelPool())

    assert isinstance(err, MissingWeightsError)
    assert str(empty / "stable-diffusion-2-1-base") in err.message
    assert "make checkpoints" in err.hint


def test_portrait_uncached_hub_id_is_missing_weights(tmp_path: Path) -> None:
    [err] = run([make_job(tmp_path, tmp_path, "ceo", 3, model="nobody/not-cached-sd")], ModelPool())

    assert isinstance(err, MissingWeightsError)
    assert "'nobody/not-cached-sd' is not in the local Hugging Face cache" in err.message
    assert "make checkpoints" in err.hint


def test_portrait_incomplete_model_folder_is_missing_weights(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "half-downloaded").mkdir(parents=True)
    job = make_job(tmp_path, tmp_path / "checkpoints", "ceo", 3, model="half-downloaded")
    [err] = run([job], ModelPool())

    assert isinstance(err, MissingWeightsError)
    assert "half-downloaded" in err.message and "model_index.json" in err.message
    assert "make checkpoints" in err.hint


def test_portrait_bad_settings_fail_before_loading(tmp_path: Path, checkpoints: Path) -> None:
    pool = ModelPool()
    bad_scheduler = make_job(tmp_path, checkpoints, "a", 1, **{**TINY, "scheduler": "lms"})
    bad_size = make_job(tmp_path, checkpoints, "b", 1, **{**TINY, "size": 100})
    results = run([bad_scheduler, bad_size], pool)

    assert all(isinstance(r, BadInputError) for r in results)
    assert "image.scheduler 'lms'" in results[0].message and "characters.a" in results[0].message
    assert "image.size" in results[1].message
    assert pool.loads == {}


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("RUN_GPU") != "1", reason="needs a CUDA GPU and checkpoints/ (set RUN_GPU=1)")
def test_portrait_real_sd21_draws_a_face(tmp_path: Path) -> None:
    """Real Stable Diffusion 2.1 base from checkpoints/: a passport-style prompt yields a 512² portrait with a face."""
    checkpoints = Path(__file__).resolve().parents[1] / "checkpoints"
    prompt = (
        "photo, front-facing passport-style headshot of a confident CEO in her fifties, looking straight into the "
        "camera, neutral expression, plain light background, even studio lighting, sharp focus, 85mm lens"
    )
    job = StepJob(
        stage="image",
        key="ceo",
        settings=settings_for(),
        inputs={"prompt": _write(tmp_path / "prompt.txt", prompt)},
        out_dir=_mkdir(tmp_path / "out"),
        seed=3,
        device="cuda",
        checkpoints=checkpoints,
        label="characters.ceo",
    )
    [info] = run([job], ModelPool())
    assert isinstance(info, dict), info
    from PIL import Image

    with Image.open(job.out_dir / "portrait.png") as image:
        assert image.size == (512, 512)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_portrait_loads_a_folder_of_fp16_variant_files(tmp_path: Path, tiny: tuple) -> None:
    """`make checkpoints` fetches only the *.fp16.safetensors files of SD 2.1; the loader must find them."""
    from tests._sd_util import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "checkpoints" / "tiny-fp16", variant="fp16")
    assert list((tmp_path / "checkpoints" / "tiny-fp16" / "unet").glob("*.fp16.safetensors"))
    settings = ImageSettings.from_mapping(settings_for(**{**TINY, "model": "tiny-fp16"}))
    loaded = load_pipeline(settings, tmp_path / "checkpoints", "cpu", ModelPool())
    pipe, tiny_settings = tiny
    ours = generate(configure(loaded, settings), ["a face"], [5], settings)[0]
    reference = generate(pipe, ["a face"], [5], tiny_settings)[0]
    assert np.abs(np.asarray(ours, np.int16) - np.asarray(reference, np.int16)).max() <= 2


def test_portrait_hub_id_loads_its_cached_snapshot_not_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`image.model: org/name` (not a folder under checkpoints/) is the snapshot in the local Hugging Face cache,
    the folder its cache key hashes, even where the working directory holds an `org/name` folder."""
    import huggingface_hub.constants

    from batch.hashing import FileHasher
    from batch.stages import weights_identity
    from renderer.portrait import resolve_model

    cache = tmp_path / "hf"
    snapshot = cache / "models--org--name" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a decoy in the working directory

    source, _ = resolve_model("org/name", tmp_path / "checkpoints")
    assert Path(source) == snapshot
    hasher = FileHasher(None)
    key = weights_identity("image", {"model": "org/name"}, tmp_path / "checkpoints", hasher)["diffusers"]
    assert key == hasher.folder_digest(snapshot, ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin"))
