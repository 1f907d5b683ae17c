"""SadTalker back half: renderer networks, keypoint maths, checkpoint loading, paste-back and the animate stage.

Golden tests run the networks on the filled weights of the published fill rule and compare with upstream's numbers
within the sidecar tolerances (they skip when ../shared/sadtalker is absent). Rendering one 256 frame costs about
1.2 TFLOP (≈ 6 s on two cores), so the default run renders a handful of frames; the rest of the golden renders
(512, sharp mask, all frames of stage_facerender) run with RUN_SLOW=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import golden_adapter  # noqa: E402
from _audio_util import tone, write_wav  # noqa: E402
from _sadtalker_util import (  # noqa: E402
    DATA,
    SHARED,
    assert_matches,
    fill_checksum,
    fill_module,
    filled_weights,
    golden_inputs,
    load_golden,
    require_shared,
)

from renderer.base import (  # noqa: E402
    SAMPLES_PER_FRAME,
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
)
from renderer.sadtalker import facerender as fr  # noqa: E402
from renderer.sadtalker import kernels, pipeline, weights  # noqa: E402
from renderer.sadtalker.paste import PasteBack  # noqa: E402

slow = pytest.mark.skipif(
    os.environ.get("RUN_SLOW") != "1", reason="renders several large frames (minutes on 2 cores): set RUN_SLOW=1"
)
PREFIX_OF = {"kp_detector": "kp_extractor", "generator": "generator"}


# ---------------------------------------------------------------------------------------------------------------
# Networks from the golden fill (module-scoped: filling the generator takes seconds)


def _build(module: torch.nn.Module, net: str, fuse: bool = True, state: dict | None = None) -> torch.nn.Module:
    weights.load_strict(module, state if state is not None else filled_weights(net), f"fill rule ({net})")
    module.eval()
    return fr.fuse_for_inference(module) if fuse else module.requires_grad_(False)


@pytest.fixture(scope="module")
def kp_detector() -> fr.KPDetector:
    require_shared()
    return _build(fr.KPDetector(), "kp_detector")


@pytest.fixture(scope="module")
def mappings() -> dict[int, fr.MappingNet]:
    require_shared()
    return {c: _build(fr.MappingNet(c), f"mapping{c}") for c in (70, 73)}


@pytest.fixture(scope="module")
def generator() -> fr.OcclusionAwareSPADEGenerator:
    require_shared()
    return _build(fr.OcclusionAwareSPADEGenerator(), "generator")


def _vectors() -> dict:
    require_shared()
    return json.loads((DATA / "test_vectors.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Keypoint maths and grids vs data/test_vectors.json (SPEC §7.1, §7.4, §6)


def test_fill_renderer_weights_match_published_checksum() -> None:
    digest = fill_module().state_dict_digest(filled_weights("generator"))
    assert digest == fill_checksum("generator"), "torch's seeded RNG changed: the golden fill no longer matches"


def test_coordinate_grid_matches_test_vector() -> None:
    want = np.array(_vectors()["make_coordinate_grid_d2_h3_w4"], dtype=np.float32)
    np.testing.assert_array_equal(fr.make_coordinate_grid(2, 3, 4).numpy(), want)


def test_rotation_matrix_uses_pi_3_14_and_pitch_yaw_roll_order() -> None:
    vector = _vectors()["rotation_matrix"]
    yaw, pitch, roll = torch.tensor(vector["inputs_yaw_pitch_roll_deg"], dtype=torch.float32).T
    got = fr.rotation_matrix(yaw, pitch, roll).numpy()
    np.testing.assert_allclose(got, np.array(vector["R"]), atol=1e-6)
    scale = math.pi / fr.PI_APPROX  # the same angles converted with the exact π: a visibly different rotation
    exact_pi = fr.rotation_matrix(yaw * scale, pitch * scale, roll * scale).numpy()
    assert np.abs(exact_pi[2] - np.array(vector["R"][2])).max() > 1e-4  # 100× the tolerance above


def test_headpose_degrees_match_test_vector() -> None:
    vector = _vectors()["headpose_pred_to_degree"]
    got = fr.headpose_pred_to_degree(torch.tensor(vector["logits_2x66"], dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), np.array(vector["degrees"]), atol=2e-5)


def test_keypoint_transformation_matches_test_vector() -> None:
    vector = _vectors()["keypoint_transformation"]
    he = fr.MappingOutput(**{k: torch.tensor(v, dtype=torch.float32) for k, v in vector["he"].items()})
    t_before = he.t.clone()
    got = fr.transform_keypoints(torch.tensor(vector["kp_canonical"], dtype=torch.float32), he)
    np.testing.assert_allclose(got.numpy(), np.array(vector["kp_out"]), atol=2e-6)
    assert torch.equal(he.t, t_before), "the mapping output must not be modified (upstream zeroes t in place)"


def test_keypoint_transformation_free_view_replaces_predicted_angles() -> None:
    vector = _vectors()["keypoint_transformation"]
    he = fr.MappingOutput(**{k: torch.tensor(v, dtype=torch.float32) for k, v in vector["he"].items()})
    kp = torch.tensor(vector["kp_canonical"], dtype=torch.float32)
    degrees = [fr.headpose_pred_to_degree(x) for x in (he.yaw, he.pitch, he.roll)]
    same = fr.transform_keypoints(kp, he, *degrees)
    np.testing.assert_allclose(same.numpy(), np.array(vector["kp_out"]), atol=2e-6)
    turned = fr.transform_keypoints(kp, he, yaw=degrees[0] + 30)
    assert (turned - same).abs().max() > 0.05


def test_gaussian_heatmap_matches_test_vector() -> None:
    vector = _vectors()["kp2gaussian_first2kp_spatial4x5x6_var0.01"]
    got = fr.kp_to_gaussian(torch.tensor(vector["kp"], dtype=torch.float32), tuple(vector["out_shape"][2:]))
    want = np.array(vector["out"], dtype=np.float32)
    assert got.shape == tuple(vector["out_shape"])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-30)


def test_antialias_kernel_and_stride_match_test_vector() -> None:
    vector = _vectors()["antialias_scale0.25"]
    kernel = np.array(vector["kernel_13x13"], dtype=np.float32)
    filled = filled_weights("kp_detector")["down.weight"].numpy()
    np.testing.assert_allclose(filled[0, 0], kernel, rtol=1e-6, atol=1e-12)
    down = fr.AntiAliasDownsample()
    down.weight.copy_(torch.from_numpy(filled))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pad = vector["pad_left_top"]
    full = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pad,) * 4), down.weight, groups=3)
    stride = vector["stride"]
    torch.testing.assert_close(down(x), full[:, :, ::stride, ::stride], rtol=0, atol=1e-6)


def test_window_indices_match_test_vector() -> None:
    vector = _vectors()["transform_semantic_target_window_indices"]
    for frame, want in vector.items():
        assert fr.window_indices(int(frame), 10).tolist() == want


def test_camera_pose_sequence_matches_test_vector() -> None:
    vector = _vectors()["gen_camera_pose"]
    got = fr.camera_pose_sequence(vector["yaw_list"], vector["frame_num"])
    np.testing.assert_allclose(
        golden_adapter.pad_reshape(got, vector["batch_size"]), np.array(vector["out"]), atol=1e-9
    )
    single = vector["single_value"]
    got = fr.camera_pose_sequence(single["list"], single["frame_num"])
    np.testing.assert_array_equal(golden_adapter.pad_reshape(got, single["batch_size"]), np.array(single["out"]))
    with pytest.raises(ValueError, match="repeat"):
        fr.camera_pose_sequence([10, 10, 20], 8)


def test_target_coefficients_scale_expression_and_freeze_pose() -> None:
    rng = np.random.default_rng(0)
    target, source = rng.normal(size=(5, 70)).astype(np.float32), rng.normal(size=(1, 73)).astype(np.float32)
    crop = fr.target_coefficients(target, source, "crop", expression_scale=2.0)
    np.testing.assert_allclose(crop[:, :64], target[:, :64] * 2)
    np.testing.assert_array_equal(crop[:, 64:], target[:, 64:])
    full = fr.target_coefficients(target, source, "full", still=True)
    assert full.shape == (5, 73)
    np.testing.assert_array_equal(full[:, 64:], np.repeat(source[:, 64:], 5, axis=0))
    np.testing.assert_array_equal(full[:, :64], target[:, :64])
    assert fr.source_window(source, "resize").shape == (70, 27)


# ---------------------------------------------------------------------------------------------------------------
# Networks vs golden files (SPEC §7)


@pytest.mark.parametrize("channels", [70, 73])
def test_mapping_net_matches_golden(mappings: dict[int, fr.MappingNet], channels: int) -> None:
    name = f"net_mapping{channels}"
    arrays, sidecar = load_golden(name)
    with torch.inference_mode():
        out = mappings[channels](torch.from_numpy(arrays["input_3dmm"]))
    got = {k: getattr(out, k) for k in ("yaw", "pitch", "roll", "t", "exp")}
    got.update({f"{k}_deg": fr.headpose_pred_to_degree(getattr(out, k)) for k in ("yaw", "pitch", "roll")})
    assert_matches(name, got, arrays, sidecar)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "checkpoint-layout"])
def test_kp_detector_matches_golden(fuse: bool, kp_detector: fr.KPDetector) -> None:
    arrays, sidecar = load_golden("net_kp_detector")
    net = kp_detector if fuse else _build(fr.KPDetector(), "kp_detector", fuse=False)
    image = torch.from_numpy(arrays["image"])
    with torch.inference_mode():
        logits = net.logits(image)
        got = {
            "kp": net(image),
            "downsampled": net.down(image),
            "kp_logit_max_mean": torch.stack([logits.flatten(2).amax(2), logits.flatten(2).mean(2)], dim=-1),
        }
    assert_matches("net_kp_detector", got, arrays, sidecar)


def _generator_outputs(gen: fr.OcclusionAwareSPADEGenerator, arrays: dict) -> dict:
    with torch.inference_mode():
        feature = gen.encode_source(torch.from_numpy(arrays["source_image"]))
        out = gen.animate(
            feature, torch.from_numpy(arrays["kp_source"]), torch.from_numpy(arrays["kp_driving"]), details=True
        )
    got = {
        "prediction": out.prediction,
        "occlusion_map": out.occlusion_map,
        "feature_3d_mean_hw": feature.mean(dim=(3, 4)),
        "mask_mean": out.mask.mean(dim=(2, 3, 4)),
        "mask_frac_below_1e-3": (out.mask < fr.MASK_FLOOR).float().mean().reshape(1),
        "decoder_input_mean_hw": out.decoder_input.mean(dim=(2, 3)),
    }
    if "deformation" in arrays:
        got["deformation"] = out.deformation
        got["mask_depth8"] = out.mask[:, :, 8]
    return got


def test_generator_matches_golden(generator: fr.OcclusionAwareSPADEGenerator) -> None:
    arrays, sidecar = load_golden("net_generator")
    assert_matches("net_generator", _generator_outputs(generator, arrays), arrays, sidecar)


def test_generator_channels_last_matches_golden(generator: fr.OcclusionAwareSPADEGenerator) -> None:
    """The layout CUDA runs (weights channels-last, so every activation is): same golden outputs on the CPU."""
    import copy

    arrays, sidecar = load_golden("net_generator")
    gen = weights.place(copy.deepcopy(generator), "cpu", channels_last=True)
    assert gen.decoder.fc.weight.is_contiguous(memory_format=torch.channels_last)
    assert_matches("net_generator", _generator_outputs(gen, arrays), arrays, sidecar)


@pytest.mark.parametrize("channels_last", [False, True])
def test_motion_heads_equal_the_mask_and_occlusion_convolutions(channels_last: bool) -> None:
    """MotionHeads (one 2-D conv over depth slices, shifted sums) == the 7³ mask conv and the depth-stacked 7×7
    occlusion conv it replaces, for every depth tap including the zero-padded ends."""
    torch.manual_seed(0)
    channels, depth = 12, 5
    mask = torch.nn.Conv3d(channels, fr.NUM_KP + 1, 7, padding=3)
    occlusion = torch.nn.Conv2d(channels * depth, 1, 7, padding=3)
    x = torch.randn(2, channels, depth, 9, 11)
    if channels_last:
        mask = mask.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    heads = fr.MotionHeads(mask, occlusion)
    with torch.inference_mode():
        mask_logits, occlusion_logits = heads(x)
        want_mask, want_occlusion = mask(x), occlusion(x.reshape(2, -1, 9, 11))
    assert mask_logits.shape == want_mask.shape and occlusion_logits.shape == want_occlusion.shape
    torch.testing.assert_close(mask_logits, want_mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(occlusion_logits, want_occlusion, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_modulated_instance_norm_keeps_layout_and_equals_instance_norm(channels_last: bool) -> None:
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, 8, 10, 12) * 4 + 2).contiguous(memory_format=fmt)
    gain = torch.randn(3, 8, 10, 12).contiguous(memory_format=fmt)
    shift = torch.randn(3, 8, 10, 12).contiguous(memory_format=fmt)
    got = fr.modulated_instance_norm(x, gain, shift)
    want = torch.nn.functional.instance_norm(x, eps=1e-5) * gain + shift
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=fmt)


@slow
def test_generator_sharp_mask_matches_golden() -> None:
    arrays, sidecar = load_golden("net_generator_sharpmask")
    state = dict(filled_weights("generator"))
    for key in ("dense_motion_network.mask.weight", "dense_motion_network.mask.bias"):
        state[key] = state[key] * 25.0
    gen = _build(fr.OcclusionAwareSPADEGenerator(), "generator", state=state)
    got = _generator_outputs(gen, arrays)
    assert got["mask_frac_below_1e-3"].item() > 0.3  # the zeroing step is really exercised
    assert_matches("net_generator_sharpmask", got, arrays, sidecar)


@slow
def test_generator_512_matches_golden(generator: fr.OcclusionAwareSPADEGenerator, kp_detector: fr.KPDetector) -> None:
    arrays, sidecar = load_golden("net_generator_512")
    got = _generator_outputs(generator, arrays)
    with torch.inference_mode():
        got["kp_canonical"] = kp_detector(torch.from_numpy(arrays["source_image"]))
    assert_matches("net_generator_512", got, arrays, sidecar)


# ---------------------------------------------------------------------------------------------------------------
# Render stage vs golden files (SPEC §6, §7.10, §8.1): upstream's batch layout, reproduced for the comparison


def _renderer(kp_detector, mappings, generator, preprocess: str) -> fr.FaceRenderer:
    return fr.FaceRenderer(kp_detector, mappings[fr.mapping_channels(preprocess)], generator)


def test_facerender_kp_variants_match_golden(kp_detector, mappings, generator) -> None:
    arrays, sidecar = load_golden("stage_facerender_kp_variants")
    inp = golden_inputs(arrays, sidecar)
    got = {}
    for i, variant in enumerate(sidecar["options"]["variants"]):
        renderer = _renderer(kp_detector, mappings, generator, variant["preprocess"])
        outputs, prepared = golden_adapter.prepare_render(inp, variant, f"v{i}_", renderer)
        got.update(outputs)
    got["kp_canonical"] = prepared["state"].kp_canonical[:1]
    assert_matches("stage_facerender_kp_variants", got, arrays, sidecar)


def _crop_size() -> tuple[int, int]:
    """crop_info[0] of the matching stage_crop golden (upstream restores the aspect ratio from it)."""
    crop_arrays, _ = load_golden("stage_crop")
    width, height = crop_arrays["crop_info_size"].tolist()
    return width, height


def _check_facerender_stage(kp_detector, mappings, generator, all_frames: bool) -> None:
    arrays, sidecar = load_golden("stage_facerender")
    opt = sidecar["options"]
    if all_frames:  # every render step, all batch rows, like make_animation: the checker's adapter as it is
        inp = golden_inputs(arrays, sidecar)
        renderer = _renderer(kp_detector, mappings, generator, opt["preprocess"])
        got = golden_adapter.render_stage(inp, opt, renderer, crop_size=_crop_size())
        assert got["kp_driving"].shape[0] == opt["render_steps"]
        assert_matches("stage_facerender", got, arrays, sidecar)
        return
    # Frame 0 only (render step 0, batch row 0): the same chain at a sixth of the cost.
    renderer = _renderer(kp_detector, mappings, generator, opt["preprocess"])
    got, prepared = golden_adapter.prepare_render(golden_inputs(arrays, sidecar), opt, "", renderer)
    state = prepared["state"]
    assert got["kp_driving"].shape[0] == opt["render_steps"]
    got.update(golden_adapter.mapping_outputs(prepared), kp_canonical=state.kp_canonical)
    with torch.inference_mode():
        out = renderer.render(state.feature[:1], state.kp_source[:1], got["kp_driving"][0, :1])
    frames_u8 = fr.frames_to_uint8(out.prediction)
    got.update(
        occlusion_map=out.occlusion_map[None],
        frames=out.prediction,
        frames_u8=frames_u8,
        frames_final_u8=golden_adapter.restore_aspect(frames_u8, opt["size"], _crop_size()),
    )
    arrays = dict(arrays, occlusion_map=arrays["occlusion_map"][:1, :1])
    for key in ("frames", "frames_u8", "frames_final_u8"):
        arrays = dict(arrays, **{key: arrays[key][:1]})
    assert_matches("stage_facerender", got, arrays, sidecar)


def test_facerender_stage_matches_golden_first_frame(kp_detector, mappings, generator) -> None:
    _check_facerender_stage(kp_detector, mappings, generator, all_frames=False)


@slow
def test_facerender_stage_matches_golden_all_frames(kp_detector, mappings, generator) -> None:
    _check_facerender_stage(kp_detector, mappings, generator, all_frames=True)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint loading (SPEC §2)


def _inventory(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    return fill_module().read_inventory_txt(SHARED / "inventory" / name)


@pytest.fixture(scope="module")
def fake_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints folder holding the fill-rule weights in the official layouts.

    The 256 safetensors file has every key of inventory/SadTalker_V0.0.2_safetensors_expected_keys.txt (725 MB,
    the size of the published file; filling and writing it takes about 5 s), filled per network with the prefix
    stripped so each network gets exactly the golden weights; the mapping nets are torch pickles
    {"mapping": state_dict, "epoch": n} written with torch.save.
    """
    from safetensors.torch import save_file

    require_shared()
    root = tmp_path_factory.mktemp("checkpoints")
    rows = _inventory("SadTalker_V0.0.2_safetensors_expected_keys.txt")
    assert len(rows) == 1305
    tensors = {}
    for network in weights.NETWORKS:
        prefix = network + "."
        sub = [(key[len(prefix) :], shape, dtype) for key, shape, dtype in rows if key.startswith(prefix)]
        tensors.update({prefix + k: v for k, v in fill_module().fill_state_dict(sub).items()})
    assert len(tensors) == len(rows), "a key matched no network prefix"
    save_file(tensors, str(root / "SadTalker_V0.0.2_256.safetensors"))
    del tensors
    for channels, name in weights.MAPPING_FILES.items():
        torch.save({"mapping": dict(filled_weights(f"mapping{channels}")), "epoch": 1}, root / name)
    return root


def test_weights_split_safetensors_by_prefix(fake_checkpoints: Path) -> None:
    ckpt = weights.checkpoint_set(fake_checkpoints, 256, "crop")
    assert not ckpt.legacy
    expected = {network: 0 for network in weights.NETWORKS}
    for key, _, _ in _inventory("SadTalker_V0.0.2_safetensors_expected_keys.txt"):
        expected[key.split(".", 1)[0]] += 1
    for network in weights.NETWORKS:
        state = ckpt.state_dict(network)
        assert len(state) == expected[network] and not any(k.startswith(network + ".") for k in state)
    kp = ckpt.state_dict("kp_extractor")
    assert torch.equal(kp["down.weight"], filled_weights("kp_detector")["down.weight"])
    assert ckpt.state_dict("mapping").keys() == filled_weights("mapping70").keys()


def test_load_face_renderer_loads_strictly_and_matches_golden(fake_checkpoints: Path) -> None:
    renderer = weights.load_face_renderer(fake_checkpoints, 256, "full")
    assert renderer.coeff_channels == 73  # full → mapping_00109 (the crop path runs in the pipeline test)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in renderer.generator.down_blocks.modules())
    arrays, sidecar = load_golden("net_kp_detector")
    with torch.inference_mode():
        got = {"kp": renderer.kp_detector(torch.from_numpy(arrays["image"]))}
    assert_matches("net_kp_detector", got, arrays, sidecar)
    arrays, sidecar = load_golden("net_mapping73")
    with torch.inference_mode():
        out = renderer.mapping(torch.from_numpy(arrays["input_3dmm"]))
    assert_matches("net_mapping73", {"yaw": out.yaw, "exp": out.exp}, arrays, sidecar)


def test_weights_missing_files_name_them_and_make_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        weights.checkpoint_set(tmp_path, 512, "full")
    text = str(info.value)
    assert "SadTalker_V0.0.2_512.safetensors" in text and "mapping_00109-model.pth.tar" in text
    assert "make checkpoints" in info.value.hint


def test_weights_damaged_safetensors_is_reported(tmp_path: Path) -> None:
    (tmp_path / "SadTalker_V0.0.2_256.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"mapping": {}}, tmp_path / "mapping_00229-model.pth.tar")
    ckpt = weights.checkpoint_set(tmp_path, 256, "crop")
    with pytest.raises(MissingWeightsError, match="cannot read"):
        ckpt.state_dict("generator")


def test_load_strict_rejects_foreign_keys_and_tolerates_missing_batch_counters() -> None:
    state = dict(filled_weights("mapping70"))
    mapping = fr.MappingNet(70)
    bad = dict(state, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(MissingWeightsError, match="1 unexpected keys"):
        weights.load_strict(mapping, bad, "test file")
    with pytest.raises(MissingWeightsError, match="does not match MappingNet"):
        weights.load_strict(fr.MappingNet(73), state, "test file")
    kp_state = {k: v for k, v in filled_weights("kp_detector").items() if not k.endswith("num_batches_tracked")}
    weights.load_strict(fr.KPDetector(), kp_state, "legacy pickle")  # no error


def test_weights_refuse_untrusted_pickle_until_converted(tmp_path: Path) -> None:
    state = dict(filled_weights("mapping70"))
    path = tmp_path / "mapping_00229-model.pth.tar"
    torch.save({"mapping": state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(weights.UntrustedCheckpointError) as info:
        weights.read_pickle_entry(path, "mapping")
    assert "argparse.Namespace" in info.value.message and "convert --trust" in info.value.hint
    with pytest.raises(PermissionError):
        weights.convert_trusted(path)
    assert weights.main(["convert", str(path)]) == 2  # the command line insists on --trust too
    assert weights.main(["convert", "--trust", str(path)]) == 0
    converted = tmp_path / "mapping_00229-model.safetensors"
    assert converted.is_file()
    path.write_bytes(b"not a pickle any more")  # proves the pickle is not read again
    loaded = weights.read_pickle_entry(path, "mapping")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_fall_back_to_complete_legacy_set(tmp_path: Path) -> None:
    exp_state = {k: v for k, v in filled_weights("audio2exp").items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": exp_state, "epoch": 300}, tmp_path / "auido2exp_00300-model.pth")
    torch.save({"mapping": dict(filled_weights("mapping70")), "epoch": 229}, tmp_path / "mapping_00229-model.pth.tar")
    with pytest.raises(MissingWeightsError):  # incomplete legacy set: the current layout is asked for
        weights.checkpoint_set(tmp_path, 256, "crop")
    torch.save({"net_recon": {}, "epoch": 20}, tmp_path / "epoch_20.pth")
    torch.save({"model": {}, "epoch": 140}, tmp_path / "auido2pose_00140-model.pth")
    torch.save({"generator": {}, "kp_detector": {}, "he_estimator": {}}, tmp_path / "facevid2vid_00189-model.pth.tar")
    ckpt = weights.checkpoint_set(tmp_path, 256, "crop")
    assert ckpt.legacy
    from renderer.sadtalker.audio2coeff import ExpNet

    loaded = ckpt.state_dict("audio2exp")
    assert all(torch.equal(loaded[k], exp_state[k]) for k in exp_state)
    ExpNet.from_state_dict(loaded)  # strict apart from the batch counters legacy pickles lack
    with pytest.raises(MissingWeightsError, match="does not match KPDetector"):
        weights.load_strict(fr.KPDetector(), ckpt.state_dict("kp_extractor"), "legacy")


# ---------------------------------------------------------------------------------------------------------------
# Paste-back (SPEC §8.3)


def test_paste_back_solves_the_poisson_problem() -> None:
    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    paste = PasteBack(portrait, (30, 20, 110, 90))
    face = rng.uniform(0, 255, (70, 80, 3))
    blended = paste.blend(face)

    def laplacian(a: np.ndarray) -> np.ndarray:
        return 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]

    np.testing.assert_allclose(laplacian(blended), laplacian(face), atol=1e-8)  # the face's gradients inside
    target = portrait[20:90, 30:110].astype(np.float64)
    for edge in (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1]):
        np.testing.assert_array_equal(blended[edge], target[edge])  # the portrait on the border


def test_paste_back_hides_a_brightness_step_and_keeps_the_rest() -> None:
    portrait = np.full((100, 100, 3), 120, np.uint8)
    paste = PasteBack(portrait, (20, 30, 84, 94))
    frame = np.full((256, 256, 3), 200, np.uint8)  # a uniformly brighter face: only a constant step
    out = paste(frame)
    assert out.shape == portrait.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 120).max() <= 1  # the step is absorbed completely
    outside = np.ones(portrait.shape[:2], bool)
    outside[30:94, 20:84] = False
    assert np.array_equal(out[outside], portrait[outside])


# ---------------------------------------------------------------------------------------------------------------
# The stage (pipeline.run) end to end on fill-rule weights


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(BadInputError) as info:
        pipeline.SadTalkerSettings.from_mapping(
            {"size": 300, "preprocess": "zoom", "batch_size": 0, "pose_style": 46, "dtype": "int8", "compile": "yes"},
            "videos[0]",
        )
    text = str(info.value)
    for word in ("videos[0]", "size", "preprocess", "batch_size", "pose_style", "dtype", "compile"):
        assert word in text
    ok = pipeline.SadTalkerSettings.from_mapping({"size": 512, "preprocess": "full", "still": True})
    assert (ok.size, ok.preprocess, ok.still, ok.batch_size, ok.compile) == (512, "full", True, 8, False)


def test_output_size_restores_aspect_with_even_height() -> None:
    assert pipeline.output_size(256, (174, 174)) == (256, 256)
    assert pipeline.output_size(256, (300, 279)) == (256, 238)  # trunc(238.08) is even already
    assert pipeline.output_size(256, (512, 300)) == (256, 150)
    assert pipeline.output_size(512, (400, 301)) == (512, 386)  # trunc(385.28) = 385 → 386
    assert pipeline.resolve_dtype("auto", "cuda:1") == "float16" and pipeline.resolve_dtype("auto", "cpu") == "float32"


def test_autocast_context_follows_the_dtype_setting() -> None:
    with pipeline._autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == torch.bfloat16
    with pipeline._autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.gpu
def test_generator_on_cuda_matches_golden_and_half_precision_stays_close(generator) -> None:
    """RUN_GPU=1: float32 on CUDA (TF32 off) within 5× the golden tolerances; float16 autocast error reported."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    arrays, sidecar = load_golden("net_generator")
    gen = weights.place(_build(fr.OcclusionAwareSPADEGenerator(), "generator"), "cuda")
    inputs = [torch.from_numpy(arrays[k]).cuda() for k in ("source_image", "kp_source", "kp_driving")]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = gen(*inputs)
            with torch.autocast("cuda", dtype=torch.float16):
                half = gen(*inputs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    tolerance = {k: {**v, "atol": v.get("atol", 1e-5) * 5} for k, v in sidecar["tolerance"].items()}
    assert_matches("net_generator", {"prediction": out.prediction, "occlusion_map": out.occlusion_map}, arrays,
                   dict(sidecar, tolerance=tolerance))  # fmt: skip
    error = (half.prediction.float() - out.prediction).abs()
    print(f"float16 autocast vs float32: max {error.max().item():.4f}, mean {error.mean().item():.5f}")
    assert error.mean().item() < 0.02  # bfloat16 on CPU measured 0.021 with these weights; float16 is finer


def _cuda_renderer(kp_detector, mappings, generator) -> fr.FaceRenderer:
    """A renderer of copies of the fixture networks, placed on CUDA as the stage does (the fixtures stay on the
    CPU for the other tests)."""
    import copy

    networks = (kp_detector, mappings[70], generator)
    return weights.place(fr.FaceRenderer(*(copy.deepcopy(net) for net in networks)).eval(), "cuda")


def _frames_and_keypoints(renderer: fr.FaceRenderer, device: str, dtype: torch.dtype) -> list[np.ndarray]:
    """One random portrait rendered for 2 frames under autocast: [source feature, driving keypoints, uint8 frames]."""
    rng = np.random.default_rng(5)
    image = torch.from_numpy(rng.random((1, 3, 256, 256), dtype=np.float32)).to(device)
    semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32)).to(device)
    windows = torch.from_numpy(rng.normal(size=(2, 70, fr.WINDOW)).astype(np.float32)).to(device)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False):
        state = renderer.prepare_source(image, semantics)
        feature = state.feature.expand(2, -1, -1, -1, -1).contiguous()
        kp_driving = renderer.driving_keypoints(state.kp_canonical.expand(2, -1, -1), windows)
        frames = fr.frames_to_uint8(renderer.render(feature, state.kp_source.expand(2, -1, -1), kp_driving).prediction)
    return [state.feature.float().cpu().numpy(), kp_driving.float().cpu().numpy(), frames]


def test_renderer_weights_cast_for_autocast_give_the_same_frames(kp_detector, mappings, generator) -> None:
    """A half-precision run stores the renderer's convolution and linear weights in the autocast dtype (autocast
    would cast them on every batch, every graph replay): bfloat16 frames stay bit-identical, and only what feeds
    float32 arithmetic on purpose stays float32 (BatchNorm statistics, the motion heads' summed biases)."""
    import copy

    plain = fr.FaceRenderer(copy.deepcopy(kp_detector), copy.deepcopy(mappings[70]), copy.deepcopy(generator)).eval()
    cast = weights.cast_for_autocast(copy.deepcopy(plain), torch.bfloat16)
    tensors = [*cast.named_parameters(), *cast.named_buffers()]
    kept = {name for name, t in tensors if t.dtype == torch.float32}
    assert {name for name, t in tensors if t.dtype == torch.bfloat16} and kept
    assert all(".norm" in name or name.endswith(("heads.mask_bias", "heads.occlusion_bias")) for name in kept), kept
    assert sum(t.numel() for name, t in tensors if name in kept) < 1000
    for one, other in zip(
        _frames_and_keypoints(plain, "cpu", torch.bfloat16),
        _frames_and_keypoints(cast, "cpu", torch.bfloat16),
        strict=True,
    ):
        np.testing.assert_array_equal(one, other)


@pytest.mark.gpu
def test_renderer_weights_cast_for_autocast_give_the_same_frames_on_cuda(kp_detector, mappings, generator) -> None:
    """RUN_GPU=1: the same on CUDA in float16, eager and as a recorded graph."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import copy

    from renderer.sadtalker.graphs import GraphedRender

    plain = _cuda_renderer(kp_detector, mappings, generator)
    cast = weights.cast_for_autocast(copy.deepcopy(plain), torch.float16)
    for one, other in zip(
        _frames_and_keypoints(plain, "cuda", torch.float16),
        _frames_and_keypoints(cast, "cuda", torch.float16),
        strict=True,
    ):
        np.testing.assert_array_equal(one, other)
    rng = np.random.default_rng(6)
    windows = torch.from_numpy(rng.normal(size=(4, 70, fr.WINDOW)).astype(np.float32)).cuda()
    frames = []
    for renderer in (plain, cast):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            tensors = _source_batch(renderer, np.random.default_rng(7), 4)
            frames.append(GraphedRender.capture(renderer, *tensors, windows, dtype=torch.float16)(*tensors, windows))
    np.testing.assert_array_equal(frames[0], frames[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "factors"),
    [((2, 5, 7, 9), (2, 2)), ((2, 5, 7, 9), (4, 4)), ((2, 3, 4, 6, 5), (1, 2, 2)), ((1, 1, 3, 3), (3, 2))],
)
def test_repeat_nearest_is_nearest_upsampling_in_the_input_layout(shape, factors, dtype) -> None:
    """`repeat_nearest` (the CUDA path of BROADCAST_UPSAMPLE) gives F.interpolate's nearest values bit for bit, for
    2-D and 3-D maps, and keeps a channels-last input channels-last (the layout the convolutions after it use)."""
    import torch.nn.functional as F

    last = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).to(dtype)
    for layout in (torch.contiguous_format, last):
        xx = x.contiguous(memory_format=layout)
        out = fr.repeat_nearest(xx, factors)
        assert torch.equal(out, F.interpolate(xx, scale_factor=tuple(map(float, factors)), mode="nearest"))
        assert out.is_contiguous(memory_format=layout)
    with pytest.raises(ValueError, match="whole factors"):
        fr.repeat_nearest(x, (2,) * (len(shape) - 1))


def test_conv_relu_is_relu_of_conv_and_norm_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`conv_relu` keeps an unfolded norm between the two, and FUSED_CONV_RELU changes nothing off CUDA."""
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4).eval()
    norm.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(fr, "FUSED_CONV_RELU", True)
    with torch.inference_mode():
        assert torch.equal(fr.conv_relu(conv, x, norm), torch.relu(norm(conv(x))))
        assert torch.equal(fr.conv_relu(conv, x, torch.nn.Identity()), torch.relu(conv(x)))
        assert torch.equal(fr.conv_relu(conv, x), torch.relu(conv(x)))


@pytest.mark.gpu
def test_kernel_options_on_cuda_keep_the_frames(kp_detector, mappings, generator, monkeypatch) -> None:
    """RUN_GPU=1: BROADCAST_UPSAMPLE's copy gives F.interpolate's values exactly on CUDA, in both layouts, and its
    float16 frames stay as close to float32 as the default's (on an H100 they were not bit-identical to the
    default's: 6.5 % of values differed, by at most 2 levels); FUSED_CONV_RELU really runs cuDNN's fused
    convolution, and its float16 frames are no further from float32 than the unfused ones; a recorded graph with
    both on replays its eager frames exactly."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import copy

    import torch.nn.functional as F

    from renderer.sadtalker.graphs import GraphedRender

    renderer = _cuda_renderer(kp_detector, mappings, generator)
    half = weights.cast_for_autocast(copy.deepcopy(renderer), torch.float16)
    rng = np.random.default_rng(8)
    windows = torch.from_numpy(rng.normal(size=(4, 70, fr.WINDOW)).astype(np.float32)).cuda()

    def frames(model, dtype, fused=False, broadcast=False, graph=False):
        monkeypatch.setattr(fr, "FUSED_CONV_RELU", fused)
        monkeypatch.setattr(fr, "BROADCAST_UPSAMPLE", broadcast)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype is not None):
            tensors = _source_batch(model, np.random.default_rng(9), 4)
            if graph:
                return GraphedRender.capture(model, *tensors, windows, dtype=dtype)(*tensors, windows).astype(int)
            kp_driving = model.driving_keypoints(tensors[1], windows)
            return fr.frames_to_uint8(model.render(tensors[0], tensors[2], kp_driving).prediction).astype(int)

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference = frames(renderer, None)
        plain = frames(half, torch.float16)
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(4, 64, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=layout)
            assert torch.equal(fr.repeat_nearest(x, (4, 4)), F.interpolate(x, scale_factor=(4.0, 4.0), mode="nearest"))
        broadcast = frames(half, torch.float16, broadcast=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused = frames(half, torch.float16, fused=True)
        assert any(event.name == "aten::cudnn_convolution_relu" for event in prof.events())
        np.testing.assert_array_equal(
            frames(half, torch.float16, True, True, graph=True), frames(half, torch.float16, True, True)
        )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    plain_error = np.abs(plain - reference)
    print(f"float16 vs float32, uint8 levels: default max {plain_error.max()} mean {plain_error.mean():.3f}; "
          f"broadcast upsample vs default: {np.mean(broadcast != plain):.2%} of values differ")  # fmt: skip
    for name, option in (("broadcast", broadcast), ("fused", fused)):
        error = np.abs(option - reference)
        print(f"{name}: max {error.max()} mean {error.mean():.3f}")
        assert error.mean() <= 1.5 * plain_error.mean() + 0.05 and error.max() <= 2 * plain_error.max() + 2, name


def test_transfer_copies_keep_values_and_dtypes_on_the_cpu() -> None:
    from renderer.sadtalker.transfer import to_device, to_host

    x = torch.arange(12, dtype=torch.float64).reshape(3, 4)[:, 1:]  # not contiguous
    assert torch.equal(to_host(x), x)
    y = to_device(x, "cpu", torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())
    assert to_device(torch.tensor([1, 2]), "cpu").dtype == torch.int64


@pytest.mark.gpu
def test_transfer_round_trip_on_cuda_keeps_values_in_stream_order() -> None:
    """RUN_GPU=1: pinned, asynchronous copies arrive whole and in order on the current stream, also on a side
    stream, right after the work that made them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from renderer.sadtalker.transfer import to_device, to_host

    host = torch.randn(64, 3, 128, 128)
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            on_gpu = to_device(host, "cuda", torch.float16)
            assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float16
            doubled = to_host(on_gpu.float() * 2)  # the multiply is queued; the copy must wait for it
            assert doubled.device.type == "cpu" and torch.equal(doubled, host.half().float() * 2)
    assert torch.equal(to_host(to_device(torch.tensor([3, 1, 2]), "cuda")), torch.tensor([3, 1, 2]))


@pytest.mark.gpu
def test_host_copy_on_cuda_keeps_the_values_it_was_started_with() -> None:
    """RUN_GPU=1: a `HostCopy` returns at once, and work queued after it may overwrite its source (as the next
    graph replay overwrites the static output): the copy still delivers the values of its own moment."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from renderer.sadtalker.transfer import HostCopy

    source = torch.zeros(16, 256, 256, 3, dtype=torch.uint8, device="cuda")
    copies = []
    for value in range(1, 6):
        torch.cuda._sleep(20_000_000)  # keep the stream busy, so the copies are still queued when the next comes
        source.fill_(value)
        copies.append(HostCopy(source))
    assert [int(c.result().unique().item()) for c in copies] == [1, 2, 3, 4, 5]
    assert all(c.result().is_pinned() for c in copies)


def _source_batch(renderer: fr.FaceRenderer, rng: np.random.Generator, batch: int) -> list[torch.Tensor]:
    """One random portrait's per-video state on CUDA, repeated `batch` times: [feature, kp_canonical, kp_source]
    (prepared under the caller's autocast)."""
    image = torch.from_numpy(rng.random((1, 3, 256, 256), dtype=np.float32)).cuda()
    semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32)).cuda()
    state = renderer.prepare_source(image, semantics)
    return [state.feature.expand(batch, -1, -1, -1, -1).contiguous(), state.kp_canonical.expand(batch, -1, -1),
            state.kp_source.expand(batch, -1, -1)]  # fmt: skip


@pytest.mark.gpu
def test_batch_too_large_for_the_gpu_is_rendered_in_pieces_on_cuda(kp_detector, mappings, generator) -> None:
    """RUN_GPU=1: with the process held to about 6 GB above what it already uses, a float16 batch of 32 frames at
    256 (about 16 GB eagerly on an H100) runs out of memory; the stage's `_render_rows` renders it in pieces that fit,
    and the frames equal those of the same pieces rendered with no limit."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    renderer = weights.cast_for_autocast(_cuda_renderer(kp_detector, mappings, generator), torch.float16)
    rng = np.random.default_rng(9)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        feature, kp_c, kp_s = _source_batch(renderer, rng, 32)
        windows = torch.from_numpy(rng.normal(size=(32, 70, fr.WINDOW)).astype(np.float32)).cuda()
        tensors = (feature, kp_c.contiguous(), kp_s.contiguous(), windows)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 6 * 2**30) / total))
        try:
            graphs = pipeline._Graphs(32, torch.float16, "cuda")  # recording runs out of memory too: eager pieces
            rendered = pipeline._render_rows(renderer, graphs, *tensors)
            frames = rendered.result().numpy()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        assert graphs.max_rows is not None and graphs.max_rows < 32

        def sizes(node) -> list[int]:  # the rows of each piece actually rendered, in order
            if isinstance(node, pipeline._Joined):
                return [n for part in node.parts for n in sizes(part)]
            return [len(node.result())]

        starts = np.cumsum([0, *sizes(rendered)])
        reference = np.concatenate([
            fr.frames_to_uint8(renderer.render(feature[a:b], tensors[2][a:b],
                                               renderer.driving_keypoints(tensors[1][a:b], windows[a:b])).prediction)
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ])  # fmt: skip
    assert starts[-1] == 32 and np.array_equal(frames, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_cuda_graph_replay_equals_eager_render(kp_detector, mappings, generator, dtype) -> None:
    """RUN_GPU=1: the recorded render batch (renderer/sadtalker/graphs.py) gives the eager batch's exact frames,
    and replays new inputs correctly (not the ones it was recorded with)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from renderer.sadtalker.graphs import GraphedRender

    renderer = _cuda_renderer(kp_detector, mappings, generator)
    rng = np.random.default_rng(3)

    def windows() -> torch.Tensor:
        return torch.from_numpy(rng.normal(size=(4, 70, fr.WINDOW)).astype(np.float32)).cuda()

    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        tensors = _source_batch(renderer, rng, 4)
        graphed = GraphedRender.capture(renderer, *tensors, windows(), dtype=dtype)
        for _ in range(2):
            w = windows()
            eager = fr.frames_to_uint8(renderer.render(tensors[0], tensors[2],
                                                       renderer.driving_keypoints(tensors[1], w)).prediction)  # fmt: skip
            replay = graphed(*tensors, w)
            assert replay.shape == (4, 256, 256, 3)
            assert np.array_equal(replay, eager)
            # A short batch replays the same graph on its first rows: the full batch's frames of those rows.
            short = graphed(*(t[:2] for t in tensors), w[:2])
            assert short.shape == (2, 256, 256, 3) and np.array_equal(short, replay[:2])


@pytest.mark.gpu
def test_compiled_render_step_matches_eager_float32(kp_detector, mappings, generator, tmp_path: Path) -> None:
    """RUN_GPU=1: `video.compile`'s step (compiled ahead of time into a package, loaded, recorded as a CUDA graph
    where its runner allows) against the eager float32 frames: compiled float32 differs by rounding only; compiled
    float16 stays within the bound the eager float16 test uses (mean error < 0.02 of full scale). A second call
    loads the package instead of compiling. Compiles twice or more (91–102 s each on an H100, more where the first
    variant fails its check)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import time

    from renderer.sadtalker import compiled
    from renderer.sadtalker.graphs import GraphedRender

    renderer = _cuda_renderer(kp_detector, mappings, generator)
    rng = np.random.default_rng(5)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            tensors = _source_batch(renderer, rng, 2)
            windows = torch.from_numpy(rng.normal(size=(2, 70, fr.WINDOW)).astype(np.float32)).cuda()
            tensors = [t.contiguous() for t in [*tensors, windows]]
            kp_driving = renderer.driving_keypoints(tensors[1], windows)
            eager = fr.frames_to_uint8(renderer.render(tensors[0], tensors[2], kp_driving).prediction).astype(int)
            errors = {}
            for dtype in (None, torch.float16):
                compiled.compiled_step(renderer, tensors, dtype, tmp_path)
                started = time.perf_counter()
                step = compiled.compiled_step(renderer, tensors, dtype, tmp_path)
                print(f"compiled {dtype or 'float32'} package loaded in {time.perf_counter() - started:.2f} s")
                if getattr(step, "graphable", True):
                    frames = GraphedRender.capture(renderer, *tensors, dtype=dtype, step=step)(*tensors)
                else:  # the second variant's package (the first failed its check here): called per batch
                    print("the package's runner cannot be recorded: called without CUDA graphs")
                    frames = step(*tensors).cpu().numpy()
                errors[dtype] = np.abs(frames.astype(int) - eager)
                del step
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert len(list(tmp_path.glob("render-*.pt2"))) == 2, "compiled just in time: no packages were written"
    for dtype, error in errors.items():
        print(f"compiled {dtype or 'float32'} vs eager float32: max {error.max()} levels, mean {error.mean():.4f}")
    assert errors[None].mean() < 0.1
    assert errors[torch.float16].mean() < 0.02 * 255


def test_compiled_step_is_compiled_once_then_loaded_from_its_package(
    kp_detector, mappings, generator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`video.compile`'s step, here on the CPU (where the stage calls it per full batch; on CUDA it is recorded as
    a graph): the first call exports and compiles it ahead of time into a package, a second call (a later run) loads that package
    without compiling, and the compiled bfloat16 frames are no further from float32 than the eager bfloat16 ones.
    A different batch shape needs another package. About 45 s (the compile) on the project's 2-core machine."""
    import copy
    import logging
    import time

    from renderer.sadtalker import compiled
    from renderer.sadtalker.graphs import RenderStep

    networks = (kp_detector, mappings[70], generator)
    plain = fr.FaceRenderer(*(copy.deepcopy(net) for net in networks)).eval()
    half = weights.cast_for_autocast(copy.deepcopy(plain), torch.bfloat16)
    rng = np.random.default_rng(11)
    image = torch.from_numpy(rng.random((1, 3, 256, 256), dtype=np.float32))
    semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32))
    windows = torch.from_numpy(rng.normal(size=(2, 70, fr.WINDOW)).astype(np.float32))
    with torch.inference_mode():
        state = plain.prepare_source(image, semantics)
        tensors = (state.feature.expand(2, -1, -1, -1, -1).contiguous(), state.kp_canonical.expand(2, -1, -1).contiguous(),
                   state.kp_source.expand(2, -1, -1).contiguous(), windows)  # fmt: skip
        reference = RenderStep(plain, None)(*tensors).numpy().astype(int)
        eager = RenderStep(half, torch.bfloat16)(*tensors).numpy().astype(int)
        with (
            caplog.at_level(logging.INFO, logger="renderer.sadtalker.compiled"),
            torch.autocast("cpu", dtype=torch.bfloat16),  # as in the stage's render loop
        ):
            compiled.compiled_step(half, tensors, torch.bfloat16, tmp_path)
            assert "compiled the render step ahead of time" in caplog.text
            caplog.clear()
            started = time.perf_counter()
            step = compiled.compiled_step(half, tensors, torch.bfloat16, tmp_path)
            loaded_in = time.perf_counter() - started
            assert "loaded the compiled render step" in caplog.text and "compiled the" not in caplog.text
        frames = step(*tensors).numpy().astype(int)
    packages = list(tmp_path.glob("render-*.pt2"))
    assert len(packages) == 1 and not list(tmp_path.glob(".*")), "one package, no temporary file left"
    assert loaded_in < 5, loaded_in
    assert frames.shape == (2, 256, 256, 3)
    compiled_error, eager_error = np.abs(frames - reference).mean(), np.abs(eager - reference).mean()
    assert compiled_error <= 1.5 * eager_error, (compiled_error, eager_error)
    assert np.abs(frames[0] - frames[1]).mean() > 1, "the two frames of the batch should differ"
    other = tuple(t[:1] for t in tensors)
    step_of = RenderStep(half, torch.bfloat16)
    assert compiled.package_key(step_of, other) != compiled.package_key(step_of, tensors)


def test_compiled_step_falls_back_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A package that does not load is compiled again; where compiling ahead of time fails, the step is compiled
    just in time; where the cache folder cannot be written, the package goes to a temporary folder for the run."""
    import logging

    from renderer.sadtalker import compiled

    monkeypatch.setattr(compiled, "package_key", lambda step, example, variant: "k")
    calls = []
    monkeypatch.setattr(compiled, "_compile_ahead", lambda path, *args: calls.append(("ahead", path)) or "A")
    monkeypatch.setattr(compiled, "_compile_just_in_time", lambda step, example: calls.append(("jit",)) or "J")
    renderer = torch.nn.Module()
    (tmp_path / "render-lean-k.pt2").write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="renderer.sadtalker.compiled"):
        assert compiled.compiled_step(renderer, (torch.zeros(1),), None, tmp_path) == "A"
    assert calls == [("ahead", tmp_path / "render-lean-k.pt2")] and "does not load" in caplog.text

    def refuse(path, step, example, variant):
        raise RuntimeError("export refused")

    monkeypatch.setattr(compiled, "_compile_ahead", refuse)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="renderer.sadtalker.compiled"):
        assert compiled.compiled_step(renderer, (torch.zeros(1),), None, tmp_path / "new") == "J"
    assert calls == [("jit",)] and "export refused" in caplog.text  # not the next variant: its export fails too


def test_a_package_that_crashes_its_check_is_never_loaded_and_later_runs_compile_just_in_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new package is loaded and run once in a separate Python before it is kept. Here that process dies of a
    segmentation fault (as PyTorch 2.11's loader did on an H100): the run goes on just in time, the package is not
    kept, a `.failed` note says why, and the next run compiles just in time without exporting again. A package
    that loads and runs passes the check (a real AOTInductor package of a small module)."""
    import logging
    import signal

    from renderer.sadtalker import compiled

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((3,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    step, example = Step(), (torch.ones(2, 3),)
    package = tmp_path / "small.pt2"
    with torch.inference_mode(False):
        torch._inductor.aoti_compile_and_package(
            torch.export.export(step, example),
            package_path=str(package),
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )
    assert compiled._check_in_child(package, step, example) is None
    (tmp_path / "garbage.pt2").write_bytes(b"not a package")
    problem, lasting = compiled._check_in_child(tmp_path / "garbage.pt2", step, example)
    assert problem.startswith("exit status 1 while loading the package: ") and lasting, problem

    crash = f"import os, signal; os.kill(os.getpid(), signal.{signal.SIGSEGV.name})"
    monkeypatch.setattr(compiled, "_CHECK", crash)
    monkeypatch.setattr(compiled, "package_key", lambda step, example, variant: "k")
    monkeypatch.setattr(compiled.RenderStep, "__init__", lambda self, renderer, dtype: torch.nn.Module.__init__(self))
    monkeypatch.setattr(compiled.RenderStep, "forward", Step.forward)
    exports, jit = [], []

    def package_it(program, package_path, inductor_configs):
        exports.append(package_path)
        package.replace(package_path) if package.exists() else Path(package_path).write_bytes(b"x")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package_it)
    monkeypatch.setattr(torch.export, "export", lambda step, example: "program")
    monkeypatch.setattr(compiled, "_compile_just_in_time", lambda step, example: jit.append(1) or "J")
    loads = []
    monkeypatch.setattr(compiled, "_load", lambda path, step, example, variant: loads.append(path))
    folder = tmp_path / "compiled"
    notes: list[str] = []
    with caplog.at_level(logging.INFO, logger="renderer.sadtalker.compiled"):
        assert compiled.compiled_step(step, example, None, folder, notes) == "J"
        assert "crashed (SIGSEGV)" in caplog.text and "failed its check" in caplog.text
        # What each failed package cost, for the log of a run that gave up on it.
        assert caplog.text.count("; its check failed after") == len(compiled.VARIANTS), caplog.text
        # The run's report says why this run compiled for itself, and what that cost.
        assert len(notes) == 1 and "lean: the process crashed (SIGSEGV)" in notes[0], notes
        assert (
            "defaults: the process crashed (SIGSEGV)" in notes[0] and "compiled just in time for this run (" in notes[0]
        )
        # Both variants were made and checked; both crashed.
        assert sorted(p.name for p in folder.iterdir()) == ["render-defaults-k.failed", "render-lean-k.failed"]
        assert "SIGSEGV" in (folder / "render-lean-k.failed").read_text() and loads == []
        caplog.clear()
        assert compiled.compiled_step(step, example, None, folder) == "J"
    assert len(exports) == 2 and jit == [1, 1] and "delete" in caplog.text and loads == []

    # A child stopped from outside (the kernel's OOM killer sends SIGKILL) says nothing lasting: no note, and the
    # next run compiles ahead of time again.
    monkeypatch.setattr(compiled, "_CHECK", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    other = tmp_path / "other"
    with caplog.at_level(logging.WARNING, logger="renderer.sadtalker.compiled"):
        assert compiled.compiled_step(step, example, None, other) == "J"
        assert compiled.compiled_step(step, example, None, other) == "J"
    # Nor is the next variant tried: a check killed from outside says nothing about the package.
    assert "was ended (SIGKILL)" in caplog.text and list(other.iterdir()) == [] and len(exports) == 4

    # A note is ignored beside a package; a package that passes its check removes the note for good.
    monkeypatch.setattr(compiled, "_check_in_child", lambda package, step, example, variant: None)
    retried = tmp_path / "retried"
    retried.mkdir()
    (retried / "render-lean-k.failed").write_text("an old crash")
    (retried / "render-lean-k.pt2").write_bytes(b"a package someone else made")  # the note is ignored beside it
    assert compiled.compiled_step(step, example, None, retried) is None and loads == [retried / "render-lean-k.pt2"]
    (retried / "render-lean-k.pt2").unlink()  # another process, whose check passed, compiles it again
    compiled._compile_ahead(retried / "render-lean-k.pt2", step, example)
    assert sorted(p.name for p in retried.iterdir()) == ["render-lean-k.pt2"]


def test_where_no_package_runs_a_run_too_short_for_compiling_just_in_time_to_pay_renders_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On an H100 with PyTorch 2.11 no package loads, and `torch.compile` costs 27-55 s for 1.7x the frame rate: a
    group of fewer frames than that pays back renders without compiling, and its videos say why; a longer one, or
    one whose length is not known, compiles just in time. The group's frames come from its WAV headers."""
    import types

    from scipy.io import wavfile

    from renderer.sadtalker import compiled, pipeline

    class Step(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    monkeypatch.setattr(compiled, "package_key", lambda step, example, variant: "k")
    monkeypatch.setattr(compiled.RenderStep, "__init__", lambda self, renderer, dtype: torch.nn.Module.__init__(self))
    monkeypatch.setattr(compiled.RenderStep, "forward", Step.forward)
    jit: list[int] = []
    monkeypatch.setattr(compiled, "_compile_just_in_time", lambda step, example: jit.append(1) or "J")
    folder = tmp_path / "compiled"
    folder.mkdir()
    for variant in compiled.VARIANTS:  # both kinds crashed their check here before
        (folder / f"render-{variant.name}-k.failed").write_text("the process crashed (SIGSEGV) while loading\n")
    example = (torch.ones(2, 3),)

    with pytest.raises(compiled.CompileUnavailable) as raised:
        compiled.compiled_step(Step(), example, None, folder, [], frames=500, jit_min_frames=12_000)
    said = str(raised.value)
    assert "pays back only after about 12,000 frames" in said and "this run renders 500" in said, said
    assert "lean: the process crashed (SIGSEGV)" in said and jit == []
    assert compiled.compiled_step(Step(), example, None, folder, [], frames=12_000, jit_min_frames=12_000) == "J"
    assert compiled.compiled_step(Step(), example, None, folder, [], frames=None, jit_min_frames=12_000) == "J"
    assert jit == [1, 1]

    # The stage: the group's frames from its WAVs (16 kHz and 44.1 kHz), and the note on its videos.
    wavs = [tmp_path / "a.wav", tmp_path / "b.wav"]
    wavfile.write(wavs[0], 16_000, np.zeros(16_000 + 639, dtype=np.int16))  # 1.04 s: 25 frames
    wavfile.write(wavs[1], 44_100, np.zeros((88_200, 2), dtype=np.float32))  # 2 s, stereo: 50 frames
    plans = [types.SimpleNamespace(audio=path) for path in wavs]
    assert pipeline._group_frames(plans) == 75
    assert pipeline._group_frames([*plans, types.SimpleNamespace(audio=tmp_path / "missing.wav")]) is None
    graphs = pipeline._Graphs(2, None, "cpu", compile=True, compiled_dir=folder, frames=75, jit_min_frames=100)
    assert graphs._capture(None, *example) is None and jit == [1, 1]
    assert len(graphs.notes) == 1 and "this run renders 75; rendered without compiling" in graphs.notes[0]
    graphs = pipeline._Graphs(2, None, "cpu", compile=True, compiled_dir=folder, frames=75)  # a CPU: no minimum
    assert isinstance(graphs._capture(None, *example), pipeline._Direct) and jit == [1, 1, 1]


def test_where_the_lean_package_crashes_the_package_with_the_weights_inside_is_made_and_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first variant's package (weights handed over at load, single-threaded runner) crashes its check, as on
    the H100: the run makes the second (PyTorch's defaults: weights inside, default runner), which passes, and loads
    it; its step is called batch by batch (`graphable` False). The next run loads that package without compiling.
    Real AOTInductor packages of a small module; only the crash of the first is staged (in the child process)."""
    import logging

    from renderer.sadtalker import compiled

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor([2.0, 3.0, 4.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + 1

    def step_init(self, renderer, dtype):
        torch.nn.Module.__init__(self)
        self.inner, self.dtype = renderer, dtype

    monkeypatch.setattr(compiled.RenderStep, "__init__", step_init)
    monkeypatch.setattr(compiled.RenderStep, "forward", lambda self, x: self.inner(x))
    # The child crashes where the weights are handed over at load, and checks the package for real otherwise.
    crash_lean = (
        "import io, json, os, signal, sys\n"
        "text = sys.stdin.read()\n"
        "if json.loads(text)['hand_constants']:\n"
        "    print('loading the package', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "sys.stdin = io.StringIO(text)\n"
    )
    monkeypatch.setattr(compiled, "_CHECK", crash_lean + compiled._CHECK)
    made = []
    real_package = torch._inductor.aoti_compile_and_package

    def package_it(program, package_path, inductor_configs):
        made.append(inductor_configs["aot_inductor.package_constants_in_so"])
        return real_package(program, package_path=package_path, inductor_configs=inductor_configs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package_it)
    small, example = Small(), (torch.ones(2, 3),)
    folder = tmp_path / "compiled"
    notes: list[str] = []
    with caplog.at_level(logging.INFO, logger="renderer.sadtalker.compiled"):
        run = compiled.compiled_step(small, example, None, folder, notes)
        assert "crashed (SIGSEGV) while loading the package" in caplog.text
        assert "compiled the render step ahead of time (defaults" in caplog.text
    assert made == [False, True] and run.graphable is False
    assert len(notes) == 1 and notes[0].startswith('video.compile: rendered with the package of kind "defaults'), notes
    assert "lean: the process crashed (SIGSEGV) while loading the package" in notes[0]
    assert torch.equal(run(torch.full((2, 3), 2.0)), torch.tensor([[5.0, 7.0, 9.0]] * 2))
    names = sorted(p.name for p in folder.iterdir())
    assert [n.split("-")[1] + n[n.rindex(".") :] for n in names] == ["defaults.pt2", "lean.failed"], names
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="renderer.sadtalker.compiled"):
        again = compiled.compiled_step(small, example, None, folder, notes)
    assert made == [False, True] and "loaded the compiled render step" in caplog.text
    assert (
        len(notes) == 2 and "delete" in notes[1] and "/render-lean-" in notes[1] and ".failed to try again" in notes[1]
    )
    assert torch.equal(again(torch.zeros(2, 3)), torch.ones(2, 3))
    # The package holds the weights, so its name depends on their values; the lean one's does not.
    step = compiled.RenderStep(small, None)
    lean, inside = compiled.VARIANTS
    keys = compiled.package_key(step, example, lean), compiled.package_key(step, example, inside)
    with torch.no_grad():
        small.scale[0] = 5.0
    assert compiled.package_key(step, example, lean) == keys[0]
    assert compiled.package_key(step, example, inside) != keys[1]


def test_a_compiled_step_that_cannot_be_recorded_runs_batch_by_batch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage does not try to record a package whose runner a CUDA graph cannot record: it calls it per batch,
    and a short batch is padded to the package's rows (as a graph replays its first rows) rather than run eagerly
    at a new batch size. On a CPU a short batch runs eagerly (padding would cost more than it saves)."""
    from renderer.sadtalker import compiled

    seen = []

    def step(*tensors):
        seen.append(tuple(t.shape[0] for t in tensors))
        return tensors[0] * 10 + tensors[1][:, :2]

    step.graphable = False
    monkeypatch.setattr(
        compiled, "compiled_step", lambda renderer, tensors, dtype, folder, notes, frames, jit_min_frames: step
    )
    full = (torch.zeros(4, 2), torch.zeros(4, 3))
    direct = pipeline._Graphs(4, None, "cuda", compile=True)._capture(None, *full)
    assert isinstance(direct, pipeline._Direct) and direct.step is step
    short = (torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 3))
    assert direct.matches(*short) and not direct.matches(torch.zeros(5, 2), torch.zeros(5, 3))
    assert torch.equal(direct.launch(*short).result(), torch.tensor([[11.0, 21.0], [31.0, 41.0]]))
    assert seen == [(4, 4)], "the package got its full rows"
    on_cpu = pipeline._Graphs(4, None, "cpu", compile=True)._capture(None, *full)
    assert on_cpu.matches(*full) and not on_cpu.matches(*(t[:2] for t in full))


def test_a_just_in_time_compiled_step_can_be_handed_to_the_graph_recorder() -> None:
    """Where the ahead-of-time package fails, the stage hands `torch.compile`'s module to GraphedRender.capture;
    that module's truth is its len(), which raises, so the step to record is chosen by `graphs.the_step` without
    testing its truth (`step or ...` killed a run on an H100)."""
    from renderer.sadtalker.graphs import RenderStep, the_step

    jit = torch.compile(torch.nn.Linear(1, 1))
    with pytest.raises(TypeError):
        bool(jit)
    assert the_step(jit, None, None) is jit
    assert isinstance(the_step(None, torch.nn.Module(), None), RenderStep)


def test_a_logged_failure_of_the_render_batch_keeps_no_memory_alive(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning for a failed recording carries the error's text, not the error: a log handler that keeps its
    records (pytest's, a MemoryHandler) would otherwise keep the failed pass's traceback and with it every tensor
    of that pass. On an H100 that held 6 GB, and each smaller retry of the batch then ran out of memory too."""
    import gc
    import logging
    import weakref

    from renderer.sadtalker.graphs import GraphUnavailable

    class Pass:  # stands for the failed pass's tensors
        pass

    alive = []

    def capture(self, renderer, *tensors):
        tensors_of_the_pass = Pass()
        alive.append(weakref.ref(tensors_of_the_pass))
        try:
            raise RuntimeError("CUDA out of memory")
        except RuntimeError as exc:
            raise GraphUnavailable(f"warming up the render batch failed: {exc}") from exc

    monkeypatch.setattr(pipeline._Graphs, "_capture", capture)
    graphs = pipeline._Graphs(2, None, "cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="renderer.sadtalker.pipeline"):
        assert graphs.launch(None, torch.zeros(2, 1)) is None
        gc.collect()
        assert "warming up the render batch failed: CUDA out of memory" in caplog.text
        assert alive[0]() is None, "a log record keeps the failed pass alive"


def test_compiled_package_goes_to_a_temporary_folder_when_the_cache_is_not_writable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    from renderer.sadtalker import compiled

    written = []

    def package(program, package_path, inductor_configs):
        Path(package_path).write_bytes(b"package")
        written.append(Path(package_path))

    monkeypatch.setattr(torch.export, "export", lambda step, example: "program")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package)
    monkeypatch.setattr(compiled, "_load", lambda path, step, example, variant: path)
    monkeypatch.setattr(compiled, "_check_in_child", lambda package, step, example, variant: None)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="renderer.sadtalker.compiled"):
        path = compiled._compile_ahead(blocked / "compiled" / "render-k.pt2", torch.nn.Module(), (torch.zeros(1),))
    assert path.name == "render-k.pt2" and path.read_bytes() == b"package" and tmp_path not in path.parents
    assert "for this run only" in caplog.text and not written[0].exists()
    shutil.rmtree(path.parent)
    path = compiled._compile_ahead(tmp_path / "cache" / "render-k.pt2", torch.nn.Module(), (torch.zeros(1),))
    assert path == tmp_path / "cache" / "render-k.pt2" and path.read_bytes() == b"package"
    assert [p.name for p in path.parent.iterdir()] == ["render-k.pt2"]


def test_spade_fuse_folds_the_one_without_touching_the_loaded_tensors() -> None:
    """SPADE.fuse folds `1 +` into γ's bias: same output, and the state dict it was loaded from (assign=True
    adopts its tensors) keeps its values, so a second network built from it is right too."""
    torch.manual_seed(2)
    state = fr.SPADE(8, label_nc=4, hidden=6).state_dict()
    before = state["mlp_gamma.bias"].clone()
    x, seg = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 3, 3)
    outputs = []
    for fuse in (False, True, True):
        spade = fr.SPADE(8, label_nc=4, hidden=6)
        spade.load_state_dict(state, assign=True)
        if fuse:
            spade.fuse()
        with torch.inference_mode():
            outputs.append(spade(x, seg))
    assert torch.equal(state["mlp_gamma.bias"], before)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[2], outputs[1], atol=0, rtol=0)


def _job(tmp: Path, name: str, ckpt: Path, portrait: Path, audio: Path, seed: int, **video) -> StepJob:
    out = tmp / name
    out.mkdir()
    settings = {
        "renderer": "sadtalker",
        "size": 256,
        "preprocess": "crop",
        "still": False,
        "enhancer": "none",
        "expression_scale": 1.0,
        "pose_style": 0,
        "batch_size": 3,
        "dtype": "auto",
    }
    settings.update(video)
    return StepJob(
        stage="animate",
        key=name,
        settings=settings,
        inputs={"portrait": portrait, "audio": audio},
        out_dir=out,
        seed=seed,
        checkpoints=ckpt,
        label=f"videos.{name}",
    )


def _portraits(folder: Path) -> tuple[Path, Path]:
    """The astronaut portrait and a blank picture without a face, as PNG files in `folder`."""
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    portrait, blank = folder / "portrait.png", folder / "blank.png"
    Image.fromarray(skimage_data.astronaut()).save(portrait)
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(blank)
    return portrait, blank


def test_pipeline_ext_modes_render_the_bordered_crop(fake_checkpoints: Path, tmp_path: Path) -> None:
    """`preprocess: extcrop` renders upstream's bordered crop box (wider than `crop`'s face quad, SPEC §3.3) and
    `extfull` pastes it back into the whole portrait (SPEC §8.3): a larger region changes than with `full`."""
    from renderer.encode import read_frames

    skimage_data = pytest.importorskip("skimage.data")
    portrait, _ = _portraits(tmp_path)
    one = tmp_path / "one.wav"
    write_wav(one, tone(SAMPLES_PER_FRAME / 16000, 16000), 16000)  # exactly one frame
    modes = ("crop", "extcrop", "full", "extfull")
    jobs = [_job(tmp_path, mode, fake_checkpoints, portrait, one, seed=1, preprocess=mode) for mode in modes]
    results = dict(zip(modes, pipeline.run(jobs, ModelPool()), strict=True))
    for mode, info in results.items():
        assert isinstance(info, dict) and info["frames"] == 1 and info["preprocess"] == mode, info
    frames = {mode: next(iter(read_frames(job.out_dir / "video.mp4"))) for mode, job in zip(modes, jobs, strict=True)}
    assert frames["crop"].shape[1] == frames["extcrop"].shape[1] == 256
    original = skimage_data.astronaut().astype(int)
    changed = {}
    for mode in ("full", "extfull"):
        assert frames[mode].shape == original.shape  # the portrait's size
        moved = np.abs(frames[mode].astype(int) - original).mean(axis=2) > 12
        ys, xs = np.nonzero(moved)
        assert 100 < xs.mean() < 300 and ys.mean() < 250, f"{mode}: the paste landed away from the face"
        changed[mode] = moved.mean()
    assert changed["extfull"] > 1.3 * changed["full"], changed


def test_pipeline_renders_batched_videos_on_fill_weights(
    fake_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five jobs, one run: two identical crop videos share forward batches ([a0, a1, b0], [b1]) and must come out
    identical; a `full` video is pasted into the portrait; two broken jobs fail alone. The videos are prepared on
    the thread CUDA runs use (`_Preparer`), here on the CPU. b asks for `video.compile`, so its group's full batch
    runs the step compiled into the checkpoints' compiled/ folder (about 45 s here) and the short one eagerly: the
    frames still agree up to float noise."""
    from renderer.encode import probe, read_frames

    skimage_data = pytest.importorskip("skimage.data")
    portrait, blank = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(2 * SAMPLES_PER_FRAME / 16000 + 0.02, 16000), 16000)  # 2 frames + a remainder
    short = tmp_path / "short.wav"
    write_wav(short, tone(0.02, 16000), 16000)  # 320 samples: no whole frame

    one = tmp_path / "one.wav"
    write_wav(one, tone(SAMPLES_PER_FRAME / 16000, 16000), 16000)  # exactly one frame

    jobs = [
        _job(tmp_path, "a", fake_checkpoints, portrait, speech, seed=7),
        _job(tmp_path, "b", fake_checkpoints, portrait, speech, seed=7, compile=True),
        _job(tmp_path, "full", fake_checkpoints, portrait, one, seed=1, preprocess="full", dtype="float16"),
        _job(tmp_path, "noface", fake_checkpoints, blank, speech, seed=1),
        _job(tmp_path, "nosound", fake_checkpoints, portrait, short, seed=1),
    ]
    pool = ModelPool()
    monkeypatch.setattr(pipeline, "_lookahead", lambda plans: 2)
    told = []  # (index, result, whether b's file was there yet): each video is told as soon as its file is closed

    def done(index: int, result: object) -> None:
        told.append((index, result, (jobs[1].out_dir / "video.mp4").is_file()))

    results = pipeline.run(jobs, pool, done=done)

    assert sorted(i for i, _, _ in told) == [0, 1, 2]  # the rendered ones (the others fail before rendering)
    assert all(result == results[i] for i, result, _ in told)
    assert next(b_there for i, _, b_there in told if i == 0) is False  # a told while b, in its batches, rendered on
    assert len(results) == 5
    a, b, full, noface, nosound = results
    assert isinstance(noface, BadInputError) and "no face" in noface.message and "videos.noface" in noface.message
    assert isinstance(nosound, BadInputError) and "shorter than one video frame" in nosound.message
    for info in (a, b, full):
        assert isinstance(info, dict) and info["renderer"] == "sadtalker", info
    assert a["frames"] == b["frames"] == 2 and full["frames"] == 1
    assert a["dtype"] == "float32" and a["warnings"] == []
    assert b["warnings"] == [] and len(list((fake_checkpoints / "compiled").glob("render-*.pt2"))) == 1
    assert full["dtype"] == "float32" and "float16" in full["warnings"][0]  # CPU half is emulated: refused
    assert all(count == 1 for count in pool.loads.values()), pool.loads  # every model loaded once for all jobs

    media = probe(jobs[0].out_dir / "video.mp4")
    assert (media.video_codec, media.fps, media.frames, media.width, media.height) == ("h264", 25.0, 2, 256, 256)
    frames_a = list(read_frames(jobs[0].out_dir / "video.mp4"))
    frames_b = list(read_frames(jobs[1].out_dir / "video.mp4"))
    assert len(frames_a) == len(frames_b) == 2
    for fa, fb in zip(frames_a, frames_b, strict=True):
        # Same inputs and seed at other batch rows: the same frames up to float noise. The random fill weights
        # render noise-like images, where H.264 turns tiny input changes into local coding differences, so the
        # decoded frames are compared on average. Measured: before encoding, b1 differs from a1 by one level in
        # 0.04 % of the pixels; decoded, by 0.74 levels on average; two different frames differ by about 32.
        diff = np.abs(fa.astype(int) - fb.astype(int))
        assert diff.mean() < 2.0, (diff.mean(), diff.max())
    assert np.abs(frames_a[0].astype(int) - frames_a[1].astype(int)).mean() > 0.5  # the face moves

    full_frames = list(read_frames(jobs[2].out_dir / "video.mp4"))
    assert len(full_frames) == 1 and full_frames[0].shape == (512, 512, 3)  # the portrait's size
    original = skimage_data.astronaut().astype(int)
    diff = np.abs(full_frames[0].astype(int) - original).mean(axis=2)
    changed = diff > 12
    ys, xs = np.nonzero(changed)
    assert changed.mean() > 0.02, "the rendered face was not pasted"
    assert 100 < xs.mean() < 300 and ys.mean() < 250, "the paste landed away from the face"
    assert not list(jobs[3].out_dir.iterdir()) and not list(jobs[4].out_dir.iterdir())


def test_pipeline_interrupted_mid_render_raises_it_and_leaves_no_files(
    fake_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the first batch renders (both videos started, no frame written yet): the KeyboardInterrupt
    reaches the runner as itself (not replaced by an error from closing an empty video), and no file is left."""
    portrait, _ = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(2 * SAMPLES_PER_FRAME / 16000, 16000), 16000)
    jobs = [_job(tmp_path, name, fake_checkpoints, portrait, speech, seed=1) for name in ("a", "b")]
    launched = []

    def interrupted(*args, **kwargs):
        launched.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(jobs, ModelPool())
    assert len(launched) == 1
    assert [p.name for job in jobs for p in job.out_dir.iterdir()] == []


@pytest.mark.gpu
def test_pipeline_on_cuda_makes_the_cpu_run_videos(
    fake_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RUN_GPU=1: the whole stage on CUDA (the preparation thread, a recorded graph for full batches, an eager last
    batch, each batch queued before the one before it reaches the encoders) makes the CPU run's videos: every
    frame, in order, the same up to float noise, in float32 and within half precision's error in float16.
    The face comes from tests/fixtures/astronaut_face.json (dlib's model on this machine, saved): dlib's 99 MB
    landmark model does not travel to the GPU machines, and detection is CPU work either way."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import dataclasses

    from renderer import faces
    from renderer.encode import VideoWriter, read_frames

    saved = json.loads((Path(__file__).with_name("fixtures") / "astronaut_face.json").read_text())
    face = faces.Face(tuple(saved["box"]), saved["score"], np.asarray(saved["landmarks"], dtype=np.float64))
    monkeypatch.setattr(faces, "detect_face", lambda image, source="", pool=None: face)
    # The frames as handed to the encoder, by output file (H.264 turns tiny input changes into coding differences).
    handed: dict[str, list[np.ndarray]] = {}
    write = VideoWriter.write

    def keep(self, frame):
        handed.setdefault(str(self.path), []).append(np.array(frame, dtype=int))
        return write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", keep)

    portrait, _ = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(5 * SAMPLES_PER_FRAME / 16000 + 0.02, 16000), 16000)  # 5 frames
    videos = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "float16")):
            folder = tmp_path / f"{device}-{dtype}"
            folder.mkdir()
            # 3 videos of 5 frames in batches of 2: 7 full batches, some spanning two videos, and a last one of 1.
            jobs = [
                dataclasses.replace(
                    _job(folder, f"v{i}", fake_checkpoints, portrait, speech, seed=i, batch_size=2, dtype=dtype),
                    device=device,
                )
                for i in range(3)
            ]
            results = pipeline.run(jobs, ModelPool())
            assert all(isinstance(r, dict) and r["frames"] == 5 for r in results), results
            for job in jobs:
                decoded = list(read_frames(job.out_dir / "video.mp4"))
                assert len(decoded) == 5 and decoded[0].shape == (256, 256, 3)
            videos[device, dtype] = [np.stack(handed.pop(str(job.out_dir / "video.mp4"))) for job in jobs]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # Bounds in uint8 levels, on the frames before encoding: float32 differs by float noise (the random fill
    # weights amplify it), float16 by half precision's error (the generator test measures about 1.1 levels).
    for key, mean_bound in ((("cuda", "float32"), 0.5), (("cuda", "float16"), 3.0)):
        for cpu, gpu in zip(videos["cpu", "float32"], videos[key], strict=True):
            assert gpu.shape == cpu.shape == (5, 256, 256, 3)
            diff = np.abs(gpu - cpu)
            per_frame = diff.mean(axis=(1, 2, 3))
            print(f"{key} vs CPU float32, levels per frame: mean {np.round(per_frame, 3)}, max {diff.max()}")
            assert per_frame.max() < mean_bound, (key, per_frame)
            assert np.abs(gpu[0] - gpu[4]).mean() > 2 * per_frame.max(), "frames out of order or frozen"


def test_cli_build_picks_sadtalker_when_its_checkpoints_exist(fake_checkpoints: Path, tmp_path: Path) -> None:
    """Through the runner: `renderer: auto` resolves to sadtalker with the weights present, and the video builds."""
    import shutil
    import subprocess
    import sys

    from renderer.encode import probe

    repo = Path(__file__).resolve().parent.parent
    shutil.copy(repo / "manifests" / "portraits" / "astronaut.jpg", tmp_path / "face.jpg")
    write_wav(tmp_path / "speech.wav", tone(2 * SAMPLES_PER_FRAME / 16000, 16000), 16000)
    (tmp_path / "m.yaml").write_text(
        "version: 1\ncharacters:\n  a: {image: face.jpg, seed: 3}\nscripts:\n  s: {audio: speech.wav}\n"
        "videos:\n  - {id: st, character: a, script: s}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batch.cli",
            "-q",
            "build",
            str(tmp_path / "m.yaml"),
            "--checkpoints",
            str(fake_checkpoints),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    video = json.loads(proc.stdout)["videos"][0]
    assert video["status"] == "built" and video["renderer"] == "sadtalker"
    animate = next(s for s in video["steps"] if s["stage"] == "animate")
    assert animate["info"]["renderer"] == "sadtalker" and animate["info"]["frames"] == 2
    media = probe(Path(video["output"]))
    assert (media.frames, media.width, media.audio_codec) == (2, 256, "aac")


class _Writer:
    """Records frames like renderer.encode.VideoWriter; can fail on the n-th write."""

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = OSError) -> None:
        self.frames: list[int] = []
        self.fail_at, self.error = fail_at, error
        self.closed = self.aborted = False
        self.path = Path("video.mp4")

    def write(self, frame: np.ndarray) -> None:
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise self.error("disk full")
        self.frames.append(int(frame[0, 0, 0]))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def _fake_video(frames: int, writer: _Writer):
    """What `_emit` and `_finish` read of a pipeline video."""
    from types import SimpleNamespace

    return SimpleNamespace(error=None, writer=writer, paste=None, frame_size=(4, 4), written=0, num_frames=frames,
                           state=None, finished=None)  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_encoder_thread_keeps_frame_order_and_isolates_a_failing_writer(workers: int) -> None:
    """Frames reach each video's writer in render order on the encoder threads; a write error fails that video
    alone (writer aborted, BackendError naming the file) and every other video is closed complete."""
    videos = [_fake_video(5, _Writer()), _fake_video(5, _Writer(fail_at=2)), _fake_video(3, _Writer())]
    writers = [v.writer for v in videos]
    order = [(v, f) for f in range(5) for v in videos if f < v.num_frames]  # interleaved, as shared batches are
    emitter = pipeline._Emitter(workers)
    for start in range(0, len(order), 4):
        live = order[start : start + 4]
        emitter.put(live, np.stack([np.full((4, 4, 3), f, np.uint8) for _, f in live]))
    emitter.close()
    for video in videos:
        pipeline._finish(video)
    assert writers[0].frames == [0, 1, 2, 3, 4] and writers[0].closed
    assert writers[2].frames == [0, 1, 2] and writers[2].closed
    assert writers[1].frames == [0, 1] and writers[1].aborted and not writers[1].closed
    assert isinstance(videos[1].error, BackendError) and "video.mp4" in str(videos[1].error)
    assert videos[0].error is None and videos[2].error is None
    assert len(emitter._threads) == workers and emitter.busy_s > 0 and emitter.waited_s >= 0


def test_encoder_error_of_any_kind_fails_its_video_only_without_blocking_the_renderer() -> None:
    """An encoder refusal or a bug while one video's frames are written (here a RuntimeError) fails that video, with
    its type in the message; the other video on the same thread is written whole, and puts never block."""
    broken, whole = _fake_video(50, _Writer(fail_at=1, error=RuntimeError)), _fake_video(50, _Writer())
    writers = broken.writer, whole.writer
    emitter = pipeline._Emitter(1)
    for f in range(50):  # far more batches than the queue holds
        emitter.put([(broken, f), (whole, f)], np.zeros((2, 4, 4, 3), np.uint8))
    emitter.close()
    assert isinstance(broken.error, BackendError) and "internal error: RuntimeError: disk full" in str(broken.error)
    assert writers[0].aborted and whole.error is None and len(writers[1].frames) == 50 and writers[1].closed


def test_encoder_thread_bug_outside_a_video_surfaces_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    video = _fake_video(50, _Writer())
    monkeypatch.setattr(pipeline, "_emit", lambda video, frame: 1 / 0)
    emitter = pipeline._Emitter(2)
    for f in range(50):  # puts must not block once the worker has failed
        emitter.put([(video, f)], np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ZeroDivisionError):
        emitter.close()


# ---------------------------------------------------------------------------------------------------------------
# Preparation ahead of the renderer (a thread on CUDA) and the model pool it shares


def test_preparation_on_demand_ignores_the_render_loops_autocast(fake_checkpoints: Path, tmp_path: Path) -> None:
    """On a CPU the videos are prepared inside the render loop, under its bfloat16 autocast: the 3DMM and audio
    networks still run in float32, as on the CUDA preparation thread (the same coefficients)."""
    import torch

    portrait, _ = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(5 * SAMPLES_PER_FRAME / 16000, 16000), 16000)
    targets = []
    for autocast in (False, True):
        out = tmp_path / f"autocast{autocast}"
        out.mkdir()
        plans = [pipeline._plan(0, _job(out, "a", fake_checkpoints, portrait, speech, seed=1))]
        preparer = pipeline._Preparer(plans, ModelPool())
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            targets.append(preparer.next().target)
        preparer.close()
    np.testing.assert_array_equal(targets[0], targets[1])


def test_preparer_thread_and_batches_prepare_the_same_videos_as_one_at_a_time(
    fake_checkpoints: Path, tmp_path: Path
) -> None:
    """The real steps 2–3 (dlib face, 3DMM, audio networks) give the same videos whether each is prepared alone on
    demand, on the preparation thread (bit-identical), or with companions in one batch (the networks' passes then
    cover several videos: equal up to float noise); a failing job lands in `failed` with its label and the others
    still come, still or moving, short or long."""
    portrait, blank = _portraits(tmp_path)
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    write_wav(short, tone(5 * SAMPLES_PER_FRAME / 16000, 16000), 16000)
    write_wav(long, tone(40 * SAMPLES_PER_FRAME / 16000, 16000, freq=300.0), 16000)  # two pose windows
    specs = [
        ("a", portrait, short, 1, {}),
        ("noface", blank, short, 2, {}),
        ("b", portrait, long, 3, {"pose_style": 5}),
        ("c", portrait, short, 4, {"still": True, "expression_scale": 1.5}),
        ("d", portrait, long, 3, {"pose_style": 5}),
    ]
    prepared = {}
    for ahead, batch in ((0, 1), (1, 1), (3, 1), (0, 3), (1, 5)):
        out = tmp_path / f"ahead{ahead}-batch{batch}"
        out.mkdir()
        plans = [
            pipeline._plan(i, _job(out, name, fake_checkpoints, image, speech, seed=seed, **video))
            for i, (name, image, speech, seed, video) in enumerate(specs)
        ]
        preparer = pipeline._Preparer(plans, ModelPool(), ahead, batch)
        try:
            prepared[ahead, batch] = [preparer.next() for _ in plans]
        finally:
            preparer.close()
        assert prepared[ahead, batch][1] is None and set(preparer.failed) == {1}
        assert "videos.noface" in preparer.failed[1].message and "no face" in preparer.failed[1].message
        assert preparer.busy_s > 0 and set(preparer.times) == {"face", "3DMM", "audio"}
        if ahead:
            assert preparer._thread is not None and not preparer._thread.is_alive()
    alone = prepared[0, 1]
    for key, videos in prepared.items():
        exact = key[1] == 1
        for one, other in zip(alone, videos, strict=True):
            if one is None:
                continue
            assert other.plan.index == one.plan.index and other.frame_size == one.frame_size
            np.testing.assert_array_equal(other.source_crop, one.source_crop)
            if exact:
                np.testing.assert_array_equal(other.target, one.target)
                np.testing.assert_array_equal(other.source_coeff, one.source_coeff)
            else:
                np.testing.assert_allclose(other.target, one.target, rtol=0, atol=1e-5)
                np.testing.assert_allclose(other.source_coeff, one.source_coeff, rtol=0, atol=1e-5)
    a, _, b, c, d = alone
    assert a.target.shape == (5, 70) and b.target.shape == (40, 70)
    np.testing.assert_array_equal(b.target, d.target)  # same seed, same audio: same video, whatever the batch
    assert not np.allclose(a.target, c.target)  # other seed and scale
    assert np.ptp(c.target[:, 64:], axis=0).max() == 0 and np.ptp(b.target[:, 64:], axis=0).max() > 0  # still


def _fake_plans(count: int) -> list:
    from types import SimpleNamespace

    return [
        SimpleNamespace(index=i, group="g", job=SimpleNamespace(label=f"videos[{i}]", device="cpu"))
        for i in range(count)
    ]


def _per_video(prepare):
    """A fake `_prepare_batch` from a fake preparation of one plan (its RenderError fails that plan only)."""

    def prepare_batch(plans, pool, times=None, gpu=None):
        out = []
        for plan in plans:
            try:
                out.append(prepare(plan, pool, times))
            except RenderError as exc:
                out.append(exc)
        return out

    return prepare_batch


@pytest.mark.parametrize(("batch", "expected"), [(1, 4), (3, 12)])
def test_preparer_holds_the_gpu_lock_and_stays_bounded(
    batch: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread hands `gpu` to the preparation (which holds it while its networks run, so a CUDA graph is never
    recorded meanwhile) and prepares at most `ahead` batches beyond the one the renderer took (plus the one waiting
    to be queued); closing early stops it without preparing the rest."""
    import threading
    import time

    started: list[int] = []
    held: list[bool] = []
    gate = threading.Event()

    def prepare(plan, pool, times=None):
        assert gate.wait(10)
        started.append(plan.index)
        return plan.index

    def prepare_batch(plans, pool, times=None, gpu=None):
        assert gate.wait(10)
        held.append(gpu is preparer.gpu)
        return _per_video(prepare)(plans, pool, times)

    monkeypatch.setattr(pipeline, "_prepare_batch", prepare_batch)
    preparer = pipeline._Preparer(_fake_plans(20), ModelPool(), ahead=2, batch=batch)
    gate.set()
    assert preparer.next() == 0
    for _ in range(100):  # let the thread fill the queue: 2 batches waiting + 1 blocked in put
        if len(started) >= expected:
            break
        time.sleep(0.02)
    time.sleep(0.1)
    assert len(started) == expected, started
    assert [preparer.next() for _ in range(batch)] == list(range(1, batch + 1))  # in order across batches
    preparer.close()
    assert len(started) <= expected + batch and all(held)
    assert not preparer._thread.is_alive()


def test_prepare_batch_holds_the_gpu_lock_only_while_networks_run(
    fake_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graph recording waits for the lock only while the 3DMM and audio networks load and run, not while faces are
    found or audio is read (CPU work)."""
    import threading

    from renderer import faces
    from renderer.sadtalker import audio, audio2coeff, recon

    lock = threading.Lock()
    held: dict[str, list[bool]] = {}

    def watch(module, name):
        original = getattr(module, name)

        def watched(*args, **kwargs):
            held.setdefault(name, []).append(lock.locked())
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, watched)

    for module, name in (
        (faces, "detect_face"),
        (audio, "load_wav_16k"),
        (pipeline, "_pooled"),
        (recon, "coeffs_from_crops"),
        (audio2coeff, "predict_coeffs_batch"),
    ):
        watch(module, name)
    portrait, _ = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(5 * SAMPLES_PER_FRAME / 16000, 16000), 16000)
    plans = [pipeline._plan(i, _job(tmp_path, f"v{i}", fake_checkpoints, portrait, speech, seed=i)) for i in range(2)]
    videos = pipeline._prepare_batch(plans, ModelPool(), gpu=lock)
    assert all(isinstance(video, pipeline._Video) for video in videos)
    assert held == {
        "detect_face": [False, False],
        "_pooled": [True, True, True],  # 3DMM, ExpNet, PoseVAE
        "coeffs_from_crops": [True],  # one pass for both videos
        "load_wav_16k": [False, False],
        "predict_coeffs_batch": [True],
    }
    assert not lock.locked()


def test_half_precision_run_pools_a_renderer_with_weights_in_that_dtype(fake_checkpoints: Path, tmp_path: Path) -> None:
    """A bfloat16 job loads the renderer once more for its dtype, with its convolution weights stored in bfloat16
    (`weights.cast_for_autocast`), and renders with it."""
    from renderer.sadtalker.facerender import FaceRenderer

    portrait, _ = _portraits(tmp_path)
    speech = tmp_path / "speech.wav"
    write_wav(speech, tone(SAMPLES_PER_FRAME / 16000, 16000), 16000)  # one frame
    pool = ModelPool()
    job = _job(tmp_path, "half", fake_checkpoints, portrait, speech, seed=1, dtype="bfloat16")
    [info] = pipeline.run([job], pool)
    assert isinstance(info, dict) and info["frames"] == 1 and info["dtype"] == "bfloat16", info
    [(key, renderer)] = [(k, m) for k, m in pool._models.items() if isinstance(m, FaceRenderer)]
    assert key[2] == "bfloat16"
    assert renderer.generator.decoder.conv_img.weight.dtype == torch.bfloat16


def test_preparer_batches_stay_within_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch never mixes groups (their networks or devices may differ): groups a a b a a a with batch 2 are
    prepared as [a a] [b] [a a] [a]."""
    seen: list[list[int]] = []

    def prepare_batch(plans, pool, times=None, gpu=None):
        seen.append([plan.index for plan in plans])
        return [plan.index for plan in plans]

    monkeypatch.setattr(pipeline, "_prepare_batch", prepare_batch)
    plans = _fake_plans(6)
    plans[2].group = "other"
    preparer = pipeline._Preparer(plans, ModelPool(), ahead=0, batch=2)
    assert [preparer.next() for _ in plans] == list(range(6))
    assert seen == [[0, 1], [2], [3, 4], [5]]


def test_preparer_thread_bug_reaches_the_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    def prepare(plan, pool, times=None):
        if plan.index == 1:
            raise ZeroDivisionError("bug in preparation")
        if plan.index == 2:
            raise BadInputError("no face", "use another portrait")
        return plan.index

    monkeypatch.setattr(pipeline, "_prepare_batch", _per_video(prepare))
    for ahead in (0, 1):
        preparer = pipeline._Preparer(_fake_plans(3), ModelPool(), ahead=ahead)
        assert preparer.next() == 0
        with pytest.raises(ZeroDivisionError, match="bug in preparation"):
            preparer.next()
        preparer.close()
    preparer = pipeline._Preparer(_fake_plans(3)[2:], ModelPool(), ahead=1)
    assert preparer.next() is None and "videos[2]: no face" in preparer.failed[2].message
    preparer.close()


def test_graph_recording_takes_the_preparation_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_Graphs` records under the preparer's lock: no preparation runs on the GPU while a graph is recorded."""
    from renderer.sadtalker import graphs, transfer

    lock = pipeline._Preparer([], ModelPool()).gpu
    seen = []

    class Recorded:
        def matches(self, *tensors):
            return True

        def launch(self, *tensors):
            return transfer.HostCopy(torch.zeros((2, 4, 4, 3), dtype=torch.uint8))

    def capture(renderer, *tensors, dtype=None, step=None):
        seen.append(lock.locked())
        return Recorded()

    monkeypatch.setattr(graphs.GraphedRender, "capture", staticmethod(capture))
    state = pipeline._Graphs(2, None, "cuda", lock=lock)
    frames = state.launch(None, torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert frames.result().shape == (2, 4, 4, 3) and seen == [True] and not lock.locked()


def test_short_batches_replay_the_graph_once_one_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch shorter than `batch_size` runs eagerly while no graph exists (one eager pass is cheaper than
    recording), and through the recorded graph once there is one; a longer batch never does."""
    from renderer.sadtalker import graphs, transfer

    launched = []

    class Recorded:
        def matches(self, *tensors):
            return True

        def launch(self, *tensors):
            launched.append(tensors[0].shape[0])
            return transfer.HostCopy(torch.zeros((tensors[0].shape[0], 4, 4, 3), dtype=torch.uint8))

    monkeypatch.setattr(graphs.GraphedRender, "capture", staticmethod(lambda *a, **k: Recorded()))
    state = pipeline._Graphs(4, None, "cuda")
    rows = lambda n: [torch.zeros(n, 3)] * 4  # noqa: E731
    assert state.launch(None, *rows(2)) is None and state.graph is None
    assert state.launch(None, *rows(4)).result().shape[0] == 4
    assert state.launch(None, *rows(3)).result().shape[0] == 3
    assert state.launch(None, *rows(5)) is None
    assert launched == [4, 3]


class _MemoryBoundRenderer:
    """Renders a frame as its feature (already [B, 3, H, W] in 0..1); more than `limit` rows at once raise CUDA's
    out-of-memory error."""

    def __init__(self, limit: int) -> None:
        self.limit, self.calls = limit, []

    def parameters(self):
        return iter([torch.zeros(1)])

    def driving_keypoints(self, kp_canonical, windows):
        return kp_canonical

    def render(self, feature, kp_source, kp_driving):
        from types import SimpleNamespace

        self.calls.append(len(feature))
        if len(feature) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return SimpleNamespace(prediction=feature)


def test_batches_that_run_out_of_gpu_memory_are_rendered_in_pieces() -> None:
    """A pass that runs out of GPU memory is retried in halves, and later batches go in pieces of the size that
    fitted, without trying the full batch again; the frames and their order are unchanged."""
    renderer = _MemoryBoundRenderer(limit=3)
    graphs = pipeline._Graphs(8, None, "cpu")
    feature = torch.rand(8, 3, 4, 4)
    rest = (torch.zeros(8, 15, 3), torch.zeros(8, 15, 3), torch.zeros(8, 70, 27))
    frames = pipeline._render_rows(renderer, graphs, feature, *rest).result()
    assert torch.equal(frames, fr.frames_to_uint8_tensor(feature))
    assert graphs.max_rows == 2 and renderer.calls == [8, 4, 2, 2, 2, 2]
    renderer.calls.clear()
    again = pipeline._render_rows(renderer, graphs, feature.flip(0), *rest).result()
    assert torch.equal(again, fr.frames_to_uint8_tensor(feature.flip(0))) and renderer.calls == [2, 2, 2, 2]


def test_a_frame_too_large_for_gpu_memory_fails_its_videos_with_a_hint() -> None:
    from types import SimpleNamespace

    state = SimpleNamespace(feature=torch.rand(1, 3, 4, 4), kp_canonical=torch.zeros(1, 15, 3),
                            kp_source=torch.zeros(1, 15, 3))  # fmt: skip
    plan = SimpleNamespace(settings=SimpleNamespace(size=512))
    videos = [SimpleNamespace(error=None, target=np.zeros((3, 70), np.float32), state=state, plan=plan) for _ in "ab"]
    graphs = pipeline._Graphs(2, None, "cpu")
    assert pipeline._launch(_MemoryBoundRenderer(limit=0), [(videos[0], 0), (videos[1], 2)], graphs) is None
    for video in videos:
        assert isinstance(video.error, BackendError)
        assert "out of GPU memory rendering a single frame at size 512" in video.error.message
        assert "float16" in video.error.hint
    assert graphs.max_rows == 1


def test_a_failing_compiled_step_is_given_up_and_the_videos_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The compiled step reports every failure, running out of memory included, as a plain RuntimeError (the
    AOTInductor runner keeps no error type): the group then renders eagerly, where running out of memory splits the
    batch, and the videos of the batch carry both notes for this run (`run_notes`)."""
    from types import SimpleNamespace

    from renderer.sadtalker import compiled

    calls = []

    def failing(*tensors):
        calls.append(len(tensors[0]))
        raise RuntimeError("run_func_( container_handle_, ...) API call failed at model_container_runner.cpp")

    monkeypatch.setattr(
        compiled, "compiled_step", lambda renderer, tensors, dtype, folder, notes, frames, jit_min_frames: failing
    )
    state = SimpleNamespace(feature=torch.rand(1, 3, 4, 4), kp_canonical=torch.zeros(1, 15, 3),
                            kp_source=torch.zeros(1, 15, 3))  # fmt: skip
    plan = SimpleNamespace(settings=SimpleNamespace(size=256))
    videos = [SimpleNamespace(error=None, target=np.zeros((4, 70), np.float32), state=state, plan=plan, run_notes=[])
              for _ in "ab"]  # fmt: skip
    graphs = pipeline._Graphs(4, None, "cpu", compile=True, compiled_dir=tmp_path)
    renderer = _MemoryBoundRenderer(limit=2)
    launched = pipeline._launch(renderer, [(videos[i % 2], i) for i in range(4)], graphs)
    assert launched.frames.result().shape == (4, 4, 4, 3)
    assert calls == [4] and graphs.failed and graphs.graph is None
    assert renderer.calls == [4, 2, 2]
    for video in videos:
        assert video.error is None and len(video.run_notes) == 2
        assert video.run_notes[0].startswith("the compiled render step failed (run_func_(")
        assert video.run_notes[1].startswith("video.batch_size 4 ran out of GPU memory: frames were rendered 2 at")
    pipeline._launch(renderer, [(videos[0], 0), (videos[0], 1)], graphs)
    assert len(videos[0].run_notes) == 2  # each note once


def test_compiled_step_runs_without_graphs_when_recording_it_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`video.compile`: where the compiled step cannot be recorded as a CUDA graph, full batches call it directly
    (still compiled); where nothing compiles, the uncompiled step is recorded. On a CPU full batches call the
    compiled step, and without one every batch runs eagerly."""
    from renderer.sadtalker import compiled, graphs

    seen = []

    def capture(renderer, *tensors, dtype=None, step=None):
        seen.append(step)
        if step is not None:
            raise graphs.GraphUnavailable("recording failed")
        return "recorded eager step"

    monkeypatch.setattr(graphs.GraphedRender, "capture", staticmethod(capture))

    def compiled_with_a_note(renderer, tensors, dtype, folder, notes, frames, jit_min_frames):
        notes.append("video.compile: compiled just in time for this run (40 s)")  # as compiled_step reports it
        return lambda *t: t[0] * 2

    monkeypatch.setattr(compiled, "compiled_step", compiled_with_a_note)
    state = pipeline._Graphs(2, None, "cuda", compile=True, compiled_dir=tmp_path)
    tensors = (torch.ones(2, 3), torch.zeros(2, 1))
    direct = state._capture(None, *tensors)
    assert state.run_notes == ["video.compile: compiled just in time for this run (40 s)"]  # each video reports it
    state.notes.clear()
    assert direct.matches(*tensors) and not direct.matches(torch.ones(3, 3), torch.zeros(3, 1))
    assert torch.equal(direct.launch(*tensors).result(), torch.full((2, 3), 2.0))
    # On CUDA a short batch is padded to the compiled rows and gives its own (see the next test).
    assert direct.matches(torch.ones(1, 3), torch.zeros(1, 1))
    assert torch.equal(direct.launch(torch.ones(1, 3), torch.zeros(1, 1)).result(), torch.full((1, 3), 2.0))

    def refuse(renderer, tensors, dtype, folder, notes, frames, jit_min_frames):
        raise compiled.CompileUnavailable("no compiler")

    monkeypatch.setattr(compiled, "compiled_step", refuse)
    assert state._capture(None, *tensors) == "recorded eager step" and seen[-1] is None
    assert state.notes == ["video.compile: no compiler; rendered without compiling"]  # each video reports it

    # On a CPU nothing is recorded: the compiled step is called per full batch, or the batches stay eager.
    seen.clear()
    on_cpu = pipeline._Graphs(2, None, "cpu", compile=True, compiled_dir=tmp_path)
    assert on_cpu._capture(None, *tensors) is None and seen == []
    assert on_cpu.launch(None, *tensors) is None and on_cpu.failed
    monkeypatch.setattr(
        compiled,
        "compiled_step",
        lambda renderer, tensors, dtype, folder, notes, frames, jit_min_frames: lambda *t: t[0] + 1,
    )
    on_cpu = pipeline._Graphs(2, None, "cpu", compile=True, compiled_dir=tmp_path)
    assert torch.equal(on_cpu.launch(None, *tensors).result(), torch.full((2, 3), 2.0)) and seen == []
    assert pipeline._Graphs(2, None, "cpu").launch(None, *tensors) is None  # no compile: eager, as before


def test_model_pool_loads_each_model_once_and_different_models_in_parallel() -> None:
    """Threads asking for one model share one load; a load of another model does not wait for it (the renderer
    loads on the render thread while the preparation thread loads the 3DMM and audio networks)."""
    import threading

    pool = ModelPool()
    b_loading = threading.Event()
    calls: list[str] = []

    def load_a():
        calls.append("a")
        assert b_loading.wait(10), "model b could not load while model a was loading"
        return "A"

    def load_b():
        calls.append("b")
        b_loading.set()
        return "B"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(pool.get("a", "cpu", "float32", load_a)))
               for _ in range(3)]  # fmt: skip
    for thread in threads:
        thread.start()
    assert pool.get("b", "cpu", "float32", load_b) == "B"
    for thread in threads:
        thread.join(10)
    assert results == ["A", "A", "A"] and calls.count("a") == 1 and calls.count("b") == 1
    assert pool.loads == {("a", "cpu", "float32"): 1, ("b", "cpu", "float32"): 1}


def test_renderer_that_fails_to_load_fails_its_group_and_keeps_the_preparer_in_step(
    fake_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose renderer cannot load fails each of its prepared videos with that error (a copy per video),
    and takes exactly its own videos from the preparer, so the next group gets the right ones."""
    from types import SimpleNamespace

    def fail(*args, **kwargs):
        raise MissingWeightsError("SadTalker_V0.0.2_256.safetensors is damaged", "run `make checkpoints`")

    monkeypatch.setattr(weights, "load_face_renderer", fail)
    monkeypatch.setattr(
        pipeline, "_prepare_batch", _per_video(lambda plan, pool, times: SimpleNamespace(index=plan.index, error=None))
    )
    portrait, audio = tmp_path / "p.png", tmp_path / "a.wav"
    portrait.write_bytes(b"x")
    audio.write_bytes(b"x")
    plans = [pipeline._plan(i, _job(tmp_path, f"v{i}", fake_checkpoints, portrait, audio, seed=i)) for i in range(3)]
    preparer = pipeline._Preparer(plans, ModelPool(), ahead=1)
    try:
        videos = pipeline._render_group(plans[:2], preparer, ModelPool())
        assert [v.index for v in videos] == [0, 1]
        assert all(isinstance(v.error, MissingWeightsError) and "damaged" in v.error.message for v in videos)
        assert videos[0].error is not videos[1].error
        assert preparer.next().index == 2
    finally:
        preparer.close()


@pytest.mark.gpu
def test_renderer_on_cuda_with_kernels_matches_it_without(generator) -> None:
    """RUN_GPU=1: the fused generator on CUDA, kernels on vs off (the same model): float32 within 1e-4, float16
    within one or two uint8 levels; the kernels really ran. Prints the float16 error against float32 with them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import copy

    gen = weights.place(copy.deepcopy(generator), "cuda")
    rng = np.random.default_rng(7)
    image = torch.from_numpy(rng.random((2, 3, 256, 256), dtype=np.float32)).cuda()
    kp_s = torch.from_numpy(rng.normal(scale=0.3, size=(2, 15, 3)).astype(np.float32)).cuda()
    kp_d = kp_s + torch.from_numpy(rng.normal(scale=0.05, size=(2, 15, 3)).astype(np.float32)).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    try:
        for on in (True, False):
            kernels.ENABLED = on
            launched = dict(kernels.LAUNCHES)
            with torch.inference_mode():
                out[on, "float32"] = gen(image, kp_s, kp_d).prediction.float()
                with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                    out[on, "float16"] = gen(image, kp_s, kp_d).prediction.float()
            ran = {k: kernels.LAUNCHES[k] - launched[k] for k in launched}
            assert (min(ran.values()) > 0) == on, ran
    finally:
        kernels.ENABLED = True
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(out[True, "float32"], out[False, "float32"], atol=1e-4, rtol=1e-4)
    for on in (True, False):
        error = (out[on, "float16"] - out[True, "float32"]).abs()
        print(f"float16 kernels {'on' if on else 'off'} vs float32: max {error.max().item():.4f}, "
              f"mean {error.mean().item():.5f}")  # fmt: skip
    levels = ((out[True, "float16"] - out[False, "float16"]).abs() * 255).max().item()
    print(f"float16 kernels on vs off: max {levels:.2f} levels")
    assert (out[True, "float16"] - out[True, "float32"]).abs().mean() <= 1.1 * (
        out[False, "float16"] - out[True, "float32"]
    ).abs().mean() + 1e-4
