"""Audio fixtures shared by the encode, voice and gTTS tests: WAV writing/reading, real encoded files, voice jobs."""

from __future__ import annotations

import io
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from renderer.base import StepJob


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5, channels: int = 1) -> np.ndarray:
    """A sine (float32, shape (samples, channels)) with a slow amplitude wobble so it is not a pure steady tone."""
    t = np.arange(int(round(seconds * rate))) / rate
    mono = amplitude * np.sin(2 * np.pi * freq * t) * (0.75 + 0.25 * np.sin(2 * np.pi * 1.5 * t))
    return np.repeat(mono[:, None], channels, axis=1).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """Write float (-1..1) or int16 samples, shape (samples,) or (samples, channels), as 16-bit PCM."""
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.dtype != np.int16:
        audio = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(audio.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(audio.tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int, int, int]:
    """Return (int16 samples of shape (samples, channels), sample rate, channels, sample width in bytes)."""
    with wave.open(str(path), "rb") as src:
        rate, channels, width = src.getframerate(), src.getnchannels(), src.getsampwidth()
        data = src.readframes(src.getnframes())
    return np.frombuffer(data, dtype=np.int16).reshape(-1, channels), rate, channels, width


def encode_audio(
    audio: np.ndarray, rate: int, fmt: str, codec: str, container_options: dict[str, str] | None = None
) -> bytes:
    """Encode float samples (samples, channels) into a real compressed file (e.g. fmt "mp3", codec "libmp3lame")."""
    import av

    channels = audio.shape[1]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, container_options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono" if channels == 1 else "stereo"
        planar = np.ascontiguousarray(audio.T.astype(np.float32))
        block = 1152
        for start in range(0, planar.shape[1], block):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + block]), format="fltp", layout=stream.layout.name
            )
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def rms(samples: np.ndarray) -> float:
    """Root mean square of int16 samples, as a fraction of full scale."""
    return float(np.sqrt(np.mean((samples.astype(np.float64) / 32768) ** 2)))


def median_f0(samples: np.ndarray, rate: int, lo: float = 60.0, hi: float = 400.0) -> float:
    """Median pitch (Hz) of the voiced 40 ms frames, by normalised autocorrelation: a small pitch tracker of its own,
    independent of the engine under test. A frame is voiced when its best lag correlates above 0.6."""
    x = np.asarray(samples, np.float64)
    if x.ndim > 1:
        x = x.mean(axis=1)
    size = int(0.04 * rate)
    lags = np.arange(int(rate / hi), int(rate / lo) + 1)
    found = []
    for start in range(0, len(x) - 2 * size, size // 2):
        frame = x[start : start + 2 * size] - x[start : start + 2 * size].mean()
        head = frame[:size]
        energy = np.sqrt(np.sum(head**2) * np.array([np.sum(frame[lag : lag + size] ** 2) for lag in lags])) + 1e-12
        corr = np.array([np.dot(head, frame[lag : lag + size]) for lag in lags]) / energy
        best = int(np.argmax(corr))
        if corr[best] > 0.6 and np.sqrt(np.mean(head**2)) > 0.01:
            found.append(rate / lags[best])
    return float(np.median(found)) if found else 0.0


def voice_job(tmp_path: Path, text: str, name: str, settings: dict) -> StepJob:
    """A voice step for character `name`, writing into tmp_path/name (created)."""
    out_dir = tmp_path / name
    out_dir.mkdir()
    return StepJob(
        stage="voice",
        key=name,
        settings=settings,
        inputs={},
        out_dir=out_dir,
        text=text,
        label=f"characters.{name}",
        checkpoints=tmp_path / "checkpoints",
    )
