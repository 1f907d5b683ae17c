"""Face box and 68 landmarks with dlib, shared by the puppet animator and the SadTalker helper.

dlib and the landmark model load lazily (through the model pool when one is given), so importing this module is
cheap. The landmark file ships in the `face_recognition_models` package; it is located without importing that
package, whose `__init__` needs `pkg_resources` (gone from current setuptools).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from renderer.base import BadInputError, MissingWeightsError, ModelPool

logger = logging.getLogger(__name__)

#: Model id under which the pool keeps dlib's detector and shape predictor (with the lock that guards them).
DLIB_ID = "dlib-frontal-face+shape-68"
#: dlib upsamples the image once before detecting, so faces down to ~40 px are found; small pictures get a
#: second try at twice that.
UPSAMPLE = 1
_SMALL_SIDE = 640
#: Bigger pictures are searched at this size (the landmarks are still fitted at full resolution): detection
#: time and memory grow with the pixel count, and a portrait's face is never tiny.
_DETECT_SIDE = 1280
_LANDMARK_FILE = "shape_predictor_68_face_landmarks.dat"
#: Faces remembered per model pool (the oldest is dropped first).
_FOUND_MAX = 256
_NO_FACE_HINT = "use a portrait with one clear, frontal, well-lit face (at least ~40 px wide)"


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face: box (left, top, right, bottom) in pixels, detector score, iBUG-68 landmarks (x, y)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray
    #: Other faces found with a clear score: the stages report them (`warning`), as only the best one is animated.
    others: int = 0
    #: The detector's scores of those other faces.
    other_scores: tuple[float, ...] = ()

    @property
    def warning(self) -> str | None:
        if not self.others:
            return None
        return f"{self.others + 1} faces in the portrait: the one with the best detector score was used"


def load_image(path: Path) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3), with EXIF orientation applied and alpha/gray converted."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparent parts on white, as a viewer would show them.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            if im.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
                # 16-bit or float grayscale: scaled to 8 bits (convert("RGB") would clip it to 255, a white page).
                gray = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or gray.max() > 255 else 255.0
                gray = np.clip(np.round(gray / top * 255.0), 0, 255).astype(np.uint8)
                rgb = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInputError(
            f"cannot read image {path}: {exc}", "give a PNG or JPEG portrait that opens in an image viewer"
        ) from exc
    if rgb.ndim != 3 or rgb.size == 0:
        raise BadInputError(f"image {path} is empty", "give a PNG or JPEG portrait")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise BadInputError(
            f"image {path} is only {rgb.shape[1]}x{rgb.shape[0]} pixels: too small to hold a face",
            "give a portrait with the face at least 64 pixels high",
        )
    return np.ascontiguousarray(rgb)


def landmark_model_path() -> Path:
    """Path of dlib's 68-point model inside the installed `face_recognition_models` package (not imported)."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "models" / _LANDMARK_FILE
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        f"dlib landmark model {_LANDMARK_FILE} not found (package face_recognition_models)",
        "install it: pip install face-recognition-models==0.3.0 (or `make setup`)",
    )


@dataclasses.dataclass(frozen=True)
class _Dlib:
    """dlib's detector and landmark predictor, and the lock every use holds: neither is thread-safe (two threads in
    one detector, with --jobs 2, report hundreds of faces with absurd scores, then corrupt the heap)."""

    detector: Any
    predictor: Any
    lock: threading.Lock
    #: Faces already found, by the picture's digest: a character's portrait is searched once per run, not once per
    #: video (85 ms of CPU for a 1024 px portrait, a third of a millisecond per frame of a 10 s clip at 256).
    found: dict[bytes, Face] = dataclasses.field(default_factory=dict)


def _load_dlib() -> _Dlib:
    import dlib

    return _Dlib(dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmark_model_path())), threading.Lock())


def _models(pool: ModelPool | None) -> _Dlib:
    return _load_dlib() if pool is None else pool.get(DLIB_ID, "cpu", "float32", _load_dlib)


def _shrink(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def detect_face(image: np.ndarray, source: str = "", pool: ModelPool | None = None, *, warn: bool = True) -> Face:
    """Find the best-scoring face and its 68 landmarks; several faces → warning (logged unless `warn` is False: the
    caller reports `Face.others` itself), none → BadInputError."""

    where = source or "the image"
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadInputError(f"{where}: expected an RGB uint8 image, got {image.dtype} {image.shape}")
    models = _models(pool)
    image = np.ascontiguousarray(image)
    hasher = hashlib.blake2b(repr(image.shape).encode(), digest_size=16)
    hasher.update(image.data)
    digest = hasher.digest()
    with models.lock:
        face = models.found.get(digest)
        if face is None:
            face = _detect(image, where, models.detector, models.predictor, warn)
            face.landmarks.setflags(write=False)  # shared by every video of this portrait
            if len(models.found) >= _FOUND_MAX:
                models.found.pop(next(iter(models.found)))
            models.found[digest] = face
        return face


def _detect(image: np.ndarray, where: str, detector: Any, predictor: Any, warn: bool = True) -> Face:
    import dlib

    image = np.ascontiguousarray(image)
    height, width = image.shape[:2]
    scale = min(1.0, _DETECT_SIDE / max(height, width))
    search = image if scale == 1.0 else _shrink(image, scale)
    # Upsample once and keep the best score: at upsample 1 dlib also reports weak false positives (notes §5).
    rects, scores, _ = detector.run(search, UPSAMPLE, 0.0)
    if not rects and max(search.shape[:2]) <= _SMALL_SIDE:
        rects, scores, _ = detector.run(search, UPSAMPLE + 1, 0.0)
    if not rects and scale < 1.0:  # a small face in a large photo: look again at full resolution
        scale = 1.0
        rects, scores, _ = detector.run(image, 0, 0.0)
    if not rects:
        raise BadInputError(f"no face found in {where}", _NO_FACE_HINT)
    best = int(np.argmax(scores))
    strong = [s for s in scores if s >= 0.5]
    if len(strong) > 1 and warn:
        logger.warning(
            "%d faces found in %s; animating the one with the best score (%.2f)", len(strong), where, scores[best]
        )
    rect = rects[best]
    left, top, right, bottom = (int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
    shape = predictor(image, dlib.rectangle(left, top, right, bottom))
    landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    box = (max(left, 0), max(top, 0), min(right, width - 1), min(bottom, height - 1))
    others = tuple(float(s) for i, s in enumerate(scores) if s >= 0.5 and i != best)
    return Face(box=box, score=float(scores[best]), landmarks=landmarks, others=len(others), other_scores=others)


#: A generic head's 3D points (millimetres, x right, y up, z towards the camera) at six of the iBUG-68 landmarks:
#: nose tip, chin, the eyes' outer corners, the mouth's corners (the model commonly used with solvePnP).
_HEAD_MODEL = {
    30: (0.0, 0.0, 0.0),
    8: (0.0, -330.0, -65.0),
    36: (-225.0, 170.0, -135.0),
    45: (225.0, 170.0, -135.0),
    48: (-150.0, -150.0, -125.0),
    54: (150.0, -150.0, -125.0),
}


def head_yaw(landmarks: np.ndarray) -> float:
    """How far the head is turned from the camera about the vertical axis, in degrees (0: frontal; the sign says
    which way), from a scaled-orthographic fit of a generic 3D head to six landmarks: the least-squares affine
    camera's first row, normalised, is the rotation's first row (cos yaw, ·, sin yaw). Frontal portraits come out
    within a few degrees; near-profile faces past 35."""
    ids = list(_HEAD_MODEL)
    model = np.array([_HEAD_MODEL[i] for i in ids])
    model[:, 1] *= -1  # image y points down
    points = np.asarray(landmarks, dtype=np.float64)[ids]
    camera, *_ = np.linalg.lstsq(model - model.mean(0), points - points.mean(0), rcond=None)
    row = camera[:, 0] / np.linalg.norm(camera[:, 0])
    return float(np.degrees(np.arctan2(row[2], row[0])))


def survey_portrait(path: Path, pool: ModelPool | None = None) -> dict[str, Any]:
    """What `dhbatch validate` needs to judge a portrait, as plain data (it is cached by the file's digest): the
    picture's size, and the best face's box, detector score and yaw, with the scores of other clear faces; `face`
    is None when there is none. An unreadable picture raises BadInputError."""
    image = load_image(path)
    height, width = image.shape[:2]
    try:
        face = detect_face(image, str(path), pool, warn=False)
    except BadInputError:
        return {"width": width, "height": height, "face": None}
    return {
        "width": width,
        "height": height,
        "face": {
            "box": list(face.box),
            "score": round(face.score, 3),
            "yaw": round(head_yaw(face.landmarks), 1),
            "others": [round(s, 3) for s in face.other_scores],
        },
    }
