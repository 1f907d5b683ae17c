"""renderer.voice with engine hibari: the female voice inside the hibari-tts wheel, its pitch and rate controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _audio_util import median_f0, read_wav, rms, voice_job

from renderer.base import SAMPLE_RATE, BadInputError, MissingWeightsError, ModelPool
from renderer.voice import run

pytest.importorskip("hibari")

SENTENCE = "Hello, I am Eileen. Welcome to Northwind Labs."
DEFAULTS: dict[str, Any] = {"engine": "hibari", "model": None, "rate": 1.0, "pitch": 0, "sentence_silence": 0.2}


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool()


def speak(pool: ModelPool, tmp_path: Path, text: str = SENTENCE, name: str = "eileen", **settings: Any) -> tuple:
    job = voice_job(tmp_path, text, name, {**DEFAULTS, **settings})
    (result,) = run([job], pool)
    return result, job.out_dir


def test_hibari_voice_is_a_female_voice_at_16k(pool: ModelPool, tmp_path: Path) -> None:
    result, out_dir = speak(pool, tmp_path)
    samples, rate, channels, width = read_wav(out_dir / "speech.wav")
    assert (rate, channels, width) == (SAMPLE_RATE, 1, 2)
    assert 2.0 < len(samples) / rate < 6.0 and rms(samples) > 0.03
    assert result["engine"] == "hibari" and result["model"] == "heart" and result["sentences"] == 2
    assert 165 < median_f0(samples / 32768, rate) < 260  # an adult woman's speaking pitch
    assert (out_dir / "phonemes.json").read_text() == "[]\n"  # no timings: the animator follows the envelope


def test_hibari_pitch_moves_the_voice_by_semitones(pool: ModelPool, tmp_path: Path) -> None:
    _, low = speak(pool, tmp_path, name="low", pitch=-4)
    _, high = speak(pool, tmp_path, name="high", pitch=4)
    f_low = median_f0(read_wav(low / "speech.wav")[0] / 32768, SAMPLE_RATE)
    f_high = median_f0(read_wav(high / "speech.wav")[0] / 32768, SAMPLE_RATE)
    assert f_high / f_low == pytest.approx(2 ** (8 / 12), rel=0.08)


def test_hibari_rate_and_determinism(pool: ModelPool, tmp_path: Path) -> None:
    normal, first = speak(pool, tmp_path, name="first")
    _, second = speak(pool, tmp_path, name="second")
    fast, _ = speak(pool, tmp_path, name="fast", rate=1.5)
    assert (first / "speech.wav").read_bytes() == (second / "speech.wav").read_bytes()
    assert fast["seconds"] < 0.8 * normal["seconds"]


@pytest.mark.parametrize(("settings", "words"), [({"pitch": 30}, "pitch"), ({"rate": 3.0}, "rate")])
def test_hibari_bad_settings_are_bad_input(pool: ModelPool, tmp_path: Path, settings: dict, words: str) -> None:
    result, _ = speak(pool, tmp_path, **settings)
    assert isinstance(result, BadInputError) and f"voice.{words}" in str(result)


def test_hibari_voice_not_in_the_package_is_missing_weights(pool: ModelPool, tmp_path: Path) -> None:
    result, _ = speak(pool, tmp_path, model="emma")
    assert isinstance(result, MissingWeightsError)
    assert str(tmp_path / "checkpoints" / "hibari" / "emma.onnx") in str(result)


def test_piper_refuses_a_pitch_it_cannot_make(pool: ModelPool, tmp_path: Path) -> None:
    result, _ = speak(pool, tmp_path, engine="piper", pitch=2)
    assert isinstance(result, BadInputError) and "no pitch control" in str(result)
