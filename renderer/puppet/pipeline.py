"""Stage "animate" with the puppet renderer: a talking head drawn from one portrait without any network weights.

The default animator on machines without SadTalker's checkpoints. It finds the face with dlib, lays a mesh over
it and, frame by frame, opens the mouth with the loudness of the speech (its shape from the phoneme timings when
the voice stage wrote them), blinks every few seconds and sways the head a little while speaking. Frames stream
into the encoder, so memory does not grow with the length of the speech.

Writes out_dir/video.mp4 (silent H.264, 25 fps, floor(samples / 640) frames) and out_dir/track.json (the
animator's own per-frame tracks: mouth opening and width, the drawn lip gap in pixels of the animated square,
blink, head angles in degrees).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from renderer.base import (
    FPS,
    SAMPLES_PER_FRAME,
    BadInputError,
    ModelPool,
    RenderError,
    StepJob,
    atomic_write_bytes,
    run_each,
)
from renderer.checkpoints import SADTALKER_PREPROCESS, SADTALKER_SIZES
from renderer.puppet.motion import Tracks, make_tracks, read_audio_features, read_phonemes

logger = logging.getLogger(__name__)

#: Bump when the video this stage writes changes for the same inputs (the runner folds it into cache keys): the
#: pictures, or how they are encoded (3: x264's settings).
VERSION = 3
SIZES = SADTALKER_SIZES  # the same `video` settings as SadTalker's
PREPROCESS = SADTALKER_PREPROCESS
#: x264's preset for the puppet's frames: 5x faster than "medium" at 256 (2.1 vs 10.8 ms a frame, measured under
#: load) and its files no larger at crf 18 (64 vs 73 KB for 4 s at 256), bench/results/2026-12-07-cpu.
ENCODER_PRESET = "veryfast"
#: ... with the quickest motion search: 0.61 instead of 0.9-1.0 ms of CPU a frame at 256 (2.3 instead of 3.5-3.7 at
#: 512), files 9-22 % larger, Y PSNR within 0.2 dB at crf 18 (`bench/bench_puppet.py --x264`).
ENCODER_PARAMS = "me=dia:subme=1"
#: One thread for OpenCV and x264 while the puppet draws: its frames are small, and on 2 cores their thread pools
#: cost a third more CPU per frame, and at 256 more wall time too (bench/results/2026-12-07-cpu-speed).
THREADS = 1
#: How much wider the `extcrop` / `extfull` square is than the tight one (more hair, neck and background).
EXT_MARGIN = 1.5


@dataclasses.dataclass(frozen=True)
class PuppetSettings:
    """The `video` settings the puppet uses, checked once per job."""

    size: int = 256
    preprocess: str = "crop"
    still: bool = False
    expression_scale: float = 1.0
    pose_style: int = 0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], label: str = "") -> PuppetSettings:
        """Validate the manifest's `video` section (extra keys such as enhancer or dtype are ignored here)."""
        where = f"{label}: " if label else ""
        size = settings.get("size", 256)
        preprocess = settings.get("preprocess", "crop")
        scale = settings.get("expression_scale", 1.0)
        pose_style = settings.get("pose_style", 0)
        if size not in SIZES:
            raise BadInputError(f"{where}video.size must be one of {SIZES}, got {size!r}", "use size: 256 or 512")
        if preprocess not in PREPROCESS:
            raise BadInputError(
                f"{where}video.preprocess must be one of {PREPROCESS}, got {preprocess!r}", "use preprocess: crop"
            )
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise BadInputError(f"{where}video.expression_scale must be a number ≥ 0, got {scale!r}")
        if isinstance(pose_style, bool) or not isinstance(pose_style, int):
            raise BadInputError(f"{where}video.pose_style must be an integer, got {pose_style!r}")
        return cls(int(size), str(preprocess), bool(settings.get("still", False)), float(scale), int(pose_style))


@dataclasses.dataclass(frozen=True)
class Framing:
    """Where the animated square sits in the portrait, and the picture the rig animates."""

    image: np.ndarray  # size × size RGB, what the rig animates
    landmarks: np.ndarray  # (68, 2) in `image` coordinates
    #: The region of the portrait it shows: (left, top, width, height); a square for crop and full.
    box: tuple[int, int, int, int]


def crop_box(landmarks: np.ndarray, width: int, height: int, margin: float = 1.0) -> tuple[int, int, int]:
    """Square around the face like SadTalker's crop (FFHQ alignment size), `margin` times wider, kept inside the
    picture: (left, top, side)."""
    eye_left = landmarks[36:42].mean(axis=0)
    eye_right = landmarks[42:48].mean(axis=0)
    eyes = (eye_left + eye_right) / 2
    mouth = (landmarks[48] + landmarks[54]) / 2
    eye_to_mouth = mouth - eyes
    side = 2.0 * margin * max(2.0 * float(np.hypot(*(eye_right - eye_left))), 1.8 * float(np.hypot(*eye_to_mouth)))
    side = int(round(min(side, width, height)))
    centre = eyes + 0.1 * eye_to_mouth
    left = int(round(np.clip(centre[0] - side / 2, 0, width - side)))
    top = int(round(np.clip(centre[1] - side / 2, 0, height - side)))
    return left, top, side


def frame_face(image: np.ndarray, landmarks: np.ndarray, size: int, preprocess: str) -> Framing:
    """Cut or scale the portrait to the size×size picture the rig animates, moving the landmarks along."""
    from PIL import Image

    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    if preprocess == "resize":
        scaled = np.asarray(picture.resize((size, size), Image.Resampling.LANCZOS))
        return Framing(scaled, landmarks * np.array([size / width, size / height]), (0, 0, width, height))
    left, top, side = crop_box(landmarks, width, height, EXT_MARGIN if preprocess.startswith("ext") else 1.0)
    square = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return Framing(np.asarray(square), (landmarks - np.array([left, top])) * (size / side), (left, top, side, side))


class _Compositor:
    """Blends the animated square back into the whole portrait (preprocess: full, extfull) through a feathered
    mask."""

    def __init__(self, portrait: np.ndarray, framing: Framing, motion: np.ndarray) -> None:
        from PIL import Image

        height, width = portrait.shape[:2]
        self.base = np.ascontiguousarray(portrait[: height - height % 2, : width - width % 2])
        left, top, side, _ = framing.box
        self.left, self.top, self.side = left, top, side
        # Only the crop's part inside the even-sized picture is drawn.
        self.w = min(side, self.base.shape[1] - left)
        self.h = min(side, self.base.shape[0] - top)
        mask = np.asarray(Image.fromarray(motion).resize((side, side), Image.Resampling.BILINEAR), np.float32)
        self.mask = (mask[: self.h, : self.w] / 255.0)[..., None]
        self.original = self.base[top : top + self.h, left : left + self.w].astype(np.float32)

    @property
    def size(self) -> tuple[int, int]:
        return self.base.shape[1], self.base.shape[0]

    def __call__(self, square: np.ndarray) -> np.ndarray:
        from PIL import Image

        up = Image.fromarray(square).resize((self.side, self.side), Image.Resampling.BICUBIC)
        anim = np.asarray(up, np.float32)[: self.h, : self.w]
        frame = self.base.copy()
        blended = self.original + (anim - self.original) * self.mask
        frame[self.top : self.top + self.h, self.left : self.left + self.w] = np.clip(blended + 0.5, 0, 255)
        return frame


def animate(
    portrait: Path,
    audio: Path,
    out_dir: Path,
    *,
    settings: PuppetSettings,
    phonemes: Path | None = None,
    seed: int = 0,
    pool: ModelPool | None = None,
    label: str = "",
) -> dict:
    """Animate one portrait to one speech WAV: writes video.mp4 and track.json in out_dir, returns report info."""
    import cv2
    from tqdm import tqdm

    from renderer.encode import VideoWriter
    from renderer.faces import detect_face, load_image
    from renderer.puppet.rig import FaceRig, Pose

    portrait, audio, out_dir = Path(portrait), Path(audio), Path(out_dir)
    warnings: list[str] = []
    # 1. Inputs: the audio first (cheap, and a corrupt WAV should not cost a face detection).
    features = read_audio_features(audio)
    timings = read_phonemes(phonemes)
    image = load_image(portrait)
    face = detect_face(image, str(portrait), pool)
    if face.warning:
        warnings.append(face.warning)

    # 2. Framing: the square the rig animates, and where it goes in the output.
    framing = frame_face(image, face.landmarks, settings.size, settings.preprocess)
    rig = FaceRig(framing.image, framing.landmarks, expression_scale=settings.expression_scale)
    compose = _Compositor(image, framing, rig.motion_mask()) if settings.preprocess.endswith("full") else None
    width, height = compose.size if compose else (settings.size, settings.size)

    # 3. Tracks for the whole clip (a few numbers per frame).
    tracks = make_tracks(features, timings, seed=seed, pose_style=settings.pose_style, still=settings.still)
    if not tracks.mouth_open.any():
        warnings.append(f"audio {audio} is silent: the mouth stays closed")
    frames = features.samples // SAMPLES_PER_FRAME

    # 4. Draw and stream every frame into the encoder.
    gap = np.zeros(frames)
    progress = tqdm(total=frames, desc=f"puppet {label or portrait.name}", unit="frame", leave=False, disable=None)
    video = VideoWriter(
        out_dir / "video.mp4",
        width,
        height,
        fps=FPS,
        preset=ENCODER_PRESET,
        threads=THREADS,
        x264_params=ENCODER_PARAMS,
    )
    with progress, video as writer, _opencv_threads(THREADS):
        for i in range(frames):
            pose = Pose(
                mouth_open=float(tracks.mouth_open[i]),
                mouth_width=float(tracks.mouth_width[i]),
                blink=float(tracks.blink[i]),
                yaw=float(tracks.yaw[i]),
                pitch=float(tracks.pitch[i]),
                roll=float(tracks.roll[i]),
            )
            square, points = rig.render(pose)
            gap[i] = points[66, 1] - points[62, 1]
            writer.write_i420(cv2.cvtColor(compose(square) if compose else square, cv2.COLOR_RGB2YUV_I420))
            progress.update()
        written = writer.frames_written

    # 5. The animator's own tracks, for plots, tests and the report.
    track = _track_json(tracks, gap, settings, framing, (width, height), face.score)
    atomic_write_bytes(out_dir / "track.json", json.dumps(track, separators=(",", ":")).encode())
    return {
        "renderer": "puppet",
        "frames": written,
        "size": [width, height],
        "preprocess": settings.preprocess,
        "mouth_shapes": tracks.shape_source,
        "blinks": len(tracks.blink_starts),
        "face_score": round(face.score, 3),
        "warnings": warnings,
    }


class _OpenCVThreads:
    """OpenCV's thread count (process-wide) held at `count` while any puppet job draws, and put back when the last
    one ends: with --jobs 2 two jobs overlap, and the first to finish must not restore it under the other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before = 0

    @contextlib.contextmanager
    def __call__(self, count: int) -> Iterator[None]:
        import cv2

        with self._lock:
            if self._users == 0:
                self._before = cv2.getNumThreads()
                cv2.setNumThreads(count)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    cv2.setNumThreads(self._before)


_opencv_threads = _OpenCVThreads()


def _track_json(
    tracks: Tracks,
    gap: np.ndarray,
    settings: PuppetSettings,
    framing: Framing,
    size: tuple[int, int],
    score: float,
) -> dict:
    data = tracks.to_json()
    data["lip_gap_px"] = [round(float(g), 2) for g in gap]
    data["size"] = list(size)
    data["preprocess"] = settings.preprocess
    data["still"] = settings.still
    data["expression_scale"] = settings.expression_scale
    data["face_box"] = list(framing.box)
    data["face_score"] = round(score, 4)
    data["version"] = VERSION
    return data


def run(
    jobs: Sequence[StepJob], pool: ModelPool, done: Callable[[int, Any], None] | None = None
) -> list[dict | RenderError]:
    """Stage "animate" (renderer: puppet): inputs portrait + audio (+ phonemes) → video.mp4, track.json. `done`:
    told as each video is finished (the runner commits it at once)."""

    def one(job: StepJob) -> dict:
        missing = [name for name in ("portrait", "audio") if name not in job.inputs]
        if missing:
            raise BadInputError(f"{job.label}: animate step lacks input(s) {', '.join(missing)}")
        settings = PuppetSettings.from_mapping(job.settings, job.label)
        return animate(
            job.inputs["portrait"],
            job.inputs["audio"],
            job.out_dir,
            settings=settings,
            phonemes=job.inputs.get("phonemes"),
            seed=job.seed,
            pool=pool,
            label=job.label,
        )

    return run_each(jobs, one, done)
