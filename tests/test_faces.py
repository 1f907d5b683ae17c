"""dlib face box and landmarks on bundled pictures (skimage's astronaut), and the error paths users hit."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from renderer.base import BadInputError, ModelPool
from renderer.faces import DLIB_ID, Face, detect_face, landmark_model_path, load_image

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def test_landmark_model_path_points_at_the_dat_file() -> None:
    path = landmark_model_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat"
    assert path.stat().st_size > 90_000_000


def test_detect_face_landmarks_land_on_the_astronaut_face(astronaut: np.ndarray, pool: ModelPool) -> None:
    face = detect_face(astronaut, "astronaut.png", pool)
    assert isinstance(face, Face)
    left, top, right, bottom = face.box
    # The face sits around x 175..265, y 75..170 in the 512×512 picture (the mission patch is at lower right).
    assert 150 < left < 200 and 220 < right < 290 and 50 < top < 110 and 140 < bottom < 200
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float64
    inside = (
        (face.landmarks[:, 0] >= left - 15)
        & (face.landmarks[:, 0] <= right + 15)
        & (face.landmarks[:, 1] >= top - 30)
        & (face.landmarks[:, 1] <= bottom + 25)
    )
    assert inside.all()
    # iBUG order: eyes (36..47) above the nose tip (33) above the mouth (48..67); left eye left of right eye.
    eye_y = face.landmarks[36:48, 1].mean()
    assert eye_y < face.landmarks[33, 1] < face.landmarks[48:68, 1].mean()
    assert face.landmarks[36:42, 0].mean() < face.landmarks[42:48, 0].mean()
    assert face.score > 0.5


def test_detect_face_loads_models_once_through_the_pool(astronaut: np.ndarray) -> None:
    pool = ModelPool()
    first = detect_face(astronaut, "a", pool)
    second = detect_face(astronaut, "b", pool)
    assert np.array_equal(first.landmarks, second.landmarks)
    assert pool.loads == {(DLIB_ID, "cpu", "float32"): 1}


def test_detect_face_searches_each_picture_once_per_pool(astronaut: np.ndarray) -> None:
    """A character's portrait is searched once per run, however many videos it has; another picture is searched."""
    pool = ModelPool()
    first = detect_face(astronaut, "a", pool)
    assert detect_face(astronaut.copy(), "b", pool) is first
    assert not first.landmarks.flags.writeable  # shared: nobody may move them in place
    shifted = np.ascontiguousarray(np.roll(astronaut, 10, axis=1))
    moved = detect_face(shifted, "shifted", pool)
    assert moved is not first
    assert np.allclose(moved.landmarks[:, 0], first.landmarks[:, 0] + 10, atol=3)
    assert detect_face(astronaut, "c", ModelPool()) is not first  # another run searches again


def test_detect_face_from_parallel_threads_finds_the_same_face(astronaut: np.ndarray) -> None:
    """--jobs 2 runs animate steps in threads sharing the pool's dlib models, which are not thread-safe."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ModelPool()
    alone = detect_face(astronaut, "astronaut", pool)

    def search(i: int) -> Face:  # a different picture each time (one pixel changed): dlib really runs
        picture = astronaut.copy()
        picture[-1, i] ^= 1
        return detect_face(picture, "astronaut", pool)

    with ThreadPoolExecutor(4) as threads:
        faces = list(threads.map(search, range(8)))
    assert len({id(f) for f in faces}) == 8
    assert all(f.box == alone.box and abs(f.score - alone.score) < 1e-3 and f.others == 0 for f in faces)


def test_detect_face_no_face_names_the_source(pool: ModelPool) -> None:
    with pytest.raises(BadInputError, match="coffee.png") as info:
        detect_face(skimage_data.coffee(), "coffee.png", pool)
    assert info.value.hint


def test_detect_face_flat_image_raises(pool: ModelPool) -> None:
    with pytest.raises(BadInputError, match="flat.png"):
        detect_face(np.full((240, 320, 3), 128, np.uint8), "flat.png", pool)


def test_detect_face_warns_when_several_faces(astronaut: np.ndarray, pool: ModelPool, caplog) -> None:
    face_crop = astronaut[40:220, 130:310]
    twins = np.concatenate([face_crop, face_crop[:, ::-1]], axis=1)
    with caplog.at_level(logging.WARNING, logger="renderer.faces"):
        face = detect_face(np.ascontiguousarray(twins), "twins.png", pool)
    assert any("twins.png" in r.getMessage() for r in caplog.records)
    assert face.others == 1 and face.warning.startswith("2 faces in the portrait")  # what the stages report


def test_load_image_converts_rgba_gray_and_applies_exif(tmp_path: Path, astronaut: np.ndarray) -> None:
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), astronaut)

    Image.fromarray(astronaut[:, :, 0], "L").save(tmp_path / "g.png")
    gray = load_image(tmp_path / "g.png")
    assert gray.shape == (512, 512, 3) and gray.dtype == np.uint8

    # EXIF orientation 6 = "rotate 90° clockwise to display": a 40×20 stored picture shows as 20×40.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (40, 20, 3)


def test_load_image_16_bit_gray_keeps_its_picture_and_face(tmp_path: Path, astronaut: np.ndarray, pool) -> None:
    """A 16-bit grayscale PNG is scaled to 8 bits, not clipped to white: the face is still found."""
    gray8 = np.asarray(Image.fromarray(astronaut).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded[:, :, 0], gray8)
    assert isinstance(detect_face(loaded, "g16.png", pool), Face)


def test_load_image_unreadable_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BadInputError, match="broken.png"):
        load_image(bad)
    with pytest.raises(BadInputError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_detect_face_large_picture_gives_full_resolution_landmarks(astronaut: np.ndarray, pool: ModelPool) -> None:
    reference = detect_face(astronaut, "astronaut.png", pool).landmarks
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.Resampling.BICUBIC))
    face = detect_face(big, "big.png", pool)
    assert np.abs(face.landmarks / 4 - reference).mean() < 1.5  # searched small, fitted at full size
    assert face.box[2] > 800  # box in the big picture's pixels


def test_detect_face_small_face_in_a_large_photo_is_found_at_full_resolution(
    astronaut: np.ndarray, pool: ModelPool
) -> None:
    """A 4000×3000 photo with a face about 80 px wide: too small in the 1280 px search, found at full size."""
    big = np.full((3000, 4000, 3), 180, np.uint8)
    big[1000:1360, 1500:1860] = np.asarray(Image.fromarray(astronaut).resize((360, 360)))
    face = detect_face(big, "big.png", pool)
    left, top, right, bottom = face.box
    assert 1500 < left < right < 1860 and 1000 < top < bottom < 1360 and 50 < right - left < 150


def test_detect_face_small_picture_gets_a_second_look(astronaut: np.ndarray, pool: ModelPool) -> None:
    small = np.asarray(Image.fromarray(astronaut).resize((128, 128), Image.Resampling.BICUBIC))
    face = detect_face(small, "small.png", pool)
    reference = detect_face(astronaut, "astronaut.png", pool).landmarks
    assert np.abs(face.landmarks * 4 - reference).mean() < 12  # within ~3 px at 128
