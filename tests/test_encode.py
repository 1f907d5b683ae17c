"""renderer.encode: H.264 writing, muxing with AAC speech, probing, and the "mux" stage."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _audio_util import tone, write_wav

from renderer.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, BadInputError, ModelPool, StepJob
from renderer.encode import VideoWriter, mux, probe, read_frames, run_mux

SIZE = 128


def pattern(index: int, size: int = SIZE) -> np.ndarray:
    """A smooth moving colour gradient (what H.264 compresses well, so PSNR is meaningful)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    phase = index / 10
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + phase))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - phase / 2))
    b = 0.5 + 0.3 * np.sin(2 * np.pi * (x + y))
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def write_video(path: Path, frames: int, size: int = SIZE) -> None:
    with VideoWriter(path, size, size) as writer:
        for i in range(frames):
            writer.write(pattern(i, size))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def top_level_atoms(path: Path) -> list[str]:
    """Names of an MP4's top-level boxes in file order."""
    data = path.read_bytes()
    names, pos = [], 0
    while pos + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        names.append(name.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return names


def decoded_audio_samples(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def test_video_writer_writes_h264_yuv420p_at_25_fps(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    write_video(path, 30)
    info = probe(path)
    assert (info.video_codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", SIZE, SIZE)
    assert info.fps == FPS
    assert info.frames == 30
    assert info.video_duration == pytest.approx(30 / FPS, abs=1e-6)
    assert info.audio_codec is None
    assert top_level_atoms(path).index("moov") < top_level_atoms(path).index("mdat")  # faststart
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]  # no temporary file left


def test_video_writer_frames_decode_back_close_to_input(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    write_video(path, 20)
    decoded = list(read_frames(path))
    assert len(decoded) == 20
    values = [psnr(frame, pattern(i)) for i, frame in enumerate(decoded)]
    assert min(values) > 30, values
    # Frames stay in order: frame 5 matches pattern 5 better than its neighbours' patterns.
    assert psnr(decoded[5], pattern(5)) > psnr(decoded[5], pattern(8)) + 5


def test_video_writer_i420_planes_decode_like_rgb_frames(tmp_path: Path) -> None:
    """Frames converted to YUV by OpenCV (the puppet's path) decode back as close to the input as RGB frames."""
    cv2 = pytest.importorskip("cv2")
    frames = [pattern(i) for i in range(6)]
    with VideoWriter(tmp_path / "i420.mp4", frames[0].shape[1], frames[0].shape[0]) as writer:
        for frame in frames:
            writer.write_i420(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420))
        with pytest.raises(ValueError, match="I420"):
            writer.write_i420(np.zeros((3, 3), np.uint8))
    decoded = list(read_frames(tmp_path / "i420.mp4"))
    assert len(decoded) == 6 and min(psnr(d, f) for d, f in zip(decoded, frames, strict=True)) > 30


def test_video_writer_passes_threads_and_x264_params_to_the_encoder(tmp_path: Path) -> None:
    """The puppet's settings (one thread, its own motion search) reach x264: here `bframes=0` is seen in the file,
    which by default (preset medium) has B-frames."""
    import av
    from av.video.frame import PictureType

    def frame_types(**options: object) -> set[int]:
        path = tmp_path / f"v{len(options)}.mp4"
        with VideoWriter(path, SIZE, SIZE, **options) as writer:
            for i in range(30):
                writer.write(pattern(i))
        with av.open(str(path)) as container:
            return {frame.pict_type for frame in container.decode(video=0)}

    assert PictureType.B in frame_types()
    assert frame_types(threads=1, x264_params="bframes=0:me=dia:subme=1") <= {PictureType.I, PictureType.P}


def test_video_writer_removes_partial_file_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with pytest.raises(RuntimeError, match="animator failed"):
        with VideoWriter(path, SIZE, SIZE) as writer:
            for i in range(5):
                writer.write(pattern(i))
            raise RuntimeError("animator failed")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_keeps_old_file_until_success(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with VideoWriter(path, SIZE, SIZE) as writer:
            writer.write(pattern(0))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"previous"


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (np.zeros((SIZE, SIZE, 3), np.float32), "uint8"),
        (np.zeros((SIZE, SIZE + 2, 3), np.uint8), r"shape must be \(128, 128, 3\)"),
        (np.zeros((SIZE, SIZE, 4), np.uint8), "got \\(128, 128, 4\\)"),
        (np.zeros((SIZE, SIZE), np.uint8), "HxWx3"),
    ],
)
def test_video_writer_rejects_bad_frames(tmp_path: Path, frame: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        with VideoWriter(tmp_path / "video.mp4", SIZE, SIZE) as writer:
            writer.write(frame)
    assert list(tmp_path.iterdir()) == []


def test_video_writer_rejects_odd_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "video.mp4", 127, 128)
    assert list(tmp_path.iterdir()) == []


def test_video_writer_without_frames_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "video.mp4", SIZE, SIZE):
            pass
    assert list(tmp_path.iterdir()) == []


def test_video_writer_memory_stays_flat(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    size = 256
    base = pattern(0, size)

    def frames(count: int) -> Iterator[np.ndarray]:
        for i in range(count):
            yield np.roll(base, i, axis=1)

    process = psutil.Process()
    with VideoWriter(tmp_path / "video.mp4", size, size, preset="ultrafast") as writer:
        for frame in frames(60):  # fill the encoder's look-ahead first
            writer.write(frame)
        warm = process.memory_info().rss
        for frame in frames(500):  # 500 frames = 98 MB of raw RGB if anything kept them
            writer.write(frame)
        grown = process.memory_info().rss - warm
    assert writer.frames_written == 560
    assert grown < 30 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_mux_durations_agree_within_one_frame(tmp_path: Path) -> None:
    frames = 37
    samples = frames * SAMPLES_PER_FRAME + 500  # a part-frame tail, which the video does not show
    write_video(tmp_path / "silent.mp4", frames)
    write_wav(tmp_path / "speech.wav", tone(samples / SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE)
    assert frames == samples // SAMPLES_PER_FRAME
    out = tmp_path / "final.mp4"
    mux(tmp_path / "silent.mp4", tmp_path / "speech.wav", out)

    info = probe(out)
    assert (info.video_codec, info.pix_fmt, info.fps, info.frames) == ("h264", "yuv420p", FPS, frames)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("aac", SAMPLE_RATE, 1)
    assert abs(info.audio_duration - info.video_duration) <= 1 / FPS
    # What a decoder really outputs: AAC works in 1024-sample blocks, so the last block is padded (the priming
    # samples are trimmed by the MP4 edit list). Measured: at most 1023 extra samples, i.e. under 64 ms; the
    # header duration above is exact.
    decoded = decoded_audio_samples(out)
    assert frames * SAMPLES_PER_FRAME <= decoded < frames * SAMPLES_PER_FRAME + 1024
    assert top_level_atoms(out).index("moov") < top_level_atoms(out).index("mdat")


def test_mux_copies_video_without_reencoding(tmp_path: Path) -> None:
    import av

    write_video(tmp_path / "silent.mp4", 10)
    write_wav(tmp_path / "speech.wav", tone(10 * SAMPLES_PER_FRAME / SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE)
    mux(tmp_path / "silent.mp4", tmp_path / "speech.wav", tmp_path / "final.mp4")

    def video_payloads(path: Path) -> list[bytes]:
        with av.open(str(path)) as container:
            return [bytes(p) for p in container.demux(video=0) if p.size]

    assert video_payloads(tmp_path / "final.mp4") == video_payloads(tmp_path / "silent.mp4")


def test_mux_resamples_other_rates_to_16k_mono(tmp_path: Path) -> None:
    write_video(tmp_path / "silent.mp4", 10)
    write_wav(tmp_path / "speech.wav", tone(0.5, 44_100, channels=2), 44_100)
    mux(tmp_path / "silent.mp4", tmp_path / "speech.wav", tmp_path / "final.mp4")
    info = probe(tmp_path / "final.mp4")
    assert (info.sample_rate, info.channels) == (SAMPLE_RATE, 1)
    assert info.audio_duration == pytest.approx(10 / FPS, abs=1 / FPS)


def test_mux_corrupt_wav_is_bad_input(tmp_path: Path) -> None:
    write_video(tmp_path / "silent.mp4", 5)
    wav = tmp_path / "speech.wav"
    wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(range(256)) * 4)
    with pytest.raises(BadInputError, match="speech.wav"):
        mux(tmp_path / "silent.mp4", wav, tmp_path / "final.mp4")
    assert not (tmp_path / "final.mp4").exists()


def test_mux_audio_shorter_than_video_is_bad_input(tmp_path: Path) -> None:
    write_video(tmp_path / "silent.mp4", 25)
    write_wav(tmp_path / "speech.wav", tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    with pytest.raises(BadInputError, match="25 frames"):
        mux(tmp_path / "silent.mp4", tmp_path / "speech.wav", tmp_path / "final.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silent.mp4", "speech.wav"]


def test_run_mux_reports_each_job(tmp_path: Path) -> None:
    write_video(tmp_path / "silent.mp4", 12)
    write_wav(tmp_path / "speech.wav", tone(12 * SAMPLES_PER_FRAME / SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE)
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    write_wav(tmp_path / "long.wav", tone(20 * SAMPLES_PER_FRAME / SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE)
    jobs = []
    for name, wav in (("good", "speech.wav"), ("bad", "broken.wav"), ("long", "long.wav")):
        out_dir = tmp_path / name
        out_dir.mkdir()
        jobs.append(
            StepJob(
                stage="mux",
                key=name,
                settings={},
                inputs={"video": tmp_path / "silent.mp4", "audio": tmp_path / wav},
                out_dir=out_dir,
                label=f"videos[{name}]",
            )
        )
    good, bad, long = run_mux(jobs, ModelPool())
    assert isinstance(good, dict) and good["frames"] == 12 and good["warnings"] == []
    assert long["frames"] == 12 and long["warnings"] == ["the speech lasts 0.80 s but the video 0.48 s: the end is cut"]
    assert probe(tmp_path / "good" / "video.mp4").audio_codec == "aac"
    assert isinstance(bad, BadInputError)
    assert "videos[bad]" in str(bad) and "broken.wav" in str(bad)
    assert list((tmp_path / "bad").iterdir()) == []


def test_video_writer_refuses_a_size_the_encoder_cannot_take(tmp_path: Path) -> None:
    """A panorama pasted back whole (preprocess: full) would be refused by libx264 mid-run: said up front."""
    from renderer.base import BadInputError
    from renderer.encode import VideoWriter

    with pytest.raises(BadInputError, match="larger than the H.264 encoder takes"):
        VideoWriter(tmp_path / "wide.mp4", 16400, 4000)
    assert not list(tmp_path.iterdir())
