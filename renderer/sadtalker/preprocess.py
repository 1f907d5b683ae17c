"""Source-image preprocessing for SadTalker (SPEC §3): face crop for the renderer, 224×224 alignment for the 3DMM net.

Geometry and resampling follow upstream exactly (FFHQ-style quad from eyes and mouth corners, OpenCV bilinear with
its fixed-point rounding, PIL bicubic for the alignment), so a given set of 68 landmarks gives the same pixels.

Where the landmarks come from differs from upstream, on purpose. Upstream finds the face with RetinaFace-ResNet50
(threshold 0.97, highest score; fed RGB as if it were BGR) and places 98 WFLW points with the FAN "AWing" network,
mapped to the iBUG-68 layout; it then detects landmarks a second time on the S×S crop for the 3DMM alignment. This
project uses `renderer.faces.detect_face` (dlib HOG detector + dlib's 68-point shape predictor, the same iBUG-68
layout) once, on the full image, and `crop_face` maps those landmarks into the crop (`landmarks_in_crop`) instead
of detecting again. Consequences: the crop uses only the eye points 36–47 and the mouth corners 48/54, and the
alignment only eye centres, nose tip 30 and mouth corners, so dlib-vs-FAN placement differences (a few pixels,
largest on the jaw and brows, which are unused) move the framing slightly; dlib misses some small, rotated or profile
faces that RetinaFace finds (a clear BadInputError then). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

#: Side of the FFHQ-style quad the crop geometry is computed for (independent of the render size).
CROP_OUTPUT_SIZE = 512
#: Side of the 3DMM regressor's input and the scale target of the 5-point fit (Deep3DFaceRecon constants).
RECON_SIZE = 224
RECON_RESCALE = 102.0
#: Preprocess modes: tight face quad (crop, full), whole bordered crop box (extcrop, extfull), whole image (resize).
PREPROCESS_MODES = ("crop", "extcrop", "resize", "full", "extfull")

_DATA = Path(__file__).resolve().parent / "data"
# Rows of the 68 iBUG landmarks that make the 5 alignment points: eye centres (pairs), nose tip, mouth corners.
_LEFT_EYE, _RIGHT_EYE, _NOSE, _MOUTH_LEFT, _MOUTH_RIGHT = (36, 39), (42, 45), 30, 48, 54
# OpenCV fixed-point bilinear: coefficients carry 11 fraction bits.
_COEF_SCALE = 2048


# ----------------------------------------------------------------------------------------------------------------
# Resampling


def _bilinear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and 11-bit weights of OpenCV's INTER_LINEAR along one axis (horizontal taps are clamped)."""
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp:
        low, high = first < 0, first >= src - 1
        frac[low | high] = 0.0
        first[low] = 0
        first[high] = src - 1
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image (H, W[, C]) to `size` = (width, height) bit-exactly like OpenCV's INTER_LINEAR.

    Upstream resizes every frame and crop with `cv2.resize`; reproducing its fixed-point arithmetic keeps the render
    source identical without depending on OpenCV.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"resize_bilinear expects uint8, got {image.dtype}")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {size}")
    squeeze = image.ndim == 2
    src = image[:, :, None] if squeeze else image
    rows_in, cols_in = src.shape[:2]
    if (cols_in, rows_in) == (width, height):
        return image.copy()
    x0, x1, ax0, ax1 = _bilinear_taps(cols_in, width, clamp=True)
    y0, y1, by0, by1 = _bilinear_taps(rows_in, height, clamp=False)
    pixels = src.astype(np.int32)
    rows = pixels[:, x0] * ax0[None, :, None] + pixels[:, x1] * ax1[None, :, None]
    # OpenCV's vector path: (((r0 >> 4) * b0) >> 16) + (((r1 >> 4) * b1) >> 16), rounded shift by 2.
    top = ((rows[y0] >> 4) * by0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * by1[:, None, None]) >> 16
    out = np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------------------
# Crop (SPEC §3.3)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """Result of the FFHQ-style quad computation on one image."""

    #: Image size after the optional shrink of very large faces (width, height).
    resized_size: tuple[int, int]
    #: Bordered crop box (left, top, right, bottom) in the resized image.
    crop_box: tuple[int, int, int, int]
    #: Face quad (lx, ly, rx, ry) inside the crop box, floats (the `ry` is clamped by the width: upstream quirk).
    quad: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class CropInfo:
    """Where the render source came from, for restoring the aspect ratio and pasting frames back (SPEC §8)."""

    #: upstream's crop_info[0]: (width, height) of the face quad, or of the whole image in `resize` mode.
    size: tuple[int, int]
    #: Size of the original image (width, height).
    image_size: tuple[int, int]
    #: Size the image was resized to before cropping (equal to image_size unless the face is huge).
    resized_size: tuple[int, int]
    #: Bordered crop box and face quad in the resized image; None in `resize` mode.
    crop_box: tuple[int, int, int, int] | None = None
    quad: tuple[float, float, float, float] | None = None
    #: The preprocess mode that produced the crop.
    preprocess: str = "crop"

    @property
    def face_box(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) of the face quad in the resized image, as upstream computes it (may pass the border)."""
        if self.crop_box is None or self.quad is None:
            return (0, 0, self.resized_size[0], self.resized_size[1])
        clx, cly = self.crop_box[:2]
        lx, ly, rx, ry = (int(v) for v in self.quad)
        return (clx + lx, cly + ly, clx + rx, cly + ry)

    @property
    def paste_box(self) -> tuple[int, int, int, int]:
        """Where rendered frames go back (`full`: face quad, `extfull`: crop box), in original-image pixels, clipped.

        Upstream pastes with resized-image coordinates, which is only right when no shrink happened; this scales.
        """
        sx = self.image_size[0] / self.resized_size[0]
        sy = self.image_size[1] / self.resized_size[1]
        x1, y1, x2, y2 = self.crop_box if self.preprocess.startswith("ext") and self.crop_box else self.face_box
        width, height = self.image_size
        return (
            min(max(round(x1 * sx), 0), width),
            min(max(round(y1 * sy), 0), height),
            min(max(round(x2 * sx), 0), width),
            min(max(round(y2 * sy), 0), height),
        )


@dataclasses.dataclass(frozen=True)
class CropResult:
    """The render source and how it maps back to the original image."""

    #: S×S×3 uint8 RGB render source.
    crop: np.ndarray
    crop_info: CropInfo
    #: The 68 landmarks mapped into `crop` pixels (x, y), float64.
    landmarks_in_crop: np.ndarray


def _as_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks of shape (68, 2), got {lm.shape}")
    return lm if lm.dtype.kind == "f" else lm.astype(np.float64)


def crop_geometry(landmarks: np.ndarray, width: int, height: int, output_size: int = CROP_OUTPUT_SIZE) -> CropGeometry:
    """Face quad and bordered crop box from 68 landmarks on a width × height image (SPEC §3.3, upstream numerics)."""
    lm = _as_landmarks(landmarks)
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1, 1])
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1, 1])
    center = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([center - x - y, center - x + y, center + x + y, center + x - y])
    qsize = np.hypot(*x) * 2
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        resized = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
        quad /= shrink
        qsize /= shrink
    else:
        resized = (int(width), int(height))
    border = max(int(np.rint(qsize * 0.1)), 3)
    box = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    box = (
        max(box[0] - border, 0),
        max(box[1] - border, 0),
        min(box[2] + border, resized[0]),
        min(box[3] + border, resized[1]),
    )
    if box[2] - box[0] < resized[0] or box[3] - box[1] < resized[1]:
        quad -= box[0:2]
    q = (quad + 0.5).flatten()
    lx = max(min(q[0], q[2]), 0)
    ly = max(min(q[1], q[7]), 0)
    rx = min(max(q[4], q[6]), resized[0])
    ry = min(max(q[3], q[5]), resized[0])  # upstream clamps the bottom with the width; kept for identical crops
    return CropGeometry(resized, box, (float(lx), float(ly), float(rx), float(ry)))


def cut_face(image: np.ndarray, geometry: CropGeometry, preprocess: str = "crop") -> tuple[np.ndarray, CropInfo]:
    """Apply `geometry` to an image: resize (if shrunk), take the crop box, then the face quad (not in ext* modes).
    `resize` mode cuts nothing (the whole image is the face): `crop_face` handles it, this refuses it."""
    if preprocess not in PREPROCESS_MODES or preprocess == "resize":
        raise ValueError(f"cut_face applies crop, extcrop, full or extfull, not {preprocess!r}")
    height, width = image.shape[:2]
    resized = resize_bilinear(image, geometry.resized_size)
    clx, cly, crx, cry = geometry.crop_box
    lx, ly, rx, ry = (int(v) for v in geometry.quad)
    face = resized[cly:cry, clx:crx]
    if not preprocess.startswith("ext"):
        face = face[ly:ry, lx:rx]
    info = CropInfo(
        preprocess=preprocess,
        size=(clx + rx - (clx + lx), cly + ry - (cly + ly)),
        image_size=(width, height),
        resized_size=geometry.resized_size,
        crop_box=geometry.crop_box,
        quad=geometry.quad,
    )
    return face, info


def _map_resize(points: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates through a resize from src (w, h) to dst (w, h), pixel centres aligned (as OpenCV)."""
    scale = np.array([dst[0] / src[0], dst[1] / src[1]])
    return (points + 0.5) * scale - 0.5


def crop_face(image_rgb: np.ndarray, landmarks68: np.ndarray, preprocess: str, size: int) -> CropResult:
    """Make the size×size render source from a full RGB image and its 68 landmarks (SPEC §3.3).

    `crop` and `full` take the tight face quad (they differ later: 73-input mapping net and paste-back in `full`),
    `extcrop` and `extfull` the whole bordered crop box; `resize` squeezes the whole image to size×size.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    lm = _as_landmarks(landmarks68).astype(np.float64)
    height, width = image.shape[:2]
    if preprocess == "resize":
        face = image
        info = CropInfo(
            size=(width, height), image_size=(width, height), resized_size=(width, height), preprocess=preprocess
        )
        lm_face = lm
    else:
        geometry = crop_geometry(landmarks68, width, height)
        face, info = cut_face(image, geometry, preprocess)
        origin = geometry.crop_box[:2] if preprocess.startswith("ext") else info.face_box[:2]
        lm_face = _map_resize(lm, (width, height), geometry.resized_size) - np.array(origin, dtype=np.float64)
    if face.shape[0] < 2 or face.shape[1] < 2:
        raise ValueError(f"face crop is empty ({face.shape[1]}×{face.shape[0]} px): the landmarks are off the image")
    crop = resize_bilinear(face, (size, size))
    lm_crop = _map_resize(lm_face, (face.shape[1], face.shape[0]), (size, size))
    return CropResult(crop=crop, crop_info=info, landmarks_in_crop=lm_crop)


# ----------------------------------------------------------------------------------------------------------------
# Alignment for the 3DMM regressor (SPEC §3.5)


@functools.lru_cache(maxsize=1)
def standard_landmarks_3d() -> np.ndarray:
    """The 68 standard 3-D landmark positions (float32, 68×3, read-only) shipped in the package data."""
    values = json.loads((_DATA / "lm3d_std.json").read_text())["lm68_xyz"]
    lm = np.array(values, dtype=np.float32)
    lm.setflags(write=False)
    return lm


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """68 → 5 points: left-eye centre, right-eye centre, nose tip, left and right mouth corner (input dtype kept)."""
    lm = np.asarray(landmarks)
    return np.stack(
        [
            np.mean(lm[list(_LEFT_EYE)], axis=0),
            np.mean(lm[list(_RIGHT_EYE)], axis=0),
            lm[_NOSE],
            lm[_MOUTH_LEFT],
            lm[_MOUTH_RIGHT],
        ]
    )


def standard_five_points() -> np.ndarray:
    """The 5 alignment points of the standard 3-D face (float32, 5×3)."""
    return five_points(standard_landmarks_3d())


def fit_scale_translation(points_2d: np.ndarray, points_3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine camera from 5 3-D points to 5 image points ("POS"): returns (t = (tx, ty), scale)."""
    count = points_2d.shape[0]
    system = np.zeros((2 * count, 8))
    system[0::2, 0:3] = points_3d
    system[0::2, 3] = 1
    system[1::2, 4:7] = points_3d
    system[1::2, 7] = 1
    target = np.reshape(points_2d, (2 * count, 1))
    k, _, _, _ = np.linalg.lstsq(system, target, rcond=None)
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3, 0], k[7, 0]]), float(scale)


def alignment_points(crop: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """The 5 image points the alignment is fitted to, in a y-up frame (float32, 5×2).

    No landmarks (None, or all −1 as upstream marks a missing face): the standard face placed in the frame.
    """
    height, width = crop.shape[:2]
    if landmarks is None or np.all(np.asarray(landmarks) == -1):
        std = (standard_five_points()[:, :2] + 1) / 2.0
        return np.concatenate([std[:, :1] * width, std[:, 1:2] * height], axis=1)
    lm = np.array(landmarks, dtype=np.float32).reshape(-1, 2)
    lm[:, 1] = height - 1 - lm[:, 1]
    return five_points(lm)


def align_for_recon(crop: np.ndarray, landmarks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and crop the face to the 224×224 regressor input (SPEC §3.5).

    Returns (aligned (224, 224, 3) uint8 RGB, trans_params float64 (W, H, s, tx, ty)); out-of-image area is black.
    """
    from PIL import Image

    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 crop, got {crop.dtype} {crop.shape}")
    height, width = crop.shape[:2]
    t, s_pos = fit_scale_translation(alignment_points(crop, landmarks), standard_five_points())
    s = RECON_RESCALE / s_pos
    new_w, new_h = int(width * s), int(height * s)
    left = int(new_w / 2 - RECON_SIZE / 2 + float((t[0] - width / 2) * s))
    up = int(new_h / 2 - RECON_SIZE / 2 + float((height / 2 - t[1]) * s))
    resized = Image.fromarray(crop).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    aligned = np.asarray(resized.crop((left, up, left + RECON_SIZE, up + RECON_SIZE)).convert("RGB"))
    trans_params = np.array([width, height, s, t[0], t[1]], dtype=np.float64)
    return np.ascontiguousarray(aligned), trans_params
