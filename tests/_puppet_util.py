"""Helpers for the puppet animator's tests and benchmark: speech fixtures, animate jobs, audio envelopes."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np

from renderer.base import SAMPLE_RATE, SAMPLES_PER_FRAME, ModelPool, StepJob

REPO = Path(__file__).resolve().parent.parent
PORTRAITS = REPO / "manifests" / "portraits"

#: The `video` section as the runner resolves it (all keys present).
VIDEO_DEFAULTS: dict[str, Any] = {
    "renderer": "puppet",
    "size": 256,
    "preprocess": "crop",
    "still": False,
    "enhancer": "none",
    "expression_scale": 1.0,
    "pose_style": 0,
    "batch_size": 8,
    "dtype": "auto",
}
PIPER_SETTINGS: dict[str, Any] = {
    "engine": "piper",
    "model": "en_US-joe-medium",
    "rate": 1.0,
    "sentence_silence": 0.2,
    "noise_scale": 0.0,
    "noise_w_scale": 0.0,
}


def speak(text: str, out_dir: Path, pool: ModelPool) -> tuple[Path, Path]:
    """Speech WAV + phonemes.json from the project's own voice stage (Piper, noise scales 0: deterministic)."""
    from renderer import voice

    out_dir.mkdir(parents=True, exist_ok=True)
    job = StepJob(stage="voice", key="speech", settings=PIPER_SETTINGS, inputs={}, out_dir=out_dir, text=text)
    (result,) = voice.run([job], pool)
    if isinstance(result, Exception):
        raise result
    return out_dir / "speech.wav", out_dir / "phonemes.json"


def write_wav(path: Path, samples: np.ndarray) -> Path:
    """Write float samples (-1..1) as a 16 kHz mono 16-bit WAV."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def read_samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as src:
        return np.frombuffer(src.readframes(src.getnframes()), dtype="<i2").astype(np.float64) / 32768


def envelope(path: Path) -> np.ndarray:
    """RMS of each 640-sample video frame of a WAV."""
    samples = read_samples(path)
    frames = len(samples) // SAMPLES_PER_FRAME
    return np.sqrt(np.mean(samples[: frames * SAMPLES_PER_FRAME].reshape(frames, -1) ** 2, axis=1))


def babble(seconds: float, seed: int = 0) -> np.ndarray:
    """Synthetic speech-like audio: voiced syllables (harmonics with moving formants) at ~4 Hz between pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    formant = 700 + 500 * np.sin(2 * np.pi * 0.9 * t + 1.0)
    voiced = sum(np.sin(k * phase) * np.exp(-(((k * pitch) - formant) ** 2) / (2 * 300.0**2)) for k in range(1, 25))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.23 * t) > -0.6).astype(float)
    audio = voiced * syllables * pauses + 0.002 * rng.standard_normal(len(t))
    return 0.6 * audio / np.max(np.abs(audio))


def animate_job(
    out_dir: Path,
    audio: Path,
    portrait: Path | None = None,
    phonemes: Path | None = None,
    seed: int = 1,
    label: str = "videos[0]",
    **video: Any,
) -> StepJob:
    """A StepJob for stage "animate" with an empty out_dir and the resolved `video` settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"portrait": portrait or PORTRAITS / "astronaut.jpg", "audio": audio}
    if phonemes is not None:
        inputs["phonemes"] = phonemes
    return StepJob(
        stage="animate",
        key=out_dir.name,
        settings={**VIDEO_DEFAULTS, **video},
        inputs=inputs,
        out_dir=out_dir,
        seed=seed,
        label=label,
    )
