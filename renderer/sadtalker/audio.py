"""SadTalker audio features (SPEC §1.3, §4): 16 kHz waveform → normalised log-mel → one 80×16 window per video frame.

Upstream computes these with librosa; this module reproduces the same numbers with numpy/scipy (pre-emphasis, centred
Hann STFT, Slaney mel filterbank built in float32 and applied to the float64 magnitude, dB normalisation), so the
audio networks see what they were trained on without librosa's dependency stack. Measured against upstream's
reference mel: max |Δ| ≈ 1e-7.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from renderer.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, BadInputError

logger = logging.getLogger(__name__)

#: STFT size, hop and window length in samples (hop 200 → 80 mel frames per second).
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
#: Mel filterbank: 80 Slaney bands between 55 Hz and 7600 Hz.
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
#: Pre-emphasis filter coefficient.
PREEMPHASIS = 0.97
#: dB range and output scale of the normalised mel ([-MAX_ABS_VALUE, MAX_ABS_VALUE]).
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
#: Mel frames per video-frame window (200 ms of audio).
MEL_WINDOW = 16
#: The window of frame i starts this many video frames earlier (80 ms before the frame's timestamp).
WINDOW_LEAD_FRAMES = 2
#: Mel frames per second.
MEL_FPS = SAMPLE_RATE / HOP_LENGTH
#: STFT frames computed at once, to bound memory on long audio.
_STFT_CHUNK = 4096


def load_wav_16k(path: Path) -> np.ndarray:
    """Read a WAV file as mono float32 in [-1, 1] at 16 kHz.

    The voice stage writes 16 kHz mono s16; other rates are resampled with soxr "HQ" (what librosa ≥ 0.10 uses) and
    channels are averaged, as upstream's loader does.
    """
    from scipy.io import wavfile

    path = Path(path)
    try:
        rate, data = wavfile.read(path)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read WAV file {path}: {exc}", "give a PCM or float WAV file") from exc
    if data.dtype == np.uint8:
        wav = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        wav = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    elif data.dtype.kind == "f":
        wav = data.astype(np.float32)
    else:
        raise BadInputError(f"unsupported WAV sample type {data.dtype} in {path}", "give a 16-bit PCM WAV file")
    if wav.ndim == 2:
        wav = wav.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        logger.info("resampling %s from %d Hz to %d Hz", path, rate, SAMPLE_RATE)
        wav = soxr.resample(wav, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def num_frames(num_samples: int) -> int:
    """Video frames covered by `num_samples` samples at 16 kHz: floor(samples / 640)."""
    return int(num_samples) // SAMPLES_PER_FRAME


def trim_to_frames(wav: np.ndarray) -> np.ndarray:
    """Cut the waveform to a whole number of video frames (N · 640 samples), as upstream does before the mel."""
    return np.asarray(wav)[: num_frames(len(wav)) * SAMPLES_PER_FRAME]


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    freqs = f_sp * mels
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@functools.lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """The 80×401 Slaney-normalised triangular mel filterbank, float32 like librosa's default (read-only)."""
    fft_freqs = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)
    mel_edges = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_edges)
    ramps = np.subtract.outer(mel_edges, fft_freqs)
    weights = np.zeros((N_MELS, len(fft_freqs)), dtype=np.float32)
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney area normalisation, applied in place to the float32 weights (float64 product, rounded to float32).
    enorm = 2.0 / (mel_edges[2 : N_MELS + 2] - mel_edges[:N_MELS])
    weights *= enorm[:, np.newaxis]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    from scipy.signal import get_window

    window = get_window("hann", WIN_LENGTH, fftbins=True).astype(np.float64)
    window.setflags(write=False)
    return window


def _stft_magnitude(y: np.ndarray) -> np.ndarray:
    """|STFT| (401 × T, float64) of a centred, zero-padded signal: T = 1 + len(y) // HOP_LENGTH."""
    pad = N_FFT // 2
    padded = np.pad(y, (pad, pad), mode="constant")
    n_stft = 1 + (len(padded) - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_stft]
    window = _hann_window()
    out = np.empty((N_FFT // 2 + 1, n_stft), dtype=np.float64)
    for start in range(0, n_stft, _STFT_CHUNK):
        chunk = frames[start : start + _STFT_CHUNK] * window
        out[:, start : start + len(chunk)] = np.abs(np.fft.rfft(chunk, axis=1)).T
    return out


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Normalised log-mel (80 × T, float64, values in [-4, 4]) of a 16 kHz waveform, as upstream's `melspectrogram`."""
    from scipy.signal import lfilter

    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {wav.shape}")
    emphasised = lfilter([1.0, -PREEMPHASIS], [1.0], wav)
    magnitude = _stft_magnitude(np.asarray(emphasised, dtype=np.float64))
    mel = np.dot(mel_filterbank(), magnitude)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    return np.clip(
        (2 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE, -MAX_ABS_VALUE, MAX_ABS_VALUE
    )


def window_starts(frames: int) -> np.ndarray:
    """First mel frame of each video frame's window: trunc(80 · ((i − 2) / 25)); frames 0 and 1 start at −6, −3."""
    return np.array([int(MEL_FPS * ((i - WINDOW_LEAD_FRAMES) / float(FPS))) for i in range(frames)], dtype=np.int64)


def windows_from_mel(mel: np.ndarray, frames: int) -> np.ndarray:
    """Cut `frames` windows of 16 mel frames (edge frames repeated) from an 80 × T mel → (N, 1, 80, 16) float32."""
    mel = np.asarray(mel)
    last = mel.shape[1] - 1
    index = window_starts(frames)[:, None] + np.arange(MEL_WINDOW)[None, :]
    index = np.clip(index, 0, last)
    windows = mel[:, index]  # 80 × N × 16
    return np.ascontiguousarray(windows.transpose(1, 0, 2)[:, None].astype(np.float32))


def mel_windows(wav: np.ndarray) -> np.ndarray:
    """Per-frame mel windows of a 16 kHz waveform: (N, 1, 80, 16) float32 with N = floor(len / 640).

    The waveform is first cut to N · 640 samples, exactly as upstream, so the last window matches its edge padding.
    """
    trimmed = trim_to_frames(wav)
    frames = num_frames(len(trimmed))
    if frames == 0:
        return np.zeros((0, 1, N_MELS, MEL_WINDOW), dtype=np.float32)
    return windows_from_mel(melspectrogram(trimmed), frames)
