"""The puppet animator on real Piper speech and the bundled demo portraits: what a viewer would notice.

One short sentence is spoken once per module (Piper, noise scales 0) and animated a few times; the checks read
the decoded MP4 and re-detect the face in its frames with dlib.
"""

from __future__ import annotations

import itertools
import json
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from renderer.base import FPS, SAMPLES_PER_FRAME, BadInputError, ModelPool
from renderer.encode import probe, read_frames
from renderer.faces import detect_face, load_image
from renderer.puppet import pipeline as puppet
from renderer.puppet.motion import blink_schedule, make_tracks, read_audio_features, read_phonemes
from renderer.puppet.rig import FaceRig, Pose
from tests._puppet_util import PORTRAITS, animate_job, babble, envelope, read_samples, speak, write_wav

TEXT = "Bob made a map. Hello, how are you?"


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    """One pool for the module: Piper and dlib load once."""
    return ModelPool()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory, pool: ModelPool) -> tuple[Path, Path]:
    return speak(TEXT, tmp_path_factory.mktemp("speech"), pool)


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory: pytest.TempPathFactory, speech: tuple[Path, Path]) -> Path:
    """The first 0.6 s of the speech (15 frames), for the checks that only need a few frames."""
    samples = read_samples(speech[0])[: 15 * SAMPLES_PER_FRAME + 100]
    return write_wav(tmp_path_factory.mktemp("short") / "short.wav", samples)


class Clip(NamedTuple):
    out_dir: Path
    result: dict
    track: dict
    frames: list[np.ndarray]


def _animate(out_dir: Path, pool: ModelPool, audio: Path, **kwargs) -> Clip:
    (result,) = puppet.run([animate_job(out_dir, audio, **kwargs)], pool)
    assert isinstance(result, dict), result
    track = json.loads((out_dir / "track.json").read_text())
    return Clip(out_dir, result, track, list(read_frames(out_dir / "video.mp4")))


@pytest.fixture(scope="module")
def talking(tmp_path_factory: pytest.TempPathFactory, pool: ModelPool, speech: tuple[Path, Path]) -> Clip:
    """The astronaut saying TEXT, 256 px crop, with phoneme timings."""
    return _animate(tmp_path_factory.mktemp("talking"), pool, speech[0], phonemes=speech[1])


@pytest.fixture(scope="module")
def seen_gaps(talking: Clip, pool: ModelPool) -> np.ndarray:
    """What a viewer sees: dlib's inner-lip gap (in mouth widths) re-detected in every rendered frame."""
    gaps = []
    for frame in talking.frames:
        lm = detect_face(frame, "frame", pool).landmarks
        gaps.append((lm[66, 1] - lm[62, 1]) / np.hypot(*(lm[54] - lm[48])))
    return np.array(gaps)


def test_run_frame_count_is_floor_samples_over_640(talking: Clip, speech: tuple[Path, Path]) -> None:
    _, result, track, frames = talking
    expected = len(read_samples(speech[0])) // SAMPLES_PER_FRAME
    info = probe(talking.out_dir / "video.mp4")
    assert result["frames"] == track["frames"] == len(frames) == expected == info.frames
    assert (info.width, info.height, info.fps, info.audio_codec) == (256, 256, FPS, None)
    assert result["renderer"] == "puppet" and result["mouth_shapes"] == "phonemes"


def test_run_frames_change_and_are_never_black(talking: Clip) -> None:
    frames = talking.frames
    stack = np.stack(frames).astype(np.float32)
    assert np.isfinite(stack).all()
    assert (stack.reshape(len(frames), -1).mean(axis=1) > 40).all()
    assert (stack.reshape(len(frames), -1).std(axis=1) > 20).all()
    changes = np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3))
    assert (changes > 0.05).mean() > 0.8  # the face moves almost every frame


def test_run_mouth_opening_follows_the_audio_envelope(
    talking: Clip, speech: tuple[Path, Path], seen_gaps: np.ndarray
) -> None:
    track = talking.track
    rms = envelope(speech[0])
    opening = np.array(track["mouth_open"])
    assert np.corrcoef(opening, rms)[0, 1] >= 0.5
    assert np.corrcoef(np.array(track["lip_gap_px"]), rms)[0, 1] >= 0.5
    # What a viewer sees: dlib's inner-lip gap in the rendered frames rises and falls with the speech.
    assert np.corrcoef(seen_gaps, rms)[0, 1] >= 0.5
    assert seen_gaps.max() > 0.2  # the mouth really opens (a fifth of its width)
    # No lag: the mouth is best aligned with the sound at a shift of at most one frame.
    shifts = range(-3, 4)
    scores = [np.corrcoef(np.roll(opening, -s)[3:-3], rms[3:-3])[0, 1] for s in shifts]
    assert abs(list(shifts)[int(np.argmax(scores))]) <= 1


def test_run_closed_lip_phonemes_close_the_mouth(
    talking: Clip, speech: tuple[Path, Path], seen_gaps: np.ndarray
) -> None:
    track, frames = talking.track, talking.frames
    phonemes = json.loads(speech[1].read_text())
    closures = [p for p in phonemes if p["phoneme"] in ("m", "b", "p")]
    assert len(closures) >= 4  # Bob, made, map
    opening = np.array(track["mouth_open"])
    for p in closures:
        frame = min(int((p["start"] + p["end"]) / 2 * FPS), len(frames) - 1)
        assert opening[frame] == 0.0, p
        assert track["lip_gap_px"][frame] < 1.5, p
        assert seen_gaps[frame] < 0.25 * seen_gaps.max(), p


def test_run_is_deterministic(talking: Clip, tmp_path: Path, pool: ModelPool, speech: tuple[Path, Path]) -> None:
    track, frames = talking.track, talking.frames
    _, _, again, frames_again = _animate(tmp_path / "again", pool, speech[0], phonemes=speech[1])
    assert again == track
    assert all(np.array_equal(a, b) for a, b in zip(frames, frames_again, strict=True))


def test_run_still_keeps_the_head_in_place(
    talking: Clip, tmp_path: Path, pool: ModelPool, speech: tuple[Path, Path]
) -> None:
    moving_track, moving = talking.track, talking.frames
    _, _, track, frames = _animate(tmp_path / "still", pool, speech[0], phonemes=speech[1], still=True)
    assert not any(any(track["head"][axis]) for axis in ("yaw", "pitch", "roll"))
    assert any(abs(v) > 0.3 for v in moving_track["head"]["yaw"])

    # The hair and forehead (top third) stay put when still; they sway with the head otherwise.
    def drift(clip: list[np.ndarray]) -> float:
        top = np.stack(clip)[:, : 256 // 3].astype(np.float32)
        return float(np.abs(top - top[0]).mean(axis=(1, 2, 3)).max())

    assert drift(frames) < 1.0
    assert drift(moving) > 2 * drift(frames) + 0.5
    assert track["mouth_open"] == moving_track["mouth_open"]  # still changes the head only


def test_run_without_phonemes_uses_the_spectrum(tmp_path: Path, pool: ModelPool, speech: tuple[Path, Path]) -> None:
    _, result, track, frames = _animate(tmp_path / "spectrum", pool, speech[0])
    assert result["mouth_shapes"] == track["shape_source"] == "spectrum"
    assert np.corrcoef(np.array(track["mouth_open"]), envelope(speech[0]))[0, 1] >= 0.5
    assert len(frames) == result["frames"]


def test_make_tracks_envelope_path_opens_like_the_phoneme_path(pool: ModelPool, tmp_path: Path) -> None:
    """Without timings (a recording) the mouth does not gape: on the same Piper sentence both paths give similar
    openness statistics, and the envelope path still closes between words."""
    wav, phonemes = speak("Hello, I am Eileen. Today we will show you how our videos are made.", tmp_path, pool)
    features = read_audio_features(wav)
    by_phonemes = make_tracks(features, read_phonemes(phonemes), seed=1).mouth_open
    by_envelope = make_tracks(features, [], seed=1).mouth_open
    assert by_envelope.mean() == pytest.approx(by_phonemes.mean(), abs=0.05)
    assert np.percentile(by_envelope, 90) == pytest.approx(np.percentile(by_phonemes, 90), abs=0.1)
    assert np.mean(by_envelope < 0.1) == pytest.approx(np.mean(by_phonemes < 0.1), abs=0.06)
    assert np.corrcoef(by_envelope, by_phonemes)[0, 1] > 0.85
    # Between syllables: many local minima well below their neighbouring peaks.
    dips = [i for i in range(3, len(by_envelope) - 3) if by_envelope[i] == by_envelope[i - 3 : i + 4].min()]
    deep = [i for i in dips if by_envelope[i] < 0.6 * by_envelope[i - 3 : i + 4].max()]
    assert len(deep) >= 8


def test_run_full_mode_keeps_the_picture_size(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    original = load_image(PORTRAITS / "astronaut.jpg")[20:353, 40:441]  # 401 × 333: odd on both sides
    portrait = tmp_path / "odd.png"
    Image.fromarray(original).save(portrait)
    _, result, track, frames = _animate(tmp_path / "full", pool, short_wav, portrait=portrait, preprocess="full")
    assert result["size"] == track["size"] == [400, 332]
    assert all(f.shape == (332, 400, 3) for f in frames)
    # Outside the face's square the picture is the original (up to H.264 noise); inside it the face moves.
    left, top, side, _ = track["face_box"]
    outside = np.ones((332, 400), bool)
    outside[top : top + side, left : left + side] = False
    diff = np.abs(np.stack(frames).astype(np.float32) - original[:332, :400].astype(np.float32)).mean(axis=3)
    assert outside.any() and diff[:, outside].mean() < 3.0
    # No seam: along the square's edge the frame differs from the original no more than elsewhere outside.
    ring = np.zeros_like(outside)
    ring[max(top - 2, 0) : top + side + 2, max(left - 2, 0) : left + side + 2] = True
    ring[top + 2 : top + side - 2, left + 2 : left + side - 2] = False
    assert diff[:, ring].mean() < 4.0


def test_run_ext_modes_frame_a_wider_square(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    """`extcrop` animates a wider square around the face than `crop` (SadTalker's bordered crop); `extfull` pastes
    that wider square back into the whole picture."""
    portrait = PORTRAITS / "astronaut.jpg"
    _, _, crop, _ = _animate(tmp_path / "crop", pool, short_wav, portrait=portrait)
    _, result, ext, frames = _animate(tmp_path / "extcrop", pool, short_wav, portrait=portrait, preprocess="extcrop")
    assert result["size"] == [256, 256] and frames[0].shape == (256, 256, 3)
    assert ext["face_box"][2] > 1.3 * crop["face_box"][2], (ext["face_box"], crop["face_box"])
    assert detect_face(frames[0], "extcrop frame", pool).score > 0.5
    _, result, full, frames = _animate(tmp_path / "extfull", pool, short_wav, portrait=portrait, preprocess="extfull")
    height, width = load_image(portrait).shape[:2]
    assert result["size"] == [width - width % 2, height - height % 2] and full["face_box"] == ext["face_box"]


def test_run_resize_mode_and_size_512(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    _, result, _, frames = _animate(
        tmp_path / "resize", pool, short_wav, portrait=PORTRAITS / "grace_hopper.jpg", preprocess="resize", size=512
    )
    assert result["size"] == [512, 512] and frames[0].shape == (512, 512, 3)
    assert detect_face(frames[-1], "resized frame", pool).score > 0.5


def test_run_no_face_names_the_portrait(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    from skimage import data

    portrait = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(portrait)
    good = animate_job(tmp_path / "good", short_wav, label="videos[1]")
    bad = animate_job(tmp_path / "bad", short_wav, portrait=portrait, label="videos[0]")
    error, ok = puppet.run([bad, good], pool)
    assert isinstance(error, BadInputError) and "coffee.png" in str(error) and "videos[0]" in str(error)
    assert isinstance(ok, dict) and (tmp_path / "good" / "video.mp4").exists()  # the other job went on
    assert not (tmp_path / "bad" / "video.mp4").exists()


def test_run_two_faces_in_the_portrait_is_a_reported_warning(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    from skimage import data

    face = data.astronaut()[40:220, 130:310]
    portrait = tmp_path / "twins.png"
    Image.fromarray(np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1))).save(portrait)
    (result,) = puppet.run([animate_job(tmp_path / "out", short_wav, portrait=portrait)], pool)
    assert isinstance(result, dict), result
    assert any(w.startswith("2 faces in the portrait") for w in result["warnings"]), result["warnings"]


def test_run_unreadable_inputs_are_bad_input(tmp_path: Path, pool: ModelPool, short_wav: Path) -> None:
    broken_image = tmp_path / "broken.jpg"
    broken_image.write_bytes(b"\xff\xd8\xff not a jpeg")
    corrupt_wav = tmp_path / "corrupt.wav"
    corrupt_wav.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    eight_khz = tmp_path / "8k.wav"
    with wave.open(str(eight_khz), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * 8000)
    jobs = [
        animate_job(tmp_path / "a", short_wav, portrait=broken_image),
        animate_job(tmp_path / "b", corrupt_wav),
        animate_job(tmp_path / "c", eight_khz),
        animate_job(tmp_path / "d", short_wav, size=300),
    ]
    results = puppet.run(jobs, pool)
    assert all(isinstance(r, BadInputError) for r in results), results
    assert "broken.jpg" in str(results[0]) and "corrupt.wav" in str(results[1]) and "8000 Hz" in str(results[2])
    assert "video.size" in str(results[3])


def test_blink_schedule_blinks_every_two_to_six_seconds() -> None:
    frames = 60 * FPS
    closure, starts = blink_schedule(frames, np.random.default_rng(5))
    assert starts and starts[0] < 3 * FPS  # the first blink comes early
    gaps = np.diff(starts) / FPS
    singles = gaps[gaps > 0.5]  # double blinks are a few frames apart
    assert singles.min() >= 2.0 and singles.max() <= 6.0
    assert closure.max() == 1.0 and (closure > 0.5).mean() < 0.1  # eyes are open most of the time
    again, same = blink_schedule(frames, np.random.default_rng(5))
    assert same == starts and np.array_equal(again, closure)
    _, other = blink_schedule(frames, np.random.default_rng(6))
    assert other != starts


def test_make_tracks_blinks_within_six_seconds_of_long_audio(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "babble.wav", babble(8.0))
    tracks = make_tracks(read_audio_features(wav), [], seed=3)
    assert tracks.blink_starts and tracks.blink_starts[0] < 6 * FPS
    assert tracks.blink[tracks.blink_starts[0] + 2] >= 0.9


def _eye_aspect_ratio(frame: np.ndarray, pool: ModelPool) -> float:
    """Both eyes' EAR (lid distances over the eye's width) from dlib's landmarks re-detected on a rendered frame."""
    p = detect_face(frame, "frame", pool).landmarks

    def ear(e: list[int]) -> float:
        d = [np.hypot(*(p[a] - p[b])) for a, b in ((e[1], e[5]), (e[2], e[4]), (e[0], e[3]))]
        return (d[0] + d[1]) / (2 * d[2])

    return (ear([36, 37, 38, 39, 40, 41]) + ear([42, 43, 44, 45, 46, 47])) / 2


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("name", ["astronaut.jpg", "grace_hopper.jpg"])
def test_rig_blink_closes_the_eyes(name: str, size: int, pool: ModelPool) -> None:
    """A full blink hides the iris under a lid dlib sees as shut, at both sizes and behind Grace Hopper's glasses;
    nothing outside the eyes changes (the glasses' rims neither bend nor get painted over)."""
    image = load_image(PORTRAITS / name)
    framing = puppet.frame_face(image, detect_face(image, name, pool).landmarks, size, "crop")
    rig = FaceRig(framing.image, framing.landmarks)
    opened, _ = rig.render(Pose())
    closed, _ = rig.render(Pose(blink=1.0))
    lm = framing.landmarks
    for eye in (lm[36:42], lm[42:48]):
        # The dark iris at the eye's centre is covered by skin.
        cx, cy = np.round(eye.mean(axis=0)).astype(int)
        r = max(1, size // 256)
        centre = (slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1))
        assert closed[centre].mean() > opened[centre].mean() + 25
    if name == "astronaut.jpg":  # dlib agrees the lids closed (behind glasses its eye points cling to the rims)
        assert _eye_aspect_ratio(closed, pool) < 0.5 * _eye_aspect_ratio(opened, pool)
    # Only the eyes changed: outside the boxes from each lid strip to the lower lid nothing moved.
    changed = np.abs(closed.astype(int) - opened.astype(int)).max(axis=2) > 0
    allowed = np.zeros_like(changed)
    for eye in (lm[36:42], lm[42:48]):
        (x0, y0), (x1, y1) = eye.min(axis=0), eye.max(axis=0)
        lid = 0.3 * (x1 - x0) + 2
        allowed[int(y0 - lid) : int(y1 + 3), int(x0 - 2) : int(x1 + 3)] = True
    assert changed.any() and not (changed & ~allowed).any()


def test_rig_eyes_at_rest_are_the_portraits_own(pool: ModelPool) -> None:
    """No half-closed eyes: below a blink's first frame nothing is drawn over the eyes."""
    image = load_image(PORTRAITS / "grace_hopper.jpg")
    framing = puppet.frame_face(image, detect_face(image, "grace", pool).landmarks, 256, "crop")
    rig = FaceRig(framing.image, framing.landmarks)
    lm = framing.landmarks
    (x0, y0), (x1, y1) = lm[36:48].min(axis=0).astype(int) - 6, lm[36:48].max(axis=0).astype(int) + 6
    for blink in (0.0, 0.02):
        assert np.array_equal(rig.render(Pose(blink=blink))[0][y0:y1, x0:x1], framing.image[y0:y1, x0:x1])


def test_rig_expression_scale_sets_the_mouth_amplitude(pool: ModelPool) -> None:
    image = load_image(PORTRAITS / "astronaut.jpg")
    face = detect_face(image, "astronaut.jpg", pool)
    framing = puppet.frame_face(image, face.landmarks, 256, "crop")
    gaps = []
    for scale in (0.0, 1.0, 1.5):
        points = FaceRig(framing.image, framing.landmarks, expression_scale=scale).deform(Pose(mouth_open=0.7))
        gaps.append(points[66, 1] - points[62, 1])
    assert gaps[0] < 1.0 < gaps[1] < gaps[2]


def test_rig_extreme_poses_never_fold_the_mesh(pool: ModelPool) -> None:
    image = load_image(PORTRAITS / "astronaut.jpg")
    framing = puppet.frame_face(image, detect_face(image, "astronaut.jpg", pool).landmarks, 256, "crop")
    rig = FaceRig(framing.image, framing.landmarks, expression_scale=3.0)

    def areas(points: np.ndarray) -> np.ndarray:
        a, b, c = (points[rig.simplices[:, k]] for k in range(3))
        return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])

    rest = np.sign(areas(rig.rest))
    for mouth_open, width, blink, angle in itertools.product((0.0, 1.0), (-1.0, 1.0), (0.0, 1.0), (-4.0, 4.0)):
        pose = Pose(mouth_open, width, blink, yaw=angle, pitch=angle, roll=-angle / 1.5)
        assert (areas(rig.deform(pose)) * rest >= -1e-6).all(), pose  # a folded triangle would mirror the picture


def test_puppet_opencv_threads_come_back_when_the_last_overlapping_job_ends() -> None:
    """Two puppet jobs (--jobs 2) draw with OpenCV on one thread each; the first to finish leaves the other at one
    thread, and the last one puts the process's own count back."""
    import cv2

    own = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        first, second = puppet._opencv_threads(1), puppet._opencv_threads(1)
        first.__enter__()
        second.__enter__()
        assert cv2.getNumThreads() == 1
        first.__exit__(None, None, None)
        assert cv2.getNumThreads() == 1  # the second job still draws
        second.__exit__(None, None, None)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(own)
