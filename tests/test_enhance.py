"""renderer.enhance: GFPGAN restoration with small random-weight networks of the real classes, saved by the test.

The restorer is a GFPGANv1Clean at 128 px (1 M parameters instead of 86 M; the loader reads the architecture from
the checkpoint), the parser a ParseNet at 128 px, the detector the real RetinaFace-ResNet50 with its class head
set to "background everywhere" (random weights would report a thousand faces). Detection itself is exercised
with the real weights in the RUN_GPU test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from renderer import enhance
from renderer.base import BadInputError, MissingWeightsError, ModelPool, RenderError, StepJob

REPO = Path(__file__).resolve().parents[1]
#: 5 landmarks (eyes, nose tip, mouth corners) of skimage's astronaut, from dlib's 68 points (renderer.faces).
ASTRONAUT_LANDMARKS = np.array(
    [[203.2, 101.5], [246.5, 104.2], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]], dtype=np.float32
)
ASTRONAUT_FACE_BOX = (175, 76, 265, 166)  # dlib's box: left, top, right, bottom
TINY_GFPGAN = dict(out_size=128, num_style_feat=64, channel_multiplier=1, narrow=0.125, num_mlp=2)


def video_settings(**overrides: Any) -> dict[str, Any]:
    settings = {
        "renderer": "puppet",
        "size": 128,
        "preprocess": "crop",
        "still": False,
        "enhancer": "gfpgan",
        "expression_scale": 1.0,
        "pose_style": 0,
        "batch_size": 3,
        "dtype": "auto",
    }
    return {**settings, **overrides}


def save_tiny_weights(root: Path) -> None:
    """Write the three checkpoint files under root/gfpgan/ with the names `make checkpoints` uses."""
    lib = enhance._import_gfpgan_stack()
    torch = lib.torch
    torch.manual_seed(0)
    (root / "gfpgan").mkdir(parents=True, exist_ok=True)
    restorer = lib.GFPGANv1Clean(
        decoder_load_path=None, fix_decoder=False, input_is_latent=True, different_w=True, sft_half=True, **TINY_GFPGAN
    )
    torch.save({"params_ema": restorer.state_dict()}, root / enhance.RESTORER_FILE)
    detector = lib.RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))
    with torch.no_grad():
        for head in detector.ClassHead:  # logits (background, face) = (8, -8) for both anchors: no face anywhere
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([8.0, -8.0, 8.0, -8.0]))
    # Saved with DataParallel's 'module.' prefix, like the released file.
    torch.save({f"module.{k}": v for k, v in detector.state_dict().items()}, root / enhance.DETECTOR_FILE)
    parser = lib.ParseNet(in_size=128, out_size=128, parsing_ch=19)
    torch.save(parser.state_dict(), root / enhance.PARSER_FILE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    save_tiny_weights(root)
    return root


@pytest.fixture(scope="module")
def enhancer(weights: Path) -> enhance.GFPGANEnhancer:
    return enhance.GFPGANEnhancer.from_pretrained(weights, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def test_gfpgan_config_reads_the_v14_architecture() -> None:
    lib = enhance._import_gfpgan_stack()
    with lib.torch.device("meta"):  # shapes only: no 86 M parameters in memory
        full = lib.GFPGANv1Clean(
            out_size=512,
            num_style_feat=512,
            channel_multiplier=2,
            decoder_load_path=None,
            fix_decoder=False,
            num_mlp=8,
            input_is_latent=True,
            different_w=True,
            narrow=1,
            sft_half=True,
        )
    assert enhance.gfpgan_config(full.state_dict()) == enhance.GFPGANConfig(512, 512, 2, 1.0, 8, True, True)


def test_enhance_loader_builds_the_saved_architecture(enhancer: enhance.GFPGANEnhancer) -> None:
    assert enhancer.face_size == 128
    assert enhancer.parse_size == 128
    assert not enhancer.restorer.training and not enhancer.parser.training


def test_enhance_restore_on_a_real_face_crop(enhancer: enhance.GFPGANEnhancer, astronaut: np.ndarray) -> None:
    crop, affine = enhancer.align(astronaut, ASTRONAUT_LANDMARKS)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    # The aligned crop centres the face: the eyes land on the template's eye positions.
    eyes = np.c_[ASTRONAUT_LANDMARKS[:2], np.ones(2)] @ affine.T
    np.testing.assert_allclose(eyes, enhancer.template[:2], atol=3.0)

    batch = np.stack([crop, crop[:, ::-1].copy()])
    restored = enhancer.restore(batch)
    assert restored.shape == (2, 128, 128, 3) and restored.dtype == np.uint8
    assert np.abs(restored[0].astype(int) - crop).mean() > 5  # random weights: clearly not the input
    assert restored[0].std() > 1  # not a constant image
    raw = enhancer.restorer(
        enhancer.torch.from_numpy(crop[None]).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1,
        return_rgb=False,
        randomize_noise=False,
    )[0]
    assert enhancer.torch.isfinite(raw).all()
    # Stored noise, not a fresh draw: the same batch restores the same way every time, and a face does not depend
    # on the others in its batch (up to float rounding).
    np.testing.assert_array_equal(enhancer.restore(batch), restored)
    assert np.abs(enhancer.restore(crop[None])[0].astype(int) - restored[0]).max() <= 1


def test_enhance_frames_change_the_face_and_keep_the_background(
    enhancer: enhance.GFPGANEnhancer, astronaut: np.ndarray
) -> None:
    [out] = enhancer.enhance_frames([astronaut], [ASTRONAUT_LANDMARKS[None]])
    assert out.shape == astronaut.shape and out.dtype == np.uint8
    left, top, right, bottom = ASTRONAUT_FACE_BOX
    face_change = np.abs(out[top:bottom, left:right].astype(int) - astronaut[top:bottom, left:right]).mean()
    assert face_change > 5
    # Far from the face (bottom rows, right edge) nothing is touched.
    np.testing.assert_array_equal(out[400:], astronaut[400:])
    np.testing.assert_array_equal(out[:, 450:], astronaut[:, 450:])
    # No face in the frame's landmarks: the frame comes back unchanged.
    [same] = enhancer.enhance_frames([astronaut], [np.zeros((0, 5, 2), np.float32)])
    np.testing.assert_array_equal(same, astronaut)


def test_enhance_paste_back_inverts_the_alignment(enhancer: enhance.GFPGANEnhancer, astronaut: np.ndarray) -> None:
    crop, affine = enhancer.align(astronaut, ASTRONAUT_LANDMARKS)
    ones = np.ones(crop.shape[:2], np.float32)
    back = enhancer.paste_back(astronaut.astype(np.float32), crop, affine, ones)
    left, top, right, bottom = ASTRONAUT_FACE_BOX
    # Pasting the unrestored crop back lands every pixel where it came from (up to resampling blur).
    error = np.abs(back[top:bottom, left:right] - astronaut[top:bottom, left:right]).mean()
    assert error < 6.0


def test_landmark_track_bridges_short_misses_only() -> None:
    face = np.arange(10, dtype=np.float32).reshape(1, 5, 2)
    none = np.zeros((0, 5, 2), np.float32)
    track = enhance.LandmarkTrack(max_reuse=2)
    used = [track.step(f) for f in [none, face, none, none, none, face]]
    assert [len(u) for u in used] == [0, 1, 1, 1, 0, 1]
    assert (track.missed, track.reused, track.faces) == (2, 2, 4)


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    from renderer.encode import VideoWriter

    height, width = frames[0].shape[:2]
    with VideoWriter(path, width, height) as writer:
        for frame in frames:
            writer.write(frame)


def test_enhance_run_streams_the_video_and_loads_models_once(
    weights: Path, astronaut: np.ndarray, tmp_path: Path
) -> None:
    import cv2

    from renderer.encode import probe, read_frames

    face = cv2.resize(astronaut[40:232, 124:316], (96, 96), interpolation=cv2.INTER_AREA)
    frames = [np.roll(face, shift, axis=1) for shift in range(0, 14, 2)]  # 7 frames, batches of 3 + 3 + 1
    source = tmp_path / "in.mp4"
    _write_video(source, frames)
    garbled = tmp_path / "garbled.mp4"  # a video FFmpeg opens but cannot decode: fails alone, between the others
    data = bytearray(source.read_bytes())
    data[len(data) // 3 :] = bytes(len(data) - len(data) // 3)
    garbled.write_bytes(bytes(data))
    jobs = []
    for name, video in (("a", source), ("garbled", garbled), ("b", source)):
        out = tmp_path / name
        out.mkdir()
        jobs.append(
            StepJob(
                stage="enhance",
                key=name,
                settings=video_settings(),
                inputs={"video": video},
                out_dir=out,
                checkpoints=weights,
                label=f"videos[{name}]",
            )
        )
    pool = ModelPool()
    results = enhance.run(jobs, pool)
    bad = results.pop(1)
    assert isinstance(bad, RenderError) and str(bad).startswith("videos[garbled]: "), bad
    assert not list((tmp_path / "garbled").iterdir())
    jobs.pop(1)
    assert pool.loads == {(enhance.MODEL_ID, "cpu", "float32"): 1}
    for job, result in zip(jobs, results, strict=True):
        assert isinstance(result, dict), result
        assert result["frames"] == 7 and result["frames_without_face"] == 7 and result["faces"] == 0
        assert "no face found in any frame" in result["warnings"][0]
        info = probe(job.out_dir / "video.mp4")
        assert (info.frames, info.width, info.height, info.fps) == (7, 96, 96, 25)
        assert info.audio_codec is None
        # Faceless frames pass through: the output matches the decoded input up to one more H.264 generation.
        for before, after in zip(read_frames(source), read_frames(job.out_dir / "video.mp4"), strict=True):
            assert np.abs(before.astype(int) - after).mean() < 2.0
        assert sorted(p.name for p in job.out_dir.iterdir()) == ["video.mp4"]


def test_enhance_missing_weights_names_the_files_and_make_checkpoints(tmp_path: Path) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes(b"not needed: the weights are checked first")
    (tmp_path / "ck" / "gfpgan").mkdir(parents=True)
    (tmp_path / "ck" / "gfpgan" / "parsing_parsenet.pth").write_bytes(b"present")
    job = StepJob(
        stage="enhance",
        key="k",
        settings=video_settings(),
        inputs={"video": video},
        out_dir=tmp_path,
        checkpoints=tmp_path / "ck",
        label="videos[3]",
    )
    pool = ModelPool()
    [result] = enhance.run([job], pool)
    assert isinstance(result, MissingWeightsError)
    assert "videos[3]" in result.message
    assert "gfpgan/GFPGANv1.4.pth" in result.message and "gfpgan/detection_Resnet50_Final.pth" in result.message
    assert "parsing_parsenet" not in result.message
    assert "make checkpoints" in result.hint
    assert pool.loads == {}


def test_enhance_rejects_other_enhancers_and_missing_input(tmp_path: Path) -> None:
    job = StepJob(
        stage="enhance",
        key="k",
        settings=video_settings(enhancer="codeformer"),
        inputs={"video": tmp_path / "none.mp4"},
        out_dir=tmp_path,
        label="videos[0]",
    )
    no_input = StepJob(
        stage="enhance", key="k2", settings=video_settings(), inputs={}, out_dir=tmp_path, label="videos[1]"
    )
    first, second = enhance.run([job, no_input], ModelPool())
    assert isinstance(first, BadInputError) and "codeformer" in first.message
    assert isinstance(second, BadInputError) and "videos[1]" in second.message


class _Payload:
    """Unpickling this would create `marker`: a stand-in for code hidden in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_enhance_loading_refuses_pickled_objects(weights: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    root = tmp_path / "ck"
    shutil.copytree(weights, root)
    marker = tmp_path / "code-ran"
    torch.save(
        {"params_ema": {"conv_body_first.weight": torch.zeros(1)}, "extra": _Payload(marker)},
        root / enhance.RESTORER_FILE,
    )
    with pytest.raises(MissingWeightsError, match="weights_only=True") as info:
        enhance.GFPGANEnhancer.from_pretrained(root)
    assert str(root / enhance.RESTORER_FILE) in info.value.message
    assert "make checkpoints" in info.value.hint
    assert not marker.exists()


def test_enhance_loading_rejects_a_file_of_another_network(weights: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "ck"
    shutil.copytree(weights, root)
    shutil.copy(root / enhance.PARSER_FILE, root / enhance.RESTORER_FILE)  # ParseNet weights under GFPGAN's name
    with pytest.raises(MissingWeightsError, match="GFPGANv1Clean"):
        enhance.GFPGANEnhancer.from_pretrained(root)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("RUN_GPU") != "1", reason="needs a CUDA GPU and the real weights: set RUN_GPU=1")
def test_enhance_real_weights_find_and_restore_the_astronaut(astronaut: np.ndarray, tmp_path: Path) -> None:
    root = REPO / "checkpoints"
    if enhance.checkpoints_missing(root):
        pytest.skip(f"GFPGAN weights not in {root}: run `make checkpoints`")
    model = enhance.GFPGANEnhancer.from_pretrained(root, device="cuda", dtype="float16")
    [found] = model.detect(astronaut[None])
    assert len(found) == 1
    np.testing.assert_allclose(found[0], ASTRONAUT_LANDMARKS, atol=8)
    [out] = model.enhance_frames([astronaut], [found])
    assert out.shape == astronaut.shape
    np.testing.assert_array_equal(out[400:], astronaut[400:])
