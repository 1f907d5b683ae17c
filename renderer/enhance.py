"""Stage "enhance": GFPGAN v1.4 face restoration of a rendered (silent) video, frame by frame.

Per batch of frames: (1) RetinaFace (facexlib) finds faces and their 5 landmarks on every frame, in one forward
pass for the batch; (2) each face is warped onto GFPGAN's 5-point face template (FFHQ alignment) with a
similarity transform; (3) GFPGANv1Clean restores all aligned crops of the batch in one forward pass; (4) ParseNet
(facexlib) segments each restored face into a soft mask; (5) the restored face is warped back and blended into
the frame with that mask. Frames stream from `read_frames` to `VideoWriter`, so memory stays flat.

Choices (and how they differ from upstream SadTalker's GFPGANer call, SPEC §8.4):

* Detection runs on every frame (batched). It costs a few percent of the restoration on a GPU and keeps the
  alignment exact while the head moves; when the detector misses a face for a few frames, the last landmarks are
  reused (at most `MAX_REUSE_FRAMES`) so the video does not flicker between enhanced and raw faces.
* Output size = input size (`upscale` 1), not ×2: the video keeps the size the manifest asked for.
* GFPGAN's StyleGAN noise comes from the noise buffers stored in the checkpoint (`randomize_noise=False`), not a
  fresh draw per call: the output is deterministic (cacheable) and flickers less from frame to frame.
* Weights are read only from `job.checkpoints/gfpgan/` (never downloaded) with `torch.load(weights_only=True)`:
  the networks are built here and loaded with the state dicts, so GFPGANer's and facexlib's own loaders (a plain
  `torch.load`, a download to a working-directory folder) never run. The architecture of the GFPGAN and ParseNet
  checkpoints is read from their tensor shapes, so small test checkpoints of the same classes load as well.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from renderer.base import (
    FPS,
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
    run_each,
)
from renderer.checkpoints import GFPGAN_FOLDER, gfpgan_files, missing

logger = logging.getLogger(__name__)

#: Pool id of the loaded restorer + detector + parser.
MODEL_ID = "gfpgan-v1.4"
#: The one enhancer this stage implements (`video.enhancer`).
ENHANCER = "gfpgan"
RESTORER_FILE = f"{GFPGAN_FOLDER}/GFPGANv1.4.pth"
DETECTOR_FILE = f"{GFPGAN_FOLDER}/detection_Resnet50_Final.pth"
PARSER_FILE = f"{GFPGAN_FOLDER}/parsing_parsenet.pth"

#: RetinaFace score a detection needs, the NMS overlap, and the smallest eye distance (px) kept: GFPGANer's values.
DETECTION_THRESHOLD = 0.97
NMS_IOU = 0.4
MIN_EYE_DISTANCE = 5.0
#: RetinaFace's BGR channel means (it was trained on raw 0..255 BGR pixels minus these).
_RETINAFACE_MEAN_BGR = (104.0, 117.0, 123.0)
#: 5-point FFHQ face template for a 512×512 crop (facexlib's FaceRestoreHelper): eyes, nose tip, mouth corners
#: (image left first). Scaled to the restorer's face size.
FACE_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
#: Grey that fills the part of an aligned crop outside the frame (facexlib's value, as RGB).
_BORDER_RGB = (132, 133, 135)
#: ParseNet's 19 labels that belong to the pasted face (facexlib's MASK_COLORMAP): skin, brows, eyes, glasses,
#: ears, earrings, nose, mouth, lips; not the neck (14), cloth (16), hair (17) or hat (18).
_FACE_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
#: The paste mask is blurred twice with this kernel and sigma and cleared along its border, at a 512 px parse size.
_MASK_BLUR_512 = (101, 11.0)
_MASK_BORDER_512 = 10
#: When the detector misses a face, its last landmarks are reused for at most this many frames (0.2 s).
MAX_REUSE_FRAMES = FPS // 5


@dataclasses.dataclass(frozen=True)
class EnhanceOutput:
    """What one video's enhancement did (goes into the report)."""

    frames: int
    faces: int
    frames_without_face: int
    frames_reusing_landmarks: int
    width: int
    height: int
    fps: int


@dataclasses.dataclass(frozen=True)
class GFPGANConfig:
    """GFPGANv1Clean hyper-parameters, as read from a checkpoint's tensor shapes."""

    out_size: int
    num_style_feat: int
    channel_multiplier: int
    narrow: float
    num_mlp: int
    different_w: bool
    sft_half: bool


# ---------------------------------------------------------------------------------------------------------------
# Imports of the GFPGAN stack (shims live here, right before the imports that need them)


def _import_gfpgan_stack() -> types.SimpleNamespace:
    """Import torch, GFPGANv1Clean, RetinaFace and ParseNet, working around two breakages of their dependencies."""
    import torch

    from renderer.compat import import_torchvision

    import_torchvision()
    import torchvision.transforms.functional as tv_functional

    # basicsr 1.4.2 (imported by gfpgan) still imports torchvision.transforms.functional_tensor, which torchvision
    # 0.17 removed; its one use (rgb_to_grayscale) lives on in transforms.functional. Alias it before the import.
    sys.modules.setdefault("torchvision.transforms.functional_tensor", tv_functional)

    from facexlib.detection import retinaface_utils
    from facexlib.detection.retinaface import RetinaFace, generate_config
    from facexlib.parsing.parsenet import ParseNet
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    return types.SimpleNamespace(
        torch=torch,
        GFPGANv1Clean=GFPGANv1Clean,
        RetinaFace=RetinaFace,
        retinaface_config=generate_config,
        retinaface_utils=retinaface_utils,
        ParseNet=ParseNet,
    )


def _load_state_dict(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (plain tensors and containers only: a pickle cannot run code)."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MissingWeightsError(
            f"{path} is not a plain weights file: torch.load(weights_only=True) refused it ({exc})",
            "delete it and run `make checkpoints` to fetch the verified file",
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise MissingWeightsError(
            f"cannot read weights {path}: {exc}", "delete it and run `make checkpoints` to fetch it again"
        ) from exc
    if not isinstance(state, dict):
        raise MissingWeightsError(f"{path} holds a {type(state).__name__}, not a state dict", "run `make checkpoints`")
    return state


def _indices(state: dict[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def gfpgan_config(state: dict[str, Any]) -> GFPGANConfig:
    """Read GFPGANv1Clean's hyper-parameters from its state dict (GFPGAN v1.4: 512, 512, 2, 1, 8, True, True)."""
    n_down = len(_indices(state, "conv_body_down."))
    mlp = _indices(state, "stylegan_decoder.style_mlp.")
    if n_down < 1 or not mlp or "final_conv.weight" not in state:
        raise ValueError("not a GFPGANv1Clean state dict (conv_body_down / style_mlp / final_conv missing)")
    log_size = n_down + 2
    out_size = 2**log_size
    narrow = state["final_conv.weight"].shape[0] / 256  # channels['4'] = int(512 * narrow * 0.5)
    first = state["conv_body_first.weight"].shape[0]  # channels[out_size] = int(base * multiplier * narrow * 0.5)
    base = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}.get(out_size)
    multiplier = max(1, round(first / (base * narrow * 0.5))) if base else 1
    num_style_feat = state[f"stylegan_decoder.style_mlp.{mlp[0]}.weight"].shape[0]
    linear_out = state["final_linear.weight"].shape[0]
    scale_out = state["condition_scale.0.2.weight"].shape[0]
    scale_in = state["condition_scale.0.0.weight"].shape[0]
    return GFPGANConfig(
        out_size=out_size,
        num_style_feat=num_style_feat,
        channel_multiplier=multiplier,
        narrow=narrow,
        num_mlp=len(mlp),
        different_w=linear_out != num_style_feat,
        sft_half=scale_out == scale_in,
    )


def _parse_size(state: dict[str, Any]) -> tuple[int, int]:
    """ParseNet's (in_size, out_size) from its state dict: one encoder/decoder block per halving above 32 px."""
    down = max(_indices(state, "encoder."), default=0)
    up = len(_indices(state, "decoder."))
    return 32 * 2**down, 32 * 2**up


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    """RetinaFace checkpoints were saved from DataParallel: drop the leading 'module.' (SPEC §2.4)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression (highest score first); indices of the boxes kept."""
    order = np.argsort(-scores)
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def checkpoints_missing(root: Path) -> list[str]:
    """The enhancer's weight files (relative to `root`) that are not there."""
    return missing(root, gfpgan_files())


def resolve_dtype(spec: str, device: str) -> str:
    """`video.dtype` → the restorer's dtype: auto is float16 on CUDA, float32 elsewhere."""
    if spec == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if spec not in ("float32", "float16", "bfloat16"):
        raise BadInputError(f"video.dtype {spec!r} is not one of auto, float32, float16, bfloat16")
    return spec


# ---------------------------------------------------------------------------------------------------------------
# The model


class GFPGANEnhancer:
    """GFPGANv1Clean restorer + RetinaFace detector + ParseNet parser, loaded once and shared by every job."""

    def __init__(
        self,
        nets: types.SimpleNamespace,
        restorer: Any,
        detector: Any,
        parser: Any,
        parse_size: int,
        device: str,
        dtype: str,
    ) -> None:
        self._lib = nets
        self.torch = nets.torch
        self.restorer = restorer
        self.detector = detector
        self.parser = parser
        self.parse_size = parse_size
        self.device = self.torch.device(device)
        self.dtype = getattr(self.torch, dtype)
        self.face_size = 2 ** int(restorer.log_size)
        self.template = FACE_TEMPLATE_512 * (self.face_size / 512.0)
        self._priors: dict[tuple[int, int], Any] = {}

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, root: Path, device: str = "cpu", dtype: str = "float32") -> GFPGANEnhancer:
        """Build the three networks and load their weights from `root` (the checkpoints folder)."""
        root = Path(root)
        absent = checkpoints_missing(root)
        if absent:
            raise MissingWeightsError(
                f"GFPGAN weights missing in {root}: {', '.join(absent)}",
                "run `make checkpoints` (or `python -m renderer.checkpoints --only gfpgan`)",
            )
        lib = _import_gfpgan_stack()
        torch = lib.torch

        # 1. Restorer: GFPGANv1Clean, shaped after the checkpoint ('params_ema' weights, else 'params').
        ckpt = _load_state_dict(root / RESTORER_FILE)
        state = ckpt.get("params_ema", ckpt.get("params", ckpt))
        try:
            cfg = gfpgan_config(state)
            restorer = lib.GFPGANv1Clean(
                out_size=cfg.out_size,
                num_style_feat=cfg.num_style_feat,
                channel_multiplier=cfg.channel_multiplier,
                decoder_load_path=None,
                fix_decoder=False,
                num_mlp=cfg.num_mlp,
                input_is_latent=True,
                different_w=cfg.different_w,
                narrow=cfg.narrow,
                sft_half=cfg.sft_half,
            )
            restorer.load_state_dict(state, strict=True)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise MissingWeightsError(
                f"{root / RESTORER_FILE} does not hold GFPGANv1Clean weights: {exc}", "run `make checkpoints`"
            ) from exc

        # 2. Detector: RetinaFace with a ResNet-50 backbone.
        try:
            detector = lib.RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))
            detector.load_state_dict(_strip_module(_load_state_dict(root / DETECTOR_FILE)), strict=True)
        except (KeyError, RuntimeError) as exc:
            raise MissingWeightsError(
                f"{root / DETECTOR_FILE} does not hold RetinaFace-ResNet50 weights: {exc}", "run `make checkpoints`"
            ) from exc

        # 3. Parser: ParseNet with 19 face-part labels.
        parse_state = _load_state_dict(root / PARSER_FILE)
        in_size, out_size = _parse_size(parse_state)
        try:
            parser = lib.ParseNet(in_size=in_size, out_size=out_size, parsing_ch=19)
            parser.load_state_dict(parse_state, strict=True)
        except (KeyError, RuntimeError) as exc:
            raise MissingWeightsError(
                f"{root / PARSER_FILE} does not hold ParseNet weights: {exc}", "run `make checkpoints`"
            ) from exc

        restorer = restorer.eval().to(device=device, dtype=getattr(torch, dtype))
        detector = detector.eval().to(device)
        detector.device = torch.device(device)
        parser = parser.eval().to(device)
        return cls(lib, restorer, detector, parser, in_size, device, dtype)

    # -- steps ----------------------------------------------------------------------------------------------

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """5-point landmarks (n_faces, 5, 2) of every face in each RGB frame of a (B, H, W, 3) uint8 batch."""
        torch = self.torch
        utils = self._lib.retinaface_utils
        cfg = self.detector.cfg
        _, height, width, _ = frames.shape
        with torch.inference_mode():
            bgr = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).to(self.device)
            x = (
                bgr.permute(0, 3, 1, 2).contiguous().float()
                - torch.tensor(_RETINAFACE_MEAN_BGR, device=self.device)[:, None, None]
            )
            loc, conf, landms = self.detector(x)
            priors = self._priors.get((height, width))
            if priors is None:
                priors = utils.PriorBox(cfg, image_size=(height, width)).forward().to(self.device)
                self._priors[(height, width)] = priors
            boxes = utils.batched_decode(loc, priors.unsqueeze(0), cfg["variance"])
            points = utils.batched_decode_landm(landms, priors.unsqueeze(0), cfg["variance"])
            boxes = (boxes * torch.tensor([width, height] * 2, device=self.device)).float().cpu().numpy()
            points = (points * torch.tensor([width, height] * 5, device=self.device)).float().cpu().numpy()
            scores = conf[..., 1].float().cpu().numpy()
        found = []
        for b in range(frames.shape[0]):
            sel = np.flatnonzero(scores[b] > DETECTION_THRESHOLD)
            keep = sel[_nms(boxes[b, sel], scores[b, sel], NMS_IOU)] if sel.size else sel
            marks = points[b, keep].reshape(-1, 5, 2)
            eye = np.linalg.norm(marks[:, 0] - marks[:, 1], axis=1) if len(marks) else np.zeros(0)
            found.append(marks[eye >= MIN_EYE_DISTANCE].astype(np.float32))
        return found

    def align(self, frame: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warp one face onto the template: (crop S×S×3 uint8, 2×3 affine frame→crop)."""
        import cv2

        # LMEDS as facexlib does: robust to one bad landmark; a similarity transform (no shear).
        affine = cv2.estimateAffinePartial2D(landmarks, self.template, method=cv2.LMEDS)[0]
        if affine is None:
            raise ValueError("degenerate landmarks")
        size = (self.face_size, self.face_size)
        crop = cv2.warpAffine(frame, affine, size, borderMode=cv2.BORDER_CONSTANT, borderValue=_BORDER_RGB)
        return crop, affine

    def restore(self, crops: np.ndarray) -> np.ndarray:
        """Run GFPGAN on a (N, S, S, 3) uint8 RGB batch of aligned faces; same shape and dtype back."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).contiguous().to(self.dtype) / 127.5 - 1.0
            y = self.restorer(x, return_rgb=False, randomize_noise=False)[0]
            y = ((y.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            return y.permute(0, 2, 3, 1).cpu().numpy()

    def face_masks(self, faces: np.ndarray) -> np.ndarray:
        """Soft paste masks (N, S, S) float32 in [0, 1] of restored faces: face parts only, blurred edges."""
        import cv2

        torch = self.torch
        p = self.parse_size
        batch = np.stack([cv2.resize(f, (p, p), interpolation=cv2.INTER_LINEAR) for f in faces])
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0
            labels = self.parser(x)[0].argmax(dim=1).cpu().numpy()
        scale = p / 512.0
        ksize, sigma = _odd(_MASK_BLUR_512[0] * scale), _MASK_BLUR_512[1] * scale
        border = max(1, int(round(_MASK_BORDER_512 * scale)))
        masks = []
        for label in labels:
            mask = np.isin(label, _FACE_LABELS).astype(np.float32)
            mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
            mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
            mask[:border, :] = mask[-border:, :] = 0
            mask[:, :border] = mask[:, -border:] = 0
            masks.append(cv2.resize(mask, (self.face_size, self.face_size), interpolation=cv2.INTER_LINEAR))
        return np.stack(masks)

    @staticmethod
    def paste_back(frame: np.ndarray, face: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Warp a restored S×S face back into `frame` (float32 H×W×3) and blend it in with its S×S soft mask."""
        import cv2

        height, width = frame.shape[:2]
        inverse = cv2.invertAffineTransform(affine)
        pasted = cv2.warpAffine(face, inverse, (width, height)).astype(np.float32)
        soft = cv2.warpAffine(mask.astype(np.float32), inverse, (width, height), flags=cv2.INTER_CUBIC)
        soft = soft.clip(0.0, 1.0)[..., None]
        return soft * pasted + (1.0 - soft) * frame

    def enhance_frames(self, frames: Sequence[np.ndarray], landmarks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Restore the faces at `landmarks` (one (n, 5, 2) array per frame) and paste them back into the frames."""
        aligned: list[tuple[int, np.ndarray, np.ndarray]] = []  # (frame index, crop, affine)
        for index, (frame, marks) in enumerate(zip(frames, landmarks, strict=True)):
            for face in marks:
                try:
                    crop, affine = self.align(frame, face)
                except ValueError:
                    logger.debug("skipping a face with degenerate landmarks in frame %d", index)
                    continue
                aligned.append((index, crop, affine))
        out = [np.asarray(f, dtype=np.float32) for f in frames]
        if aligned:
            restored = self.restore(np.stack([crop for _, crop, _ in aligned]))
            masks = self.face_masks(restored)
            for (index, _, affine), face, mask in zip(aligned, restored, masks, strict=True):
                out[index] = self.paste_back(out[index], face, affine, mask)
        return [np.clip(f, 0, 255).round().astype(np.uint8) for f in out]

    # -- whole video ----------------------------------------------------------------------------------------

    def __call__(self, video: Path, out: Path, batch_size: int = 8) -> EnhanceOutput:
        """Enhance every frame of `video` into `out` (silent H.264, same size, frame count and fps)."""
        from renderer.encode import VideoWriter, probe, read_frames

        # 1. Probe the input.
        info = probe(video)
        if not info.width or not info.height:
            raise BadInputError(f"{video} has no video stream", "re-render the video")
        fps = int(round(info.fps)) if info.fps else FPS
        batch_size = max(1, int(batch_size))
        track = LandmarkTrack()
        frames = 0
        with VideoWriter(out, info.width, info.height, fps=fps) as writer:
            for batch in _batches(read_frames(video), batch_size):
                # 2. Detect faces on the whole batch at once; 3. fill short detector misses.
                marks = [track.step(found) for found in self.detect(np.stack(batch))]
                # 4. Restore, mask and paste back; 5. encode.
                for frame in self.enhance_frames(batch, marks):
                    writer.write(frame)
                frames += len(batch)
        return EnhanceOutput(frames, track.faces, track.missed, track.reused, info.width, info.height, fps)


class LandmarkTrack:
    """Bridges short detector misses: a frame without faces gets the last faces found, for a few frames.

    Without it a single missed frame (a blink, motion blur) would show the raw face between restored ones.
    """

    def __init__(self, max_reuse: int = MAX_REUSE_FRAMES) -> None:
        self.max_reuse = max_reuse
        self._last: np.ndarray | None = None
        self._age = 0
        self.faces = 0
        self.reused = 0
        self.missed = 0

    def step(self, found: np.ndarray) -> np.ndarray:
        """The landmarks (n, 5, 2) to use for the next frame, given what the detector found on it."""
        if len(found):
            self._last, self._age = found, 0
        elif self._last is not None and self._age < self.max_reuse:
            found = self._last
            self._age += 1
            self.reused += 1
        else:
            self.missed += 1
        self.faces += len(found)
        return found


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterable[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------------------
# Stage entry point


def _enhance_one(job: StepJob, pool: ModelPool) -> dict:
    where = job.label or "enhance"
    settings = job.settings
    enhancer = settings.get("enhancer", ENHANCER)
    if enhancer != ENHANCER:
        raise BadInputError(f"{where}: the enhance stage runs GFPGAN only, but video.enhancer is {enhancer!r}")
    video = job.inputs.get("video")
    if video is None or not Path(video).is_file():
        raise BadInputError(f"{where}: input video {video} does not exist", "re-render the animation step")
    root = Path(job.checkpoints)
    absent = checkpoints_missing(root)
    if absent:
        raise MissingWeightsError(
            f"{where}: GFPGAN weights missing in {root}: {', '.join(absent)}",
            "run `make checkpoints` (or `python -m renderer.checkpoints --only gfpgan`), or set video.enhancer: none",
        )
    dtype = resolve_dtype(str(settings.get("dtype", "auto")), job.device)
    model = pool.get(
        MODEL_ID, job.device, dtype, lambda: GFPGANEnhancer.from_pretrained(root, device=job.device, dtype=dtype)
    )
    try:
        result = model(Path(video), Path(job.out_dir) / "video.mp4", batch_size=int(settings.get("batch_size", 8)))
    except RenderError:
        raise
    except (RuntimeError, ValueError) as exc:
        if "out of memory" in str(exc).lower():
            raise BackendError(
                f"{where}: GFPGAN ran out of memory on {job.device}", "lower video.batch_size or use --device cpu"
            ) from exc
        raise
    warnings = []
    if result.frames and result.frames_without_face == result.frames:
        warnings.append("no face found in any frame: the video is unchanged")
    elif result.frames_without_face:
        warnings.append(f"no face found in {result.frames_without_face} of {result.frames} frames (left unchanged)")
    return {
        "enhancer": ENHANCER,
        "frames": result.frames,
        "faces": result.faces,
        "frames_without_face": result.frames_without_face,
        "frames_reusing_landmarks": result.frames_reusing_landmarks,
        "size": [result.width, result.height],
        "dtype": dtype,
        "warnings": warnings,
    }


def run(
    jobs: Sequence[StepJob], pool: ModelPool, done: Callable[[int, Any], None] | None = None
) -> list[dict | RenderError]:
    """Stage "enhance": one result per job, in order; a job's failure (a video FFmpeg cannot read, a full disk)
    does not stop the others. `done`: told as each video is finished (the runner commits it at once)."""
    return run_each(jobs, lambda job: _enhance_one(job, pool), done)
