"""Motion tracks of the puppet animator: what the mouth, eyelids and head do in each 40 ms video frame.

Everything here is pure numpy on per-frame arrays (a 10-minute video is 15 000 frames, a few hundred KB), so it
can be computed for the whole clip before the first frame is drawn. The audio itself is read in blocks and never
held whole, so memory does not grow with the length of the speech.

Mouth: the opening follows the speech envelope (RMS per video frame, in dB relative to the speech level); the
shape (wide, round, closed) comes from phoneme timings when the voice stage wrote them, else from the spectrum
(a crude second-formant estimate and the share of hiss). Without timings (a recording, Hibari, gTTS) the envelope
alone would leave the mouth gaping: the opening is scaled to what visemes give on average and closes further
between syllables (frames well below the loudest one within ±140 ms), so both paths open the mouth alike (mean,
share of closed frames and 90th percentile within a few hundredths on Piper sentences, where both can be computed). Smoothing is zero-phase, so the mouth never lags the
sound. Blinks and head motion are drawn from a generator seeded with the job's seed, so a job renders the same
video every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from renderer.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, BadInputError

#: Video frames read from the WAV per block (10 s): bounds the memory used by the audio analysis.
_BLOCK_FRAMES = 250
#: The opening reaches 0 this many dB below the speech level and 1 a few dB below it.
_OPEN_RANGE_DB = 24.0
_OPEN_FLOOR_DB = 27.0
#: Without phoneme timings: the share of the envelope's opening the mouth takes (the visemes' average), how much of
#: it depends on being a syllable's nucleus, over how many frames (280 ms) and dB the nucleus is looked for.
#: Fitted so that both paths give the same openness statistics on Piper sentences (bench/results/2026-12-07-cpu).
_ENVELOPE_GAIN = 0.8
_SYLLABLE_DEPTH = 0.3
_SYLLABLE_FRAMES = 7
_SYLLABLE_RANGE_DB = 12.0
#: Spectral bands (Hz) for the shape estimate without phonemes.
_LOW_BAND = (250.0, 1100.0)
_MID_BAND = (1100.0, 3000.0)
_HISS_BAND = (3500.0, 8000.0)

#: Viseme of each espeak/IPA phoneme symbol: (opening gain 0..1, width -1 round .. +1 wide).
#: Gain 0 marks a lip closure (m, b, p): the mouth closes whatever the loudness.
_VISEMES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(["m", "b", "p"], (0.0, 0.0)),
    **dict.fromkeys(["f", "v"], (0.15, 0.15)),
    **dict.fromkeys(["θ", "ð"], (0.3, 0.2)),
    **dict.fromkeys(["s", "z", "t", "d", "n", "l", "ɾ", "ɫ", "ʔ"], (0.35, 0.35)),
    **dict.fromkeys(["ʃ", "ʒ", "ʧ", "ʤ", "tʃ", "dʒ"], (0.3, -0.5)),
    **dict.fromkeys(["k", "g", "ɡ", "ŋ", "h", "x", "j", "ç"], (0.5, 0.1)),
    **dict.fromkeys(["w", "ʍ"], (0.2, -0.9)),
    **dict.fromkeys(["r", "ɹ", "ɻ", "ʁ"], (0.35, -0.45)),
    **dict.fromkeys(["i", "iː", "ɪ", "y", "ɨ"], (0.45, 0.8)),
    **dict.fromkeys(["e", "eɪ", "ɛ", "ø"], (0.65, 0.55)),
    "æ": (0.85, 0.5),
    **dict.fromkeys(["a", "aɪ", "aʊ", "ɑ", "ɑː", "ɒ"], (1.0, 0.1)),
    **dict.fromkeys(["ʌ", "ə", "ɐ", "ɜ", "ɜː", "ɚ", "ɝ", "ᵻ"], (0.6, 0.1)),
    **dict.fromkeys(["ɔ", "ɔː", "ɔɪ"], (0.8, -0.5)),
    **dict.fromkeys(["o", "oʊ", "əʊ"], (0.65, -0.7)),
    "ʊ": (0.45, -0.7),
    **dict.fromkeys(["u", "uː", "ʉ"], (0.35, -0.9)),
}
#: Marks that belong to a neighbouring phoneme: stress precedes its vowel, length follows it.
_STRESS = {"ˈ", "ˌ"}
_LENGTH = {"ː", "ˑ"}
#: Blink shape (eyelid closure per frame): ~200 ms, fast down, slower up.
_BLINK_SHAPE = np.array([0.45, 0.95, 1.0, 0.65, 0.3, 0.1])


@dataclasses.dataclass(frozen=True)
class AudioFeatures:
    """Per-video-frame measurements of a speech WAV (one value per 640 samples)."""

    samples: int
    #: Root mean square of the frame, full scale = 1.
    rms: np.ndarray
    #: log10 of mid-band (1.1-3 kHz) over low-band (0.25-1.1 kHz) energy: high for "ee", low for "oo".
    tilt: np.ndarray
    #: Share of the energy in 3.5-8 kHz: high for hiss (s, sh, f).
    hiss: np.ndarray

    @property
    def frames(self) -> int:
        return len(self.rms)


@dataclasses.dataclass(frozen=True)
class Phoneme:
    phoneme: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Tracks:
    """What the face does in each frame; all arrays have one value per video frame."""

    #: Lip opening 0 (closed) .. 1 (wide open, before expression_scale).
    mouth_open: np.ndarray
    #: Mouth width -1 (rounded) .. +1 (spread).
    mouth_width: np.ndarray
    #: Eyelid closure 0 (open) .. 1 (closed).
    blink: np.ndarray
    #: Head angles in degrees (positive yaw turns to the picture's right, pitch nods down, roll tilts clockwise).
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    #: Frames where a blink starts.
    blink_starts: tuple[int, ...]
    #: Where the mouth shape came from: "phonemes" or "spectrum".
    shape_source: str

    def to_json(self) -> dict:
        """The animator's own tracks for track.json (rounded: they are for plots and tests, not re-rendering)."""

        def r(a: np.ndarray) -> list[float]:
            return [round(float(v), 4) for v in a]

        return {
            "fps": FPS,
            "frames": len(self.mouth_open),
            "shape_source": self.shape_source,
            "mouth_open": r(self.mouth_open),
            "mouth_width": r(self.mouth_width),
            "blink": r(self.blink),
            "blink_starts": list(self.blink_starts),
            "head": {"yaw": r(self.yaw), "pitch": r(self.pitch), "roll": r(self.roll)},
        }


def read_audio_features(path: Path) -> AudioFeatures:
    """Measure a 16 kHz mono 16-bit WAV frame by frame, reading it in 10 s blocks."""
    path = Path(path)
    hint = "give a 16 kHz mono 16-bit PCM WAV (the voice and audio stages write one)"
    rms: list[np.ndarray] = []
    tilt: list[np.ndarray] = []
    hiss: list[np.ndarray] = []
    samples = 0
    try:
        with wave.open(str(path), "rb") as src:
            channels, width, rate = src.getnchannels(), src.getsampwidth(), src.getframerate()
            if width != 2 or rate != SAMPLE_RATE or channels not in (1, 2):
                raise BadInputError(
                    f"audio {path} is {rate} Hz, {channels} channel(s), {8 * width}-bit; "
                    f"the animator needs {SAMPLE_RATE} Hz mono 16-bit",
                    hint,
                )
            window = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)
            freqs = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)
            bands = [(freqs >= lo) & (freqs < hi) for lo, hi in (_LOW_BAND, _MID_BAND, _HISS_BAND)]
            leftover = np.zeros(0, np.float32)
            while True:
                raw = src.readframes(_BLOCK_FRAMES * SAMPLES_PER_FRAME)
                if not raw:
                    break
                block = np.frombuffer(raw[: len(raw) // (2 * channels) * 2 * channels], dtype="<i2")
                block = block.reshape(-1, channels).mean(axis=1, dtype=np.float32) / 32768.0
                samples += len(block)
                block = np.concatenate([leftover, block])
                whole = len(block) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
                leftover = block[whole:]
                frames = block[:whole].reshape(-1, SAMPLES_PER_FRAME)
                if not len(frames):
                    continue
                rms.append(np.sqrt(np.mean(frames**2, axis=1)))
                power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
                low, mid, high = (power[:, band].sum(axis=1) for band in bands)
                total = power.sum(axis=1) + 1e-12
                tilt.append(np.log10((mid + 1e-9) / (low + 1e-9)))
                hiss.append(high / total)
    except (wave.Error, EOFError, ValueError, RuntimeError, struct.error) as exc:  # wave's ways to say "corrupt"
        raise BadInputError(f"cannot read audio {path}: {exc}", hint) from exc
    except OSError as exc:
        raise BadInputError(f"cannot open audio {path}: {exc}", hint) from exc
    if samples < SAMPLES_PER_FRAME:
        raise BadInputError(
            f"audio {path} holds {samples} samples, less than one video frame ({SAMPLES_PER_FRAME})",
            "give at least 40 ms of speech",
        )
    return AudioFeatures(
        samples=samples,
        rms=np.concatenate(rms).astype(np.float64),
        tilt=np.concatenate(tilt).astype(np.float64),
        hiss=np.concatenate(hiss).astype(np.float64),
    )


def read_phonemes(path: Path | None) -> list[Phoneme]:
    """Read phonemes.json ([{"phoneme", "start", "end"}] in seconds); a missing or empty file gives no timings."""
    if path is None or not Path(path).exists():
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "[]")
        if isinstance(data, dict):  # tolerate {"phonemes": [...]}
            data = data.get("phonemes", [])
        phonemes = [Phoneme(str(p["phoneme"]), float(p["start"]), float(p["end"])) for p in data]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BadInputError(
            f"cannot read phoneme timings {path}: {exc}",
            'expected a JSON list of {"phoneme", "start", "end"}; re-run the voice stage',
        ) from exc
    return [p for p in phonemes if math.isfinite(p.start) and math.isfinite(p.end) and p.end > p.start]


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing (no lag), edges held."""
    if sigma <= 0 or len(values) < 2:
        return values.copy()
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(values, sigma, mode="nearest")


def envelope_open(features: AudioFeatures) -> np.ndarray:
    """Lip opening 0..1 from loudness relative to the speech level (dB), lightly smoothed."""
    level = 20.0 * np.log10(features.rms + 1e-6)
    loud = level[level > level.max() - 50.0]
    reference = float(np.percentile(loud, 95))
    if reference < -55.0:  # digital silence or hum only: nobody speaks
        return np.zeros_like(level)
    opening = np.clip((level - (reference - _OPEN_FLOOR_DB)) / _OPEN_RANGE_DB, 0.0, 1.0)
    return np.clip(_smooth(opening, 0.6), 0.0, 1.0)


def syllable_contrast(features: AudioFeatures) -> np.ndarray:
    """0..1 per frame: 1 at a syllable's loudest frame, less in the dip between two syllables (the level below the
    loudest frame within ±140 ms, over 12 dB)."""
    from scipy.ndimage import maximum_filter1d

    level = 20.0 * np.log10(features.rms + 1e-6)
    nucleus = maximum_filter1d(level, size=_SYLLABLE_FRAMES, mode="nearest")
    return np.clip((level - (nucleus - _SYLLABLE_RANGE_DB)) / _SYLLABLE_RANGE_DB, 0.0, 1.0)


def _resolve_symbols(phonemes: Sequence[Phoneme]) -> list[tuple[float, float] | None]:
    """Viseme per phoneme entry, giving stress marks the next phoneme's and length marks the previous one's."""
    visemes: list[tuple[float, float] | None] = []
    for p in phonemes:
        symbol = p.phoneme.strip()
        core = "".join(ch for ch in symbol if ch not in _STRESS and ch not in _LENGTH)
        visemes.append(_VISEMES.get(symbol) or _VISEMES.get(core) or (_VISEMES.get(core[:1]) if core else None))
    for i, p in enumerate(phonemes):
        symbol = p.phoneme.strip()
        if visemes[i] is None and symbol in _STRESS and i + 1 < len(visemes):
            visemes[i] = visemes[i + 1]
        elif visemes[i] is None and symbol in _LENGTH and i > 0:
            visemes[i] = visemes[i - 1]
    return visemes


def phoneme_shapes(phonemes: Sequence[Phoneme], frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: opening gain, width, and a closure cap (0 on frames of m/b/p, 1 elsewhere)."""
    gain = np.ones(frames)
    width = np.zeros(frames)
    cap = np.ones(frames)
    centres = (np.arange(frames) + 0.5) / FPS
    for p, viseme in zip(phonemes, _resolve_symbols(phonemes), strict=True):
        if viseme is None:
            continue
        first = int(np.searchsorted(centres, p.start))
        last = int(np.searchsorted(centres, p.end))
        if last <= first:  # shorter than a frame: it owns the frame around its middle
            first = min(int((p.start + p.end) / 2 * FPS), frames - 1)
            last = first + 1
        if first >= frames:
            continue
        gain[first:last] = viseme[0]
        width[first:last] = viseme[1]
        if viseme[0] == 0.0:
            cap[first:last] = 0.0
    # Lips close gradually into and out of a closure (one frame each side), never later than the sound.
    cap = np.minimum(cap, np.minimum(np.r_[1.0, cap[:-1]], np.r_[cap[1:], 1.0]) * 0.5 + 0.5)
    return _smooth(gain, 0.8), _smooth(width, 1.0), cap


def spectral_shapes(features: AudioFeatures, opening: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame opening gain and width from the spectrum, for audio without phoneme timings."""
    voiced = opening > 0.3
    tilt = features.tilt
    if voiced.sum() >= 5:
        centre = float(np.median(tilt[voiced]))
        spread = float(np.std(tilt[voiced])) + 0.1
    else:
        centre, spread = 0.0, 0.5
    width = np.where(opening > 0.05, np.tanh((tilt - centre) / spread) * 0.7, 0.0)
    # Hiss (s, sh, f): teeth nearly together.
    gain = 1.0 - 0.6 * np.clip((features.hiss - 0.35) / 0.35, 0.0, 1.0)
    return _smooth(gain, 0.8), _smooth(width, 1.0)


def blink_schedule(frames: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """Eyelid closure per frame and blink start frames: first blink within 1-3 s, then every 2-6 s."""
    closure = np.zeros(frames)
    starts: list[int] = []
    t = rng.uniform(1.0, 3.0)
    while t * FPS < frames:
        start = int(t * FPS)
        starts.append(start)
        if rng.random() < 0.12:  # now and then a double blink
            start += len(_BLINK_SHAPE) + 1
            starts.append(start)
        t = start / FPS + rng.uniform(2.0, 6.0)
    for start in starts:
        part = _BLINK_SHAPE[: max(0, frames - start)]
        closure[start : start + len(part)] = np.maximum(closure[start : start + len(part)], part)
    return closure, tuple(s for s in starts if s < frames)


def _wander(frames: int, rng: np.random.Generator) -> np.ndarray:
    """A slow smooth random signal in about -1..1 (sum of three sines with random rates and phases)."""
    t = np.arange(frames) / FPS
    rates = rng.uniform(0.07, 0.45, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    weights = np.array([0.55, 0.3, 0.15])
    return np.sum(weights[:, None] * np.sin(2 * np.pi * rates[:, None] * t + phases[:, None]), axis=0)


def head_motion(opening: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Yaw, pitch, roll (degrees): slow sway, livelier while speaking, small nods on stressed syllables."""
    frames = len(opening)
    energy = _smooth(opening, 12.0)
    liveliness = 0.35 + 0.65 * energy / max(float(energy.max()), 1e-6)
    yaw = 2.4 * _wander(frames, rng) * liveliness
    roll = 1.4 * _wander(frames, rng) * liveliness
    emphasis = _smooth(opening, 2.5) - _smooth(opening, 10.0)
    pitch = 1.3 * _wander(frames, rng) * liveliness + 5.0 * emphasis
    return yaw, pitch, roll


def make_tracks(
    features: AudioFeatures,
    phonemes: Sequence[Phoneme],
    *,
    seed: int,
    pose_style: int = 0,
    still: bool = False,
) -> Tracks:
    """Compute all per-frame tracks for one video (deterministic for the same inputs, seed and pose_style)."""
    frames = features.frames
    opening = envelope_open(features)
    if phonemes:
        gain, width, cap = phoneme_shapes(phonemes, frames)
        mouth_open = np.minimum(opening * (0.3 + 0.7 * np.clip(gain, 0.0, 1.0)), cap)
        source = "phonemes"
    else:
        gain, width = spectral_shapes(features, opening)
        syllables = 1.0 - _SYLLABLE_DEPTH + _SYLLABLE_DEPTH * syllable_contrast(features)
        mouth_open = np.clip(opening * _ENVELOPE_GAIN * syllables * gain, 0.0, 1.0)
        source = "spectrum"
    mouth_width = np.clip(width, -1.0, 1.0) * np.clip(opening * 3.0, 0.0, 1.0)
    blink, starts = blink_schedule(frames, np.random.default_rng([seed, 1]))
    if still:
        yaw = pitch = roll = np.zeros(frames)
    else:
        yaw, pitch, roll = head_motion(opening, np.random.default_rng([seed, 2, pose_style]))
    return Tracks(mouth_open, mouth_width, blink, yaw, pitch, roll, starts, source)
