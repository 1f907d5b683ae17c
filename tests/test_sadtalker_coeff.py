"""SadTalker front half: audio features, crop/alignment, 3DMM regressor and audio→coefficient networks.

Golden tests compare with numbers produced by upstream SadTalker (deterministic random weights from the published
fill rule) within the tolerances of their sidecars; they skip when ../shared/sadtalker is absent. The other tests
check behaviour on small synthetic inputs.
"""

from __future__ import annotations

import copy
import json
import wave
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import golden_adapter  # noqa: E402
from _sadtalker_util import (  # noqa: E402
    DATA,
    assert_matches,
    fill_checksum,
    fill_module,
    filled_weights,
    golden_inputs,
    load_golden,
    require_shared,
)

from renderer.base import SAMPLES_PER_FRAME  # noqa: E402
from renderer.sadtalker import audio, audio2coeff, preprocess, recon  # noqa: E402
from renderer.sadtalker.fold import fold_batchnorms  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the three networks built from the golden fill (loaded once per module).


# Each network as loaded and with its BatchNorms folded into the convolutions, as the stage runs it (fold.py).


def _maybe_folded(net: torch.nn.Module, request: pytest.FixtureRequest) -> torch.nn.Module:
    return fold_batchnorms(net) if request.param == "folded" else net


@pytest.fixture(scope="module", params=["loaded", "folded"])
def exp_net(request: pytest.FixtureRequest) -> audio2coeff.ExpNet:
    require_shared()
    return _maybe_folded(audio2coeff.ExpNet.from_state_dict(filled_weights("audio2exp")), request)


@pytest.fixture(scope="module", params=["loaded", "folded"])
def pose_net(request: pytest.FixtureRequest) -> audio2coeff.PoseVAE:
    require_shared()
    return _maybe_folded(audio2coeff.PoseVAE.from_state_dict(filled_weights("audio2pose")), request)


@pytest.fixture(scope="module", params=["loaded", "folded"])
def recon_net(request: pytest.FixtureRequest) -> recon.ReconNet:
    require_shared()
    return _maybe_folded(recon.ReconNet.from_state_dict(filled_weights("recon")), request)


def _tiny_nets() -> tuple[audio2coeff.ExpNet, audio2coeff.PoseVAE]:
    """Randomly initialised audio nets (no reference material needed), in eval mode."""
    torch.manual_seed(0)
    return audio2coeff.ExpNet().eval(), audio2coeff.PoseVAE().eval()


# ---------------------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("net", ["audio2exp", "audio2pose", "recon"])
def test_fill_weights_match_published_checksum(net: str) -> None:
    digest = fill_module().state_dict_digest(filled_weights(net))
    assert digest == fill_checksum(net), f"torch's seeded RNG changed: filled {net} weights differ from the goldens"


def test_posevae_from_state_dict_drops_training_parts_only() -> None:
    require_shared()
    state = dict(filled_weights("audio2pose"))
    net = audio2coeff.PoseVAE.from_state_dict(state)
    assert not net.training
    assert all(not k.startswith(audio2coeff.POSE_TRAINING_ONLY_PREFIXES) for k in net.state_dict())
    del state["netG.decoder.pose_linear.bias"]
    with pytest.raises(KeyError, match="pose_linear.bias"):
        audio2coeff.PoseVAE.from_state_dict(state)


def test_expnet_from_state_dict_rejects_unexpected_keys() -> None:
    state = audio2coeff.ExpNet().state_dict()
    state["mapping2.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mapping2.weight"):
        audio2coeff.ExpNet.from_state_dict(state)


def test_recon_from_state_dict_tolerates_missing_batch_counters() -> None:
    state = {k: v for k, v in recon.ReconNet().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert not recon.ReconNet.from_state_dict(state).training


# ---------------------------------------------------------------------------------------------------------------
# Audio features (SPEC §1.3, §4)


def test_audio_num_frames_truncates_to_whole_frames() -> None:
    assert audio.num_frames(0) == 0
    assert audio.num_frames(SAMPLES_PER_FRAME - 1) == 0
    assert audio.num_frames(SAMPLES_PER_FRAME * 7 + 639) == 7
    assert len(audio.trim_to_frames(np.zeros(SAMPLES_PER_FRAME * 3 + 5, np.float32))) == SAMPLES_PER_FRAME * 3


def test_audio_window_starts_truncate_toward_zero() -> None:
    starts = audio.window_starts(12)
    assert starts.tolist() == [-6, -3, 0, 3, 6, 9, 12, 16, 19, 22, 25, 28]


def test_audio_mel_matches_upstream_reference() -> None:
    require_shared()
    ref = np.load(DATA / "audio_reference_RD_Radio31_000.npz")
    meta = json.loads((DATA / "audio_reference_RD_Radio31_000.json").read_text())
    wav = ref["wav_mono_16k"]
    mel = audio.melspectrogram(audio.trim_to_frames(wav))
    assert mel.shape == tuple(meta["mel_shape"])
    np.testing.assert_allclose(mel, ref["mel_80xT"], rtol=0, atol=5e-6)
    windows = audio.mel_windows(wav)
    assert windows.shape == (meta["num_video_frames"], 1, 80, 16) and windows.dtype == np.float32
    np.testing.assert_allclose(windows[:, 0], ref["indiv_mels_Nx80x16"], rtol=0, atol=5e-6)
    assert np.array_equal(audio.window_starts(len(windows)), ref["window_start_idx"])


def test_audio_mel_windows_of_silence_are_floor_value() -> None:
    windows = audio.mel_windows(np.zeros(SAMPLES_PER_FRAME * 4 + 100, np.float32))
    assert windows.shape == (4, 1, 80, 16)
    assert np.all(windows == -audio.MAX_ABS_VALUE)
    assert audio.mel_windows(np.zeros(SAMPLES_PER_FRAME - 1, np.float32)).shape == (0, 1, 80, 16)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_audio_load_wav_16k_reads_pcm_and_resamples(tmp_path: Path) -> None:
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    _write_wav(tmp_path / "a.wav", tone, 16000)
    wav = audio.load_wav_16k(tmp_path / "a.wav")
    assert wav.dtype == np.float32 and wav.shape == (16000,)
    np.testing.assert_allclose(wav, tone, atol=1e-4)  # 16-bit quantisation

    t22 = np.arange(22050) / 22050
    _write_wav(tmp_path / "b.wav", (0.5 * np.sin(2 * np.pi * 440 * t22)).astype(np.float32), 22050)
    resampled = audio.load_wav_16k(tmp_path / "b.wav")
    assert abs(len(resampled) - 16000) <= 1
    np.testing.assert_allclose(resampled[1000:15000], tone[1000:15000], atol=0.01)


def test_audio_load_wav_16k_rejects_garbage(tmp_path: Path) -> None:
    from renderer.base import BadInputError

    (tmp_path / "x.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(BadInputError, match="x.wav"):
        audio.load_wav_16k(tmp_path / "x.wav")


# ---------------------------------------------------------------------------------------------------------------
# Networks against upstream (golden net_* files)


def test_expnet_matches_golden(exp_net: audio2coeff.ExpNet) -> None:
    arrays, sidecar = load_golden("net_audio2exp")
    inp = golden_inputs(arrays, sidecar)
    mel = torch.from_numpy(inp["mel"])
    with torch.no_grad():
        out = {
            "audio_embedding": exp_net.embed(mel),
            "exp": exp_net(mel, torch.from_numpy(inp["ref"][0]), torch.from_numpy(inp["ratio"][0]))[None],
        }
    assert_matches("net_audio2exp", out, arrays, sidecar)


def test_posevae_matches_golden(pose_net: audio2coeff.PoseVAE) -> None:
    arrays, sidecar = load_golden("net_audio2pose")
    inp = golden_inputs(arrays, sidecar)
    dec = pose_net.decoder
    z, style, ref = (torch.from_numpy(inp[k]) for k in ("z", "class_id", "ref_pose"))
    with torch.no_grad():
        emb = torch.cat([pose_net.audio_encoder(torch.from_numpy(m[None])) for m in inp["mel"]])
        mlp = dec.MLP(dec.mlp_input(z, style, ref, emb))
        out = {
            "audio_emb": emb,
            "decoder_mlp_out": mlp,
            "decoder_resunet_out": dec.resunet(mlp.reshape(-1, 1, 32, 6)),
            "pose_motion_pred": dec(z, style, ref, emb),
        }
    assert_matches("net_audio2pose", out, arrays, sidecar)


def test_recon_net_matches_golden(recon_net: recon.ReconNet) -> None:
    arrays, sidecar = load_golden("net_recon")
    image = torch.from_numpy(golden_inputs(arrays, sidecar)["image"])
    with torch.no_grad():
        out = {"backbone_feat": recon_net.backbone(image).flatten(1), "coeffs_257": recon_net(image)}
    assert_matches("net_recon", out, arrays, sidecar)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing (SPEC §3)


def test_resize_bilinear_is_opencv_exact() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for height, width, out_h, out_w in [
        (174, 174, 256, 256),
        (100, 37, 512, 300),
        (300, 211, 73, 97),
        (64, 64, 32, 32),
    ]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(preprocess.resize_bilinear(image, (out_w, out_h)), expected), (height, width)


def test_crop_face_matches_golden() -> None:
    arrays, sidecar = load_golden("stage_crop")
    out = golden_adapter.crop_stage(golden_inputs(arrays, sidecar), sidecar["options"]["preprocess"])
    assert_matches("stage_crop", out, arrays, sidecar)


def test_crop_stage_modes_follow_upstream() -> None:
    """SPEC §3.3: full crops as crop; ext modes keep the bordered box; resize keeps the whole image; crop_info[0]
    is the quad's size except in resize (the image's)."""
    arrays, sidecar = load_golden("stage_crop")
    inp = golden_inputs(arrays, sidecar)
    crop = golden_adapter.crop_stage(inp, "crop")
    full = golden_adapter.crop_stage(inp, "full")
    assert all(np.array_equal(crop[k], full[k]) for k in crop)  # full differs later (73 inputs, paste-back)
    ext = golden_adapter.crop_stage(inp, "extcrop")
    clx, cly, crx, cry = ext["crop"].tolist()
    assert ext["face_crop_u8"].shape == (cry - cly, crx - clx, 3)
    assert ext["crop_info_size"].tolist() == crop["crop_info_size"].tolist()
    assert not np.array_equal(ext["source_256_u8"], crop["source_256_u8"])
    resize = golden_adapter.crop_stage(inp, "resize")
    image = inp["image_full_u8"]
    assert resize["crop_info_size"].tolist() == [image.shape[1], image.shape[0]]
    assert np.array_equal(resize["face_crop_u8"], image)
    assert np.array_equal(resize["source_512_u8"], image)  # the astronaut is 512×512: nothing to resize
    geometry = preprocess.crop_geometry(inp["landmarks_68_full"], image.shape[1], image.shape[0])
    with pytest.raises(ValueError, match="resize"):
        preprocess.cut_face(image, geometry, "resize")


def test_crop_geometry_matches_test_vector_with_height_quirk() -> None:
    require_shared()
    vector = json.loads((DATA / "test_vectors.json").read_text())["croper_align_face_synthetic"]
    width, height = vector["image_WxH"]
    geometry = preprocess.crop_geometry(np.array(vector["landmarks68_xy"], np.float32), width, height)
    assert list(geometry.resized_size) == vector["rsize"]
    assert list(geometry.crop_box) == vector["crop"]
    np.testing.assert_allclose(geometry.quad, vector["quad_lx_ly_rx_ry"], rtol=1e-7, atol=1e-9)
    assert geometry.quad[3] == width  # the bottom edge is clamped by the width (upstream quirk, kept)


def test_crop_face_landmarks_follow_the_pixels() -> None:
    """Marks painted at landmark positions land where `landmarks_in_crop` says, in every mode."""
    rng = np.random.default_rng(3)
    height, width = 480, 360
    center = np.array([180.0, 250.0])
    base = rng.normal(0, 1, (68, 2)) * 3
    base[36:42] += center + [-40, -30]
    base[42:48] += center + [40, -30]
    base[48] = center + [-30, 45]
    base[54] = center + [30, 45]
    base[30] = center + [0, 10]
    base = np.rint(base)  # marks centred exactly on the landmarks
    for mode, size in [("crop", 256), ("full", 512), ("extcrop", 256), ("resize", 256)]:
        for idx in (30, 48, 54):
            image = np.zeros((height, width, 3), np.uint8)
            x, y = base[idx].astype(int)
            image[y - 2 : y + 3, x - 2 : x + 3] = 255
            result = preprocess.crop_face(image, base, mode, size)
            assert result.crop.shape == (size, size, 3)
            mass = result.crop[..., 0].astype(np.float64)
            ys, xs = np.indices(mass.shape)
            centroid = np.array([(xs * mass).sum(), (ys * mass).sum()]) / mass.sum()
            assert np.abs(centroid - result.landmarks_in_crop[idx]).max() < 0.5, (mode, idx)


def test_crop_face_landmarks_agree_with_dlib_on_the_crop() -> None:
    """The dlib path maps full-image landmarks into the crop instead of detecting again (as upstream does)."""
    pytest.importorskip("dlib")
    skimage_data = pytest.importorskip("skimage.data")
    from renderer.faces import detect_face

    image = skimage_data.astronaut()
    face = detect_face(image, "astronaut")
    result = preprocess.crop_face(image, face.landmarks, "crop", 256)
    again = detect_face(result.crop, "astronaut crop")
    key_points = [30, 36, 39, 42, 45, 48, 54]  # the points the crop and the 3DMM alignment use
    distance = np.linalg.norm(again.landmarks - result.landmarks_in_crop, axis=1)
    assert distance[key_points].max() < 3.0 and distance.mean() < 2.0, distance


def test_crop_info_describes_face_box_in_the_original_image() -> None:
    arrays, sidecar = load_golden("stage_crop")
    inp = golden_inputs(arrays, sidecar)
    result = preprocess.crop_face(inp["image_full_u8"], inp["landmarks_68_full"], "full", 256)
    info = result.crop_info
    x1, y1, x2, y2 = info.paste_box
    assert (x2 - x1, y2 - y1) == info.size
    assert 0 <= x1 < x2 <= info.image_size[0] and 0 <= y1 < y2 <= info.image_size[1]
    resized = preprocess.crop_face(inp["image_full_u8"], inp["landmarks_68_full"], "resize", 256).crop_info
    assert resized.size == resized.image_size and resized.paste_box == (0, 0, 512, 512)
    ext = preprocess.crop_face(inp["image_full_u8"], inp["landmarks_68_full"], "extfull", 256).crop_info
    assert ext.paste_box == ext.crop_box and ext.size == info.size  # size stays the quad's (upstream quirk)


def test_crop_face_shrinks_huge_faces_and_maps_back() -> None:
    """Faces whose quad exceeds 2048 px are cropped from a shrunk image; the paste box is in original pixels."""
    size = 2600
    landmarks = np.zeros((68, 2))
    landmarks[36:42] = (1040, 1100)
    landmarks[42:48] = (1560, 1100)
    landmarks[48], landmarks[54], landmarks[30] = (1100, 1600), (1500, 1600), (1300, 1350)
    image = np.zeros((size, size, 3), np.uint8)
    image[1340:1361, 1290:1311] = 255  # a mark on the nose tip
    result = preprocess.crop_face(image, landmarks, "full", 256)
    info = result.crop_info
    assert info.resized_size == (size // 2, size // 2)
    x1, y1, x2, y2 = info.paste_box
    assert abs((x2 - x1) - 2 * info.size[0]) <= 2 and x1 < 1300 < x2 and y1 < 1350 < y2
    mass = result.crop[..., 0].astype(np.float64)
    ys, xs = np.indices(mass.shape)
    centroid = np.array([(xs * mass).sum(), (ys * mass).sum()]) / mass.sum()
    assert np.abs(centroid - result.landmarks_in_crop[30]).max() < 0.5


def test_crop_face_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="zoom"):
        preprocess.crop_face(np.zeros((64, 64, 3), np.uint8), np.zeros((68, 2)), "zoom", 256)


def test_align_for_recon_matches_test_vector() -> None:
    require_shared()
    vector = json.loads((DATA / "test_vectors.json").read_text())["align_img_synthetic"]
    width, height = vector["frame_size"]
    frame = np.zeros((height, width, 3), np.uint8)
    landmarks = np.array(vector["landmarks68_image_xy_before_yflip"], np.float32)
    np.testing.assert_allclose(preprocess.alignment_points(frame, landmarks), vector["lm5p"], atol=1e-5)
    aligned, trans_params = preprocess.align_for_recon(frame, landmarks)
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.uint8
    np.testing.assert_allclose(trans_params, vector["trans_params_[w0,h0,s,tx,ty]"], rtol=1e-6)


def test_recon_stage_matches_golden(recon_net: recon.ReconNet) -> None:
    arrays, sidecar = load_golden("stage_recon224")
    inp = golden_inputs(arrays, sidecar)
    # Every crop in one forward pass, as the stage prepares several videos at once.
    stacked = golden_adapter.recon_stage(inp, recon_net)
    assert_matches("stage_recon224", stacked, arrays, sidecar)
    # The same crops one at a time (case 2 is all −1: the no-face fallback).
    single = [recon.coeffs_from_crop(recon_net, inp["image_256_u8"], points) for points in inp["landmarks_68"]]
    stacked["coeff_3dmm"] = np.stack([coeff[0] for coeff, _ in single])
    stacked["full_3dmm"] = np.stack([full[0] for _, full in single])
    assert_matches("stage_recon224", stacked, arrays, sidecar)


def test_coeffs_from_crop_without_landmarks_uses_standard_placement(recon_net: recon.ReconNet) -> None:
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    none_coeff, _ = recon.coeffs_from_crop(recon_net, image, None)
    minus_coeff, _ = recon.coeffs_from_crop(recon_net, image, np.full((68, 2), -1.0))
    assert none_coeff.shape == (1, 73) and none_coeff.dtype == np.float32
    np.testing.assert_array_equal(none_coeff, minus_coeff)


# ---------------------------------------------------------------------------------------------------------------
# Audio → coefficients (SPEC §5)


@pytest.mark.parametrize("name", ["stage_audio2coeff", "stage_audio2coeff_short"])
def test_audio2coeff_stage_matches_golden(
    name: str, exp_net: audio2coeff.ExpNet, pose_net: audio2coeff.PoseVAE
) -> None:
    arrays, sidecar = load_golden(name)
    out = golden_adapter.audio2coeff_stage(golden_inputs(arrays, sidecar), exp_net, pose_net)
    assert len(out["pose_audio_emb"]) == sidecar["options"]["num_pose_windows"]
    assert_matches(name, out, arrays, sidecar)


def test_pose_windows_cover_every_motion_frame_once() -> None:
    for frames in (1, 2, 20, 33, 50, 64, 65, 200):
        plan = audio2coeff.pose_windows(frames)
        kept = [i for first, stop, keep in plan for i in range(stop - keep, stop)]
        assert kept == list(range(frames - 1)), frames
        assert all(stop - first == min(32, frames - 1) for first, stop, _ in plan)


def test_random_blinks_are_seeded_five_frame_profiles() -> None:
    gen = torch.Generator().manual_seed(5)
    ratio = audio2coeff.random_blinks(400, gen)
    assert ratio.shape == (400, 1) and ratio.dtype == np.float32
    onsets = [i for i in range(400) if ratio[i, 0] == 0.5 and (i == 0 or ratio[i - 1, 0] == 0)]
    assert len(onsets) >= 4
    for onset in onsets:
        assert ratio[onset : onset + 5, 0].tolist() == pytest.approx(list(audio2coeff.BLINK_PROFILE))
    gaps = np.diff([-5, *onsets]) - 5
    assert gaps.min() >= 10 and gaps.max() <= 69
    again = audio2coeff.random_blinks(400, torch.Generator().manual_seed(5))
    assert np.array_equal(ratio, again)
    for frames in (0, 5, 20, 21):  # upstream crashes at 21 frames; here: no blink
        assert not audio2coeff.random_blinks(frames, torch.Generator().manual_seed(0)).any()


def test_smooth_pose_handles_short_clips() -> None:
    pose = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    assert np.array_equal(audio2coeff.smooth_pose(pose[:2]), pose[:2])
    smoothed = audio2coeff.smooth_pose(pose)
    assert smoothed.dtype == np.float32 and smoothed.std() < pose.std()
    line = np.linspace(0, 1, 40, dtype=np.float32)[:, None].repeat(6, 1)
    np.testing.assert_allclose(audio2coeff.smooth_pose(line), line, atol=1e-6)  # order-2 fit keeps a ramp
    np.testing.assert_allclose(audio2coeff.smooth_pose(line[:5]), line[:5], atol=1e-6)


def test_predict_coeffs_is_reproducible_from_the_generator() -> None:
    exp_net, pose_net = _tiny_nets()
    frames = 35  # one full pose window and a remainder
    windows = np.random.default_rng(1).uniform(-4, 4, (frames, 1, 80, 16)).astype(np.float32)
    source = np.random.default_rng(2).normal(size=(1, 73)).astype(np.float32)

    def run(seed: int, **kwargs: object) -> np.ndarray:
        return audio2coeff.predict_coeffs(
            exp_net, pose_net, windows, source, generator=torch.Generator().manual_seed(seed), **kwargs
        )

    first = run(7, pose_style=3)
    assert first.shape == (frames, 70) and first.dtype == np.float32
    scaled = run(7, pose_style=3, expression_scale=2.0)
    assert np.array_equal(scaled[:, 64:], first[:, 64:])  # same seed, same pose
    np.testing.assert_allclose(scaled[:, :64], 2 * first[:, :64], rtol=1e-6)
    assert not np.allclose(first[:, 64:], run(8, pose_style=3)[:, 64:])
    assert not np.allclose(first[:, 64:], run(7, pose_style=4)[:, 64:])

    still = audio2coeff.predict_coeffs(
        exp_net, None, windows, source, still=True, generator=torch.Generator().manual_seed(7)
    )
    assert np.array_equal(still[:, 64:], np.repeat(source[:, 64:70], frames, axis=0))
    np.testing.assert_array_equal(still[:, :64], first[:, :64])  # blinks are drawn first, the same way


def test_predict_coeffs_batch_equals_one_video_at_a_time() -> None:
    """Several videos in one pass of each network (as the stage prepares them) give each video what it gets alone,
    up to float noise: long and short, still and moving, each with its own seed, style and scale."""
    exp_net, pose_net = _tiny_nets()
    rng = np.random.default_rng(4)
    specs = [(35, 7, {"pose_style": 3}), (5, 8, {"still": True}), (70, 9, {"expression_scale": 1.5}), (1, 10, {})]
    requests, alone = [], []
    for frames, seed, options in specs:
        windows = rng.uniform(-4, 4, (frames, 1, 80, 16)).astype(np.float32)
        source = rng.normal(size=73).astype(np.float32)
        alone.append(
            audio2coeff.predict_coeffs(
                exp_net, pose_net, windows, source, generator=torch.Generator().manual_seed(seed), **options
            )
        )
        requests.append(audio2coeff.CoeffRequest(windows, source, torch.Generator().manual_seed(seed), **options))
    batched = audio2coeff.predict_coeffs_batch(exp_net, pose_net, requests)
    assert [coeff.shape for coeff in batched] == [(frames, 70) for frames, _, _ in specs]
    for one, many in zip(alone, batched, strict=True):
        np.testing.assert_allclose(many, one, rtol=0, atol=1e-5)
    assert audio2coeff.predict_coeffs_batch(exp_net, pose_net, []) == []


def test_predict_coeffs_handles_clips_upstream_crashes_on() -> None:
    exp_net, pose_net = _tiny_nets()
    source = np.random.default_rng(2).normal(size=73).astype(np.float32)
    for frames in (1, 2, 21):  # savgol needs 3 frames; the blink sampler's range is empty at 21
        windows = np.zeros((frames, 1, 80, 16), np.float32)
        coeff = audio2coeff.predict_coeffs(
            exp_net, pose_net, windows, source, generator=torch.Generator().manual_seed(0)
        )
        assert coeff.shape == (frames, 70) and np.isfinite(coeff).all()
        if frames < 3:  # unsmoothed: frame 0 is the source pose itself
            np.testing.assert_allclose(coeff[0, 64:], source[64:70], atol=1e-6)


def test_predict_coeffs_rejects_empty_audio() -> None:
    exp_net, pose_net = _tiny_nets()
    with pytest.raises(ValueError, match="shorter than one video frame"):
        audio2coeff.predict_coeffs(
            exp_net, pose_net, np.zeros((0, 1, 80, 16), np.float32), np.zeros(73), generator=torch.Generator()
        )


@pytest.mark.parametrize("name", ["recon", "audio2exp", "audio2pose"])
def test_fold_batchnorms_keeps_outputs_and_leaves_only_unfoldable_norms(name: str) -> None:
    """Folding (done at load by the stage) keeps every output within float32 rounding, with random BatchNorm
    statistics so the fold has work to do; only the pose U-Net's pre-activation norms (BN → ReLU → conv) stay."""
    torch.manual_seed(3)
    build = {"recon": recon.ReconNet, "audio2exp": audio2coeff.ExpNet, "audio2pose": audio2coeff.PoseVAE}[name]
    net = build().eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    folded = fold_batchnorms(copy.deepcopy(net))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert norms > 0 and left == {"recon": 0, "audio2exp": 0, "audio2pose": 6}[name], (norms, left)
    with torch.no_grad():
        if name == "recon":
            image = torch.rand(2, 3, 224, 224)
            pairs = [(net(image), folded(image))]
        elif name == "audio2exp":
            mel, ref, blink = torch.randn(4, 1, 80, 16), torch.randn(4, 64), torch.rand(4, 1)
            pairs = [(net(mel, ref, blink), folded(mel, ref, blink))]
        else:
            mel = torch.randn(1, 32, 1, 80, 16)
            z, style, ref = torch.randn(1, 64), torch.tensor([3]), torch.randn(1, 6)
            emb, emb_folded = net.audio_encoder(mel), folded.audio_encoder(mel)
            pairs = [(emb, emb_folded), (net.decoder(z, style, ref, emb), folded.decoder(z, style, ref, emb))]
    for expected, got in pairs:
        assert not torch.equal(expected, torch.zeros_like(expected))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
