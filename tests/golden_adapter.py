"""This project's SadTalker code behind the reference checker `../shared/sadtalker/golden/check_golden.py`.

Run it on the public golden set, or on the held-back one, from the repository root::

    make golden                                   # ../shared/sadtalker/golden/public
    make golden GOLDEN=path/to/another/set        # the same checker and adapter on another set

Every golden file has an adapter here: `fn(inputs, weights, options) -> {golden name: array}` (the checker's
interface, see its docstring). Each builds the networks the way the stage does, from the filled state dicts the
checker passes in: the 3DMM and audio networks with `from_state_dict` and their BatchNorms folded
(`fold.fold_batchnorms`, as `pipeline._pooled`), the renderer networks strictly loaded into a `FaceRenderer` and
fused (`weights.load_strict`, `facerender.fuse_for_inference`, as `weights.load_face_renderer`). The stage files
run the same functions the stage calls, and read every option from the sidecar (batch size, preprocess mode,
expression scale, still mode, free-view angles, pose style), so a set made with other options is computed with
them.

`stage_facerender.frames_final_u8` needs the crop size of the same set's `stage_crop` (upstream restores the
aspect ratio from it, and the checker passes only the file's own inputs): it is read from the folder given to the
checker as `--golden`, or from `$SADTALKER_GOLDEN`; without either, that one output is left out (and reported
missing).

tests/test_sadtalker_golden_checker.py runs the checker with this adapter on the public set.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checker imports this file by path, from any folder
    sys.path.insert(0, str(ROOT))

from renderer.sadtalker import audio, audio2coeff, preprocess, recon, weights  # noqa: E402
from renderer.sadtalker import facerender as fr  # noqa: E402
from renderer.sadtalker.fold import fold_batchnorms  # noqa: E402

Arrays = Mapping[str, np.ndarray]
WeightsFn = Callable[[str], Mapping[str, torch.Tensor]]

# Networks built once per checker run (building the generator from its state dict takes seconds).
_BUILT: dict[Any, torch.nn.Module] = {}


def _built(key: Any, build: Callable[[], torch.nn.Module]) -> Any:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def _coefficient_net(cls: Any, net: str, state: WeightsFn) -> Any:
    """A 3DMM or audio network as the stage pools it: strict `from_state_dict`, BatchNorms folded, float32."""
    return _built(net, lambda: fold_batchnorms(cls.from_state_dict(state(net))))


def _renderer(state: WeightsFn, channels: int = 70, mask_gain: float | None = None) -> fr.FaceRenderer:
    """KPDetector + MappingNet(`channels`) + generator, strictly loaded and fused as `weights.load_face_renderer`
    does. `mask_gain` multiplies the dense-motion mask convolution (the `net_generator_sharpmask` variant)."""

    def build() -> fr.FaceRenderer:
        generator_state = dict(state("generator"))
        if mask_gain is not None:
            for key in ("dense_motion_network.mask.weight", "dense_motion_network.mask.bias"):
                generator_state[key] = generator_state[key] * mask_gain
        parts = [
            (fr.KPDetector(), state("kp_detector"), "kp_detector"),
            (fr.MappingNet(channels), state(f"mapping{channels}"), f"mapping{channels}"),
            (fr.OcclusionAwareSPADEGenerator(), generator_state, "generator"),
        ]
        for module, values, name in parts:
            weights.load_strict(module, values, f"golden fill ({name})")
        renderer = fr.FaceRenderer(*(module for module, _, _ in parts)).eval()
        return fr.fuse_for_inference(renderer)

    return _built(("renderer", channels, mask_gain), build)


# ----------------------------------------------------------------------------------------------------------------
# Networks


@torch.inference_mode()
def net_recon(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    net = _coefficient_net(recon.ReconNet, "recon", state)
    image = torch.from_numpy(inp["image"])
    return {"backbone_feat": net.backbone(image).flatten(1), "coeffs_257": net(image)}


@torch.inference_mode()
def net_audio2exp(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    net = _coefficient_net(audio2coeff.ExpNet, "audio2exp", state)
    mel = torch.from_numpy(inp["mel"])
    exp = net(mel, torch.from_numpy(inp["ref"][0]), torch.from_numpy(inp["ratio"][0]))
    return {"audio_embedding": net.embed(mel), "exp": exp[None]}


@torch.inference_mode()
def net_audio2pose(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    net = _coefficient_net(audio2coeff.PoseVAE, "audio2pose", state)
    decoder = net.decoder
    z, style, ref = (torch.from_numpy(inp[k]) for k in ("z", "class_id", "ref_pose"))
    emb = torch.cat([net.audio_encoder(torch.from_numpy(mel[None])) for mel in inp["mel"]])  # batch 1, as upstream
    mlp = decoder.MLP(decoder.mlp_input(z, style, ref, emb))
    return {
        "audio_emb": emb,
        "decoder_mlp_out": mlp,
        "decoder_resunet_out": decoder.resunet(mlp.reshape(-1, 1, 32, 6)),
        "pose_motion_pred": decoder(z, style, ref, emb),
    }


def _mapping(channels: int) -> Callable[[Arrays, WeightsFn, Mapping], dict]:
    @torch.inference_mode()
    def adapter(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
        out = _renderer(state, channels).mapping(torch.from_numpy(inp["input_3dmm"]))
        got = {k: getattr(out, k) for k in ("yaw", "pitch", "roll", "t", "exp")}
        got.update({f"{k}_deg": fr.headpose_pred_to_degree(getattr(out, k)) for k in ("yaw", "pitch", "roll")})
        return got

    return adapter


@torch.inference_mode()
def net_kp_detector(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    net = _renderer(state).kp_detector
    image = torch.from_numpy(inp["image"])
    logits = net.logits(image).flatten(2)
    return {
        "kp": net(image),
        "downsampled": net.down(image),
        "kp_logit_max_mean": torch.stack([logits.amax(2), logits.mean(2)], dim=-1),
    }


@torch.inference_mode()
def _generator(renderer: fr.FaceRenderer, inp: Arrays) -> dict:
    generator = renderer.generator
    feature = generator.encode_source(torch.from_numpy(inp["source_image"]))
    out = renderer.render(feature, torch.from_numpy(inp["kp_source"]), torch.from_numpy(inp["kp_driving"]), True)
    return {
        "prediction": out.prediction,
        "occlusion_map": out.occlusion_map,
        "deformation": out.deformation,
        "mask_depth8": out.mask[:, :, 8],  # [B, 16, D=16, H, W]
        "mask_mean": out.mask.mean(dim=(2, 3, 4)),
        "mask_frac_below_1e-3": (out.mask < fr.MASK_FLOOR).float().mean().reshape(1),
        "feature_3d_mean_hw": feature.mean(dim=(3, 4)),
        "decoder_input_mean_hw": out.decoder_input.mean(dim=(2, 3)),
    }


def net_generator(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    return _generator(_renderer(state), inp)


def net_generator_sharpmask(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    return _generator(_renderer(state, mask_gain=25.0), inp)


def net_generator_512(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    renderer = _renderer(state)
    got = _generator(renderer, inp)
    with torch.inference_mode():
        got["kp_canonical"] = renderer.kp_detector(torch.from_numpy(inp["source_image"]))
    return got


# ----------------------------------------------------------------------------------------------------------------
# Stages


def stage_crop(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    return crop_stage(inp, options.get("preprocess", "crop"))


def crop_stage(inp: Arrays, mode: str) -> dict:
    """CropAndExtract's crop of the full image from given landmarks, at 256 and 512. The face geometry
    (align_face's rsize, crop box, quad) is the same in every mode; `resize` uses none of it: its face is the whole
    image and crop_info[0] the image size."""
    image, landmarks = inp["image_full_u8"], inp["landmarks_68_full"]
    geometry = preprocess.crop_geometry(landmarks, image.shape[1], image.shape[0])
    source_256 = preprocess.crop_face(image, landmarks, mode, 256)
    face = image if mode == "resize" else preprocess.cut_face(image, geometry, mode)[0]
    return {
        "rsize": np.array(geometry.resized_size),
        "crop": np.array(geometry.crop_box),
        "quad": np.array(geometry.quad),
        "crop_info_size": np.array(source_256.crop_info.size),
        "face_crop_u8": face,
        "source_256_u8": source_256.crop,
        "source_512_u8": preprocess.crop_face(image, landmarks, mode, 512).crop,
    }


def stage_recon224(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    return recon_stage(inp, _coefficient_net(recon.ReconNet, "recon", state))


def recon_stage(inp: Arrays, net: recon.ReconNet) -> dict:
    """The 224 alignment and the 3DMM regressor on the 256 source, for each landmark case."""
    image, cases = inp["image_256_u8"], list(inp["landmarks_68"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("lm5", "trans_params", "aligned_224_u8", "recon_input")}
    for landmarks in cases:  # all −1: the no-face fallback
        out["lm5"].append(preprocess.alignment_points(image, landmarks))
        aligned, trans_params = preprocess.align_for_recon(image, landmarks)
        out["aligned_224_u8"].append(aligned)
        out["trans_params"].append(trans_params)
        out["recon_input"].append(recon.recon_input(aligned)[0].numpy())
    # The coefficients as the stage makes them: every video's crop in one forward pass.
    results = recon.coeffs_from_crops(net, [image] * len(cases), cases)
    got = {k: np.stack(v) for k, v in out.items()}
    got["coeff_3dmm"] = np.stack([coeff[0] for coeff, _ in results])
    got["full_3dmm"] = np.stack([full[0] for _, full in results])
    got["lm3d_std_5"] = preprocess.standard_five_points().astype(np.float64)
    return got


def stage_audio2coeff(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    """Upstream's get_data + Audio2Coeff.generate with the file's random draws (blink ratio, pose latents) as
    inputs. `still` does not reach this stage upstream (it acts on the render preparation, `stage_facerender`)."""
    exp_net = _coefficient_net(audio2coeff.ExpNet, "audio2exp", state)
    pose_net = _coefficient_net(audio2coeff.PoseVAE, "audio2pose", state)
    return audio2coeff_stage(inp, exp_net, pose_net)


def audio2coeff_stage(inp: Arrays, exp_net: audio2coeff.ExpNet, pose_net: audio2coeff.PoseVAE) -> dict:
    """wav → mel windows → expression (given blinks) and pose (given latents, Savitzky–Golay) → N×70."""
    wav = inp["wav_16k"]
    windows = audio.mel_windows(wav)
    ref = inp["ref_coeff_70"].reshape(-1)
    exp = audio2coeff.predict_expression(exp_net, windows, ref[: audio2coeff.NUM_EXP], inp["blink_ratio"])
    style, z = int(inp["pose_style"]), torch.from_numpy(inp["z"])
    raw = audio2coeff.predict_pose(pose_net, windows, ref[audio2coeff.NUM_EXP :], style, z)
    with torch.inference_mode():
        embeddings = audio2coeff.encode_pose_audio(pose_net, windows[1:])
    plan = audio2coeff.pose_windows(len(windows))
    return {
        "mel": audio.melspectrogram(audio.trim_to_frames(wav)),
        "indiv_mels": windows[:, 0],
        "exp_pred": exp,
        "pose_audio_emb": np.stack([embeddings[first:stop].numpy() for first, stop, _ in plan]),
        "pose_motion_pred": raw - ref[None, audio2coeff.NUM_EXP :],
        "pose_pred_raw": raw,
        "coeff_70": np.concatenate([exp, audio2coeff.smooth_pose(raw)], axis=1),
    }


stage_audio2coeff_short = stage_audio2coeff


def pad_reshape(sequence: np.ndarray, batch_size: int) -> np.ndarray:
    """Upstream's render layout: padded with the last value to a multiple of the batch size, rows of
    consecutive frames ([bs, L, ...]: batch row b renders frames b·L … b·L+L−1)."""
    steps = math.ceil(len(sequence) / batch_size)
    order = np.minimum(np.arange(batch_size * steps), len(sequence) - 1)
    return sequence[order].reshape(batch_size, steps, *sequence.shape[1:])


@torch.inference_mode()
def prepare_render(inp: Arrays, opt: Mapping, prefix: str, renderer: fr.FaceRenderer) -> tuple[dict, dict]:
    """make_animation up to the driving keypoints, in upstream's [bs, L] layout, with the stage's functions."""
    bs, mode = int(opt["batch_size"]), opt["preprocess"]
    target = fr.target_coefficients(
        inp["target_coeff_70"], inp["source_coeff_73"], mode, opt["expression_scale"], opt["still_mode"]
    )
    frames = len(target)
    windows = pad_reshape(fr.target_windows(target, np.arange(frames)), bs)  # [bs, L, C, 27]
    source_u8 = next(inp[k] for k in ("source_256_u8", "source_512_u8", "source_image_u8") if k in inp)
    source = fr.image_to_tensor(source_u8)
    semantics = torch.from_numpy(fr.source_window(inp["source_coeff_73"], mode))[None]
    free = {}
    for axis in ("yaw", "pitch", "roll"):
        degrees = opt.get(f"input_{axis}_list")
        if degrees:
            free[axis] = pad_reshape(fr.camera_pose_sequence(degrees, frames), bs).astype(np.float32)
    state = renderer.prepare_source(source, semantics)  # once, as the stage does; upstream's rows are copies
    state = fr.SourceState(
        state.feature.expand(bs, -1, -1, -1, -1),
        state.kp_canonical.expand(bs, -1, -1),
        state.kp_source.expand(bs, -1, -1),
    )
    he_source = renderer.mapping(semantics.expand(bs, -1, -1))
    kp_driving, he_driving = [], []
    for step in range(windows.shape[1]):
        window = torch.from_numpy(windows[:, step])
        angles = {k: torch.from_numpy(v[:, step]) for k, v in free.items()}
        kp_driving.append(renderer.driving_keypoints(state.kp_canonical, window, **angles))
        he_driving.append(renderer.mapping(window))
    got = {
        f"{prefix}target_semantics_list": windows,
        f"{prefix}kp_source": state.kp_source,
        f"{prefix}kp_driving": torch.stack(kp_driving),
    }
    got.update({f"{prefix}{k}_c_seq": v for k, v in free.items()})
    return got, {"state": state, "source": source, "he_source": he_source, "he_driving": he_driving}


def mapping_outputs(prepared: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The mapping net's heads for the source and every render step (`he_source_*`, `he_driving_*` [L, bs, ...])."""
    got = {}
    for head in ("yaw", "pitch", "roll", "t", "exp"):
        got[f"he_source_{head}"] = getattr(prepared["he_source"], head)
        got[f"he_driving_{head}"] = torch.stack([getattr(he, head) for he in prepared["he_driving"]])
    return got


def stage_facerender_kp_variants(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    got: dict[str, Any] = {}
    for i, variant in enumerate(options["variants"]):
        renderer = _renderer(state, fr.mapping_channels(variant["preprocess"]))
        outputs, prepared = prepare_render(inp, variant, f"v{i}_", renderer)
        got.update(outputs)
        got["kp_canonical"] = prepared["state"].kp_canonical[:1]
    return got


def _golden_folder() -> Path | None:
    """The folder the checker was given (`--golden`), else `$SADTALKER_GOLDEN`."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--golden" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--golden="):
            return Path(arg.split("=", 1)[1])
    env = os.environ.get("SADTALKER_GOLDEN")
    return Path(env) if env else None


def _crop_size() -> tuple[int, int] | None:
    folder = _golden_folder()
    if folder is None or not (folder / "stage_crop.npz").is_file():
        return None
    with np.load(folder / "stage_crop.npz") as data:
        width, height = (int(v) for v in data["crop_info_size"])
    return width, height


def restore_aspect(frames_u8: np.ndarray, size: int, crop_size: tuple[int, int]) -> np.ndarray:
    """Upstream's `cv2.resize(frame, (S, int(S·h/w)))` with (w, h) = crop_info[0] (no rounding to even)."""
    out_w, out_h = size, int(size * crop_size[1] / crop_size[0])
    return np.stack(
        [f if f.shape[:2] == (out_h, out_w) else preprocess.resize_bilinear(f, (out_w, out_h)) for f in frames_u8]
    )


def render_stage(
    inp: Arrays, options: Mapping, renderer: fr.FaceRenderer, crop_size: tuple[int, int] | None
) -> dict[str, Any]:
    """make_animation and AnimateFromCoeff's frame handling: every render step, every batch row."""
    bs, mode = int(options["batch_size"]), options["preprocess"]
    got, prepared = prepare_render(inp, options, "", renderer)
    state = prepared["state"]
    got.update(mapping_outputs(prepared))
    got["source_image"] = prepared["source"].expand(bs, -1, -1, -1)
    got["source_semantics"] = torch.from_numpy(fr.source_window(inp["source_coeff_73"], mode))[None].expand(bs, -1, -1)
    got["kp_canonical"] = state.kp_canonical
    with torch.inference_mode():
        outs = [renderer.render(state.feature, state.kp_source, kp) for kp in got["kp_driving"]]
    got["occlusion_map"] = torch.stack([out.occlusion_map for out in outs])
    frames = len(inp["target_coeff_70"])
    rendered = torch.stack([out.prediction for out in outs], dim=1).flatten(0, 1)[:frames]  # rows back to frames
    frames_u8 = fr.frames_to_uint8(rendered)
    got.update(frames=rendered, frames_u8=frames_u8)
    if crop_size is not None:
        got["frames_final_u8"] = restore_aspect(frames_u8, int(options.get("size", frames_u8.shape[2])), crop_size)
    return got


def stage_facerender(inp: Arrays, state: WeightsFn, options: Mapping) -> dict:
    return render_stage(inp, options, _renderer(state, fr.mapping_channels(options["preprocess"])), _crop_size())


ADAPTERS = {
    "net_recon": net_recon,
    "net_audio2exp": net_audio2exp,
    "net_audio2pose": net_audio2pose,
    "net_mapping70": _mapping(70),
    "net_mapping73": _mapping(73),
    "net_kp_detector": net_kp_detector,
    "net_generator": net_generator,
    "net_generator_sharpmask": net_generator_sharpmask,
    "net_generator_512": net_generator_512,
    "stage_crop": stage_crop,
    "stage_recon224": stage_recon224,
    "stage_audio2coeff": stage_audio2coeff,
    "stage_audio2coeff_short": stage_audio2coeff_short,
    "stage_facerender": stage_facerender,
    "stage_facerender_kp_variants": stage_facerender_kp_variants,
}
