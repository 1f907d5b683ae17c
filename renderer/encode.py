"""H.264 video writing, audio muxing and probing with PyAV (FFmpeg's libraries, no ffmpeg binary).

The animators stream frames into `VideoWriter` (memory stays flat however long the video is); the "mux"
stage (`run_mux`) copies the silent H.264 stream untouched and adds the speech as 16 kHz mono AAC, cut to the
video's length so that audio and video end together.

Frame sizes must be even: yuv420p stores colour at half resolution, and libx264 refuses odd sizes. `VideoWriter`
raises `ValueError` for an odd width or height rather than padding silently, because a padded frame would no
longer match the portrait size the caller asked for.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np

from renderer.base import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    BadInputError,
    ModelPool,
    RenderError,
    StepJob,
    media_error,
    run_each,
)

logger = logging.getLogger(__name__)

#: Bit rate of the speech track: ample for 16 kHz mono speech.
AUDIO_BIT_RATE = 48_000
#: Samples per AAC frame (the encoder's fixed frame size).
_AAC_FRAME_SIZE = 1024
#: MP4 muxer flag that moves the index (moov atom) to the front, so players can start before the download ends.
_FASTSTART = {"movflags": "+faststart"}


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What a media file holds; audio fields are None for a silent video, video fields None for audio only."""

    video_codec: str | None
    pix_fmt: str | None
    width: int | None
    height: int | None
    fps: float | None
    frames: int | None
    video_duration: float | None
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None
    audio_duration: float | None


def _temp_sibling(path: Path) -> Path:
    """A fresh temporary file name next to `path`, so the final `os.replace` stays on one file system."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


#: The longest side libx264 encodes.
MAX_SIDE = 16384


class VideoWriter:
    """Stream RGB frames into a silent H.264 (yuv420p) MP4 at `fps`, with the index at the front (faststart).

    Frames go to the encoder as they come, so memory does not grow with the video's length. The file is written
    under a temporary name and moved into place on a clean close; on an exception inside the `with` block the
    partial file is deleted and `path` is left untouched.

        with VideoWriter(out_dir / "video.mp4", 256, 256) as writer:
            for frame in frames:          # HxWx3 uint8 RGB
                writer.write(frame)
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: int = FPS,
        crf: int = 18,
        *,
        preset: str = "medium",
        threads: int = 0,
        x264_params: str = "",
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size must be positive and even for yuv420p, got width={width} height={height}")
        if max(width, height) > MAX_SIDE:
            raise BadInputError(
                f"a {width}x{height} video is larger than the H.264 encoder takes ({MAX_SIDE} pixels a side)",
                "use a smaller portrait, or video.preprocess: crop",
            )
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        import av

        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.frames_written = 0
        self._tmp = _temp_sibling(self.path)
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4", container_options=_FASTSTART)
            self._stream = self._container.add_stream("libx264", rate=fps)
            self._stream.width = width
            self._stream.height = height
            self._stream.pix_fmt = "yuv420p"
            self._stream.time_base = Fraction(1, fps)
            options = {"crf": str(crf), "preset": preset}
            if threads:  # else x264's own choice (1.5 per core); 1 costs less CPU per frame on small frames
                options["threads"] = str(threads)
            if x264_params:  # "key=value:key=value" over the preset's
                options["x264-params"] = x264_params
            self._stream.codec_context.options = options
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        """Encode one HxWx3 uint8 RGB frame."""
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is already closed")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
            kind = frame.dtype if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame must be a uint8 numpy array, got {kind}")
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame shape must be {(self.height, self.width, 3)} (HxWx3 RGB), got {frame.shape}")
        import av

        self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))

    def write_i420(self, planes: np.ndarray) -> None:
        """Encode one frame already converted to YUV 4:2:0 (BT.601, limited range): the Y plane over the U and V
        planes, (H * 3 / 2) x W uint8, as OpenCV's `COLOR_RGB2YUV_I420` gives it (7x faster than FFmpeg's own
        conversion from RGB; Y is the same within one level)."""
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is already closed")
        if (
            not isinstance(planes, np.ndarray)
            or planes.dtype != np.uint8
            or planes.shape
            != (
                self.height * 3 // 2,
                self.width,
            )
        ):
            raise ValueError(f"I420 planes must be uint8 of shape {(self.height * 3 // 2, self.width)}")
        import av

        self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(planes), format="yuv420p"))

    def _encode(self, video_frame: object) -> None:
        video_frame.pts = self.frames_written
        # A fixed time base: the stream's own one changes to the muxer's (1/12800) once the header is written.
        video_frame.time_base = Fraction(1, self.fps)
        self._container.mux(self._stream.encode(video_frame))
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the finished file to `path`."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {self.path}")
            self._container.mux(self._stream.encode(None))
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Stop without producing a file (deletes what was written so far)."""
        if not self._closed:
            self._closed = True
            self._discard()

    def _discard(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away; the original error matters, not this one
            logger.debug("closing abandoned %s failed", self._tmp, exc_info=True)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_pcm(wav: Path) -> np.ndarray:
    """Decode an audio file to 16 kHz mono int16 samples (FFmpeg's resampler when the rate differs)."""
    import av

    chunks: list[np.ndarray] = []
    try:
        with av.open(str(wav)) as container:
            if not container.streams.audio:
                raise BadInputError(f"{wav} has no audio stream", "pass a 16 kHz mono WAV")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read audio {wav}: {media_error(exc)}", "re-create the speech WAV") from exc
    if not chunks:
        raise BadInputError(f"{wav} holds no audio samples", "re-create the speech WAV")
    return np.concatenate(chunks).astype(np.int16, copy=False)


def mux(video: Path, wav: Path, out: Path) -> float:
    """Combine a silent H.264 video and a speech WAV into `out` (H.264 copied, 16 kHz mono AAC, faststart); returns
    how long the speech in the WAV lasts, in seconds (before any cut).

    The audio is cut (or padded by less than one frame of silence) to exactly frames × 640 samples, so both
    tracks last as long as the video. Audio shorter than the video by a whole frame or more is a BadInputError:
    the video was made from another WAV.
    """
    import av

    video, wav, out = Path(video), Path(wav), Path(out)
    pcm = _read_pcm(wav)
    speech = len(pcm) / SAMPLE_RATE
    try:
        src = av.open(str(video))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read video {video}: {media_error(exc)}", "re-render the video") from exc
    tmp = _temp_sibling(out)
    try:
        with src:
            if not src.streams.video:
                raise BadInputError(f"{video} has no video stream", "re-render the video")
            in_stream = src.streams.video[0]
            frames = in_stream.frames or sum(1 for p in src.demux(in_stream) if p.size)
            src.seek(0)
            needed = frames * SAMPLES_PER_FRAME
            if len(pcm) + SAMPLES_PER_FRAME <= needed:
                raise BadInputError(
                    f"audio {wav} lasts {len(pcm) / SAMPLE_RATE:.3f} s but video {video} has {frames} frames "
                    f"({frames / FPS:.3f} s)",
                    "re-render the video from this WAV",
                )
            pcm = np.pad(pcm[:needed], (0, max(0, needed - len(pcm))))
            with av.open(str(tmp), "w", format="mp4", container_options=_FASTSTART) as dst:
                out_video = dst.add_stream_from_template(in_stream)
                out_audio = dst.add_stream("aac", rate=SAMPLE_RATE)
                out_audio.layout = "mono"
                out_audio.bit_rate = AUDIO_BIT_RATE
                sent = 0  # audio samples handed to the encoder so far

                def send_audio(until: int) -> None:
                    """Encode audio up to sample `until`, interleaving it with the copied video packets."""
                    nonlocal sent
                    while sent < min(until, needed):
                        block = pcm[sent : min(sent + _AAC_FRAME_SIZE, needed)]
                        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
                        frame.sample_rate = SAMPLE_RATE
                        frame.pts = sent
                        frame.time_base = Fraction(1, SAMPLE_RATE)
                        dst.mux(out_audio.encode(frame))
                        sent += len(block)

                for packet in src.demux(in_stream):
                    if packet.dts is None:  # the demuxer's final empty packet
                        continue
                    if packet.pts is not None and packet.time_base is not None:
                        send_audio(int((packet.pts * packet.time_base + 1) * SAMPLE_RATE))
                    packet.stream = out_video
                    dst.mux(packet)
                send_audio(needed)
                dst.mux(out_audio.encode(None))
        os.replace(tmp, out)
    except av.FFmpegError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # not the video's fault: the runner says what space it needs
            raise OSError(exc.errno, os.strerror(exc.errno), str(out)) from exc
        raise BadInputError(f"cannot mux {video} with {wav}: {media_error(exc)}", "re-render the video") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return speech


def read_frames(path: Path) -> Iterator[np.ndarray]:
    """Decode a video's frames one at a time as HxWx3 uint8 RGB arrays."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def middle_frame(path: Path) -> np.ndarray | None:
    """The frame in the middle of a video as an HxWx3 uint8 RGB array (None for a video without frames): one pass
    of the decoder up to it, converting only that frame (a report's thumbnail)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        middle = max(0, (stream.frames or 0) // 2)
        frame = None
        for i, frame in enumerate(container.decode(stream)):  # noqa: B007 - the last one decoded is kept
            if i >= middle:
                break
        return None if frame is None else frame.to_ndarray(format="rgb24")


def _duration(stream: object, container: object) -> float | None:
    duration = getattr(stream, "duration", None)
    time_base = getattr(stream, "time_base", None)
    if duration is not None and time_base is not None:
        return float(duration * time_base)
    container_duration = getattr(container, "duration", None)
    return None if container_duration is None else container_duration / 1_000_000


def probe(path: Path) -> MediaInfo:
    """Read codecs, sizes, rates, frame count and durations from a media file's headers (no decoding).

    The audio duration of an AAC track is the media duration after the encoder's priming samples are trimmed
    (the MP4 edit list), i.e. what a player plays.
    """
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read media {path}: {media_error(exc)}") from exc
    with container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        frames = None
        if video is not None:
            frames = video.frames or sum(1 for p in container.demux(video) if p.size)
        return MediaInfo(
            video_codec=video.codec_context.name if video else None,
            pix_fmt=video.codec_context.pix_fmt if video else None,
            width=video.codec_context.width if video else None,
            height=video.codec_context.height if video else None,
            fps=float(video.average_rate) if video and video.average_rate else None,
            frames=frames,
            video_duration=_duration(video, container) if video else None,
            audio_codec=audio.codec_context.name if audio else None,
            sample_rate=audio.codec_context.sample_rate if audio else None,
            channels=audio.codec_context.channels if audio else None,
            audio_duration=_duration(audio, container) if audio else None,
        )


def run_mux(jobs: Sequence[StepJob], pool: ModelPool) -> list[dict | RenderError]:
    """Stage "mux": inputs["video"] + inputs["audio"] → out_dir/video.mp4 (H.264 + AAC, faststart)."""
    del pool  # no models

    def one(job: StepJob) -> dict:
        missing = [name for name in ("video", "audio") if name not in job.inputs]
        if missing:
            raise BadInputError(f"{job.label}: mux step lacks input(s) {', '.join(missing)}")
        out = job.out_dir / "video.mp4"
        speech = mux(job.inputs["video"], job.inputs["audio"], out)
        info = probe(out)
        warnings = []
        # The animation makes floor(samples / 640) frames: a video shorter than the speech by a frame is a cut.
        cut = info.video_duration is not None and speech - info.video_duration >= 1 / FPS - 1e-6
        if cut:
            warnings.append(
                f"the speech lasts {speech:.2f} s but the video {info.video_duration:.2f} s: the end is cut"
            )
        return {
            "frames": info.frames,
            "video_duration": info.video_duration,
            "audio_duration": info.audio_duration,
            "size": [info.width, info.height],
            "warnings": warnings,
        }

    return run_each(jobs, one)
