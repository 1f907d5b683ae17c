"""End to end through the CLI with the real offline stages: Piper voice, puppet animator, PyAV encoder.

Also the per-video failure policy with real bad inputs: each bad video gets a clear reason, the others are built.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from renderer.base import SAMPLES_PER_FRAME

pytest.importorskip("piper")
pytest.importorskip("dlib")

REPO = Path(__file__).resolve().parent.parent

MANIFEST = """\
version: 1
characters:
  eileen: {{name: Eileen, image: astronaut.jpg, seed: 1}}
  blank: {{image: blank.png}}
  broken: {{image: broken.png}}
scripts:
  short: {{text: "{text}"}}
  empty: {{text: "   "}}
  corrupt: {{audio: corrupt.wav}}
videos:
  - {{id: ok, character: eileen, script: short}}
  - {{id: no-face, character: blank, script: short}}
  - {{id: bad-image, character: broken, script: short}}
  - {{id: empty-text, character: eileen, script: empty}}
  - {{id: bad-audio, character: eileen, script: corrupt}}
"""


def dhbatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("e2e")
    shutil.copy(REPO / "manifests" / "portraits" / "astronaut.jpg", root / "astronaut.jpg")
    Image.new("RGB", (320, 320), (200, 190, 180)).save(root / "blank.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    (root / "m.yaml").write_text(MANIFEST.format(text="Hello there, nice to meet you."))
    return root


@pytest.fixture(scope="module")
def first_build(project: Path) -> subprocess.CompletedProcess[str]:
    return dhbatch("build", str(project / "m.yaml"), "--device", "cpu")


def test_e2e_builds_good_video_and_reports_bad_inputs(project: Path, first_build: subprocess.CompletedProcess) -> None:
    assert first_build.returncode == 1, first_build.stderr  # some videos failed, the good one is built
    assert "Traceback" not in first_build.stderr + first_build.stdout
    report = json.loads((project / "build" / "m" / "report.json").read_text())
    status = {v["id"]: v for v in report["videos"]}
    assert status["ok"]["status"] == "built" and status["ok"]["renderer"] == "puppet"
    assert "blank.png" in status["no-face"]["error"] and "face" in status["no-face"]["error"]
    assert "broken.png" in status["bad-image"]["error"]
    assert "empty" in status["empty-text"]["error"] and "scripts.empty" in status["empty-text"]["error"]
    assert "corrupt.wav" in status["bad-audio"]["error"]
    for vid in ("no-face", "bad-image", "empty-text", "bad-audio"):
        assert status[vid]["status"] == "failed"
        assert not (project / "build" / "m" / f"{vid}.mp4").exists()
        assert f"FAILED  {vid}" in first_build.stdout


def test_e2e_video_streams_durations_and_frames(project: Path, first_build: subprocess.CompletedProcess) -> None:
    from renderer.encode import probe, read_frames

    out = project / "build" / "m" / "ok.mp4"
    info = probe(out)
    assert (info.video_codec, info.pix_fmt, info.width, info.height, info.fps) == ("h264", "yuv420p", 256, 256, 25)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("aac", 16000, 1)
    report = json.loads((project / "build" / "m" / "report.json").read_text())
    voice = next(s for s in report["videos"][0]["steps"] if s["stage"] == "voice")
    wav = next((project / "build" / "cache" / "steps" / "voice").rglob(f"{voice['key']}/speech.wav"))
    with wave.open(str(wav)) as w:
        samples = w.getnframes()
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
    assert 1.0 < samples / 16000 < 4.0
    assert info.frames == samples // SAMPLES_PER_FRAME
    assert abs(info.audio_duration - info.video_duration) <= 1 / 25 + 1e-6
    frames = np.stack(list(read_frames(out))).astype(np.float32)
    assert frames.shape[0] == info.frames and np.isfinite(frames).all()
    assert frames.reshape(len(frames), -1).mean(axis=1).min() > 20  # no black frames
    motion = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert (motion > 0.05).mean() > 0.5  # the face moves in most frames, it is not frozen


def test_e2e_rebuild_is_cached_then_edit_rebuilds_only_that_video(
    project: Path, first_build: subprocess.CompletedProcess
) -> None:
    again = dhbatch("plan", str(project / "m.yaml"), "--only", "ok", "--json")
    assert again.returncode == 0 and not json.loads(again.stdout)["stale"]
    (project / "m.yaml").write_text(MANIFEST.format(text="Goodbye now, see you soon."))
    edited = json.loads(dhbatch("plan", str(project / "m.yaml"), "--only", "ok", "--json").stdout)
    reasons = {s["stage"]: s["reason"] for s in edited["videos"][0]["steps"] if not s["cached"]}
    assert reasons == {
        "voice": "script text changed",
        "animate": "audio changed",
        "mux": "audio changed; video changed",
    }
