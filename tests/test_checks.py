"""Fail before rendering: `dhbatch validate` and `plan` find, in one pass and located, what would fail the build:
portraits (no face, two faces, a tiny face, a face turned away, an unreadable file), recordings, missing weights,
and an Ollama model a reachable server lacks. Face checks are cached by file content."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np

from batch.jsonout import schema
from tests._audio_util import tone, write_wav
from tests._ollama import FakeOllama

ROOT = Path(__file__).resolve().parents[1]
PORTRAITS = Path(__file__).parent / "fixtures" / "portraits"


def dhbatch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, check=False
    )


def findings(stderr: str) -> list[str]:
    """The finding lines (`error: …` / `warning: …`), without their hints."""
    return [line for line in stderr.splitlines() if line.startswith(("error: m.yaml", "warning: m.yaml"))]


def test_checks_validate_verdicts_on_fixture_portraits(tmp_path: Path) -> None:
    """One pass, every verdict located at its character, with the detector's score; a re-validate reads the cached
    measurements (dlib made unimportable: the same verdicts come back)."""
    for name in ("profile.jpg", "two_faces.jpg", "tiny_face.jpg", "no_face.jpg"):
        shutil.copy(PORTRAITS / name, tmp_path / name)
    shutil.copy(ROOT / "manifests" / "portraits" / "grace_hopper.jpg", tmp_path / "grace.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "m.yaml").write_text(
        "version: 1\n"
        "characters:\n"
        "  grace: {image: grace.jpg}\n"
        "  profile: {image: profile.jpg}\n"
        "  pair: {image: two_faces.jpg}\n"
        "  tiny: {image: tiny_face.jpg}\n"
        "  cup: {image: no_face.jpg}\n"
        "  broken: {image: broken.png}\n"
        "scripts:\n  hi: {text: hello}\n"
        "matrix: {characters: all, scripts: all}\n"
    )
    first = dhbatch("validate", "m.yaml", cwd=tmp_path)
    assert first.returncode == 2, first.stderr
    expected = [
        "error: m.yaml:4:3: characters.profile.image: the face in profile.jpg is turned 40° away from the camera "
        "(detector score 0.40); the animators need a face within 35°",
        "warning: m.yaml:5:3: characters.pair.image: 2 faces in two_faces.jpg: only the best (detector score 1.32) "
        "is animated; the others score 1.27",
        "error: m.yaml:6:3: characters.tiny.image: the face in tiny_face.jpg is too small: 43 px wide at (280, 233); "
        "at least 64 px (detector score 1.48)",
        "error: m.yaml:7:3: characters.cup.image: no face found in no_face.jpg (300×200)",
        "error: m.yaml:8:3: characters.broken.image: cannot decode the image broken.png",
    ]
    assert findings(first.stderr) == expected
    assert "m.yaml: 4 problems would fail the build" in first.stderr
    assert "hint: use a portrait that looks into the camera" in first.stderr
    assert "Traceback" not in first.stderr and "grace" not in first.stderr  # the frontal portrait passes
    cached = sorted(p.name for p in (tmp_path / "build" / "cache" / "checks" / "portrait-v1").iterdir())
    assert len(cached) == 6 and all(n.endswith(".json") for n in cached)

    blocker = tmp_path / "no-dlib"
    blocker.mkdir()
    (blocker / "dlib.py").write_text("raise ImportError('dlib is not to be loaded on a re-validate')\n")
    again = dhbatch("validate", "m.yaml", cwd=tmp_path, env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert findings(again.stderr) == expected, again.stderr


def test_checks_recordings_and_missing_weights_are_listed_with_how_to_get_them(tmp_path: Path) -> None:
    shutil.copy(ROOT / "manifests" / "portraits" / "grace_hopper.jpg", tmp_path / "grace.jpg")
    write_wav(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    write_wav(tmp_path / "ok.wav", tone(0.5, 16000), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "m.yaml").write_text(
        "version: 1\n"
        "defaults:\n  llm: {engine: none}\n"
        "characters:\n"
        "  grace: {image: grace.jpg}\n"
        "  ceo: {description: a CEO}\n"
        "scripts:\n"
        "  quiet: {audio: silent.wav}\n"
        "  broken: {audio: broken.wav}\n"
        "  fine: {audio: ok.wav}\n"
        "  hi: {text: hello}\n"
        "videos:\n"
        "  - {id: q, character: grace, script: quiet}\n"
        "  - {id: b, character: grace, script: broken}\n"
        "  - {id: f, character: grace, script: fine}\n"
        "  - {id: drawn, character: ceo, script: fine}\n"
        "  - id: full\n    character: grace\n    script: hi\n"
        "    overrides: {video: {renderer: sadtalker, enhancer: gfpgan}, voice: {model: en_GB-alan-low}}\n"
    )
    out = dhbatch("validate", "m.yaml", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = findings(out.stderr)
    assert lines[:2] == [
        "error: m.yaml:6:3: characters.ceo: Stable Diffusion weights missing: 13 files under "
        "checkpoints/stable-diffusion-2-1-base/ (model_index.json, feature_extractor/preprocessor_config.json, "
        "scheduler/scheduler_config.json, text_encoder/config.json and 9 more)",
        "error: m.yaml:8:3: scripts.quiet.audio: silent.wav is silent (peak 0.00e+00 of full scale over 1.00 s)",
    ]
    assert lines[2].startswith("error: m.yaml:9:3: scripts.broken.audio: cannot decode audio broken.wav: ")
    assert lines[3:] == [
        "error: m.yaml:17:5: videos.full: Piper voice 'en_GB-alan-low' missing: 2 files under checkpoints/ "
        "(piper/en_GB-alan-low.onnx, piper/en_GB-alan-low.onnx.json)",
        "error: m.yaml:17:5: videos.full: SadTalker weights missing: 2 files under checkpoints/ "
        "(SadTalker_V0.0.2_256.safetensors, mapping_00229-model.pth.tar)",
        "error: m.yaml:17:5: videos.full: GFPGAN weights missing: 3 files under checkpoints/ (gfpgan/GFPGANv1.4.pth, "
        "gfpgan/detection_Resnet50_Final.pth, gfpgan/parsing_parsenet.pth)",
    ]
    # Outside the repository: the module's own command, with the folder to fill.
    assert "hint: run `python -m renderer.checkpoints --dest checkpoints --only sd` (`make checkpoints` in the " in (
        out.stderr
    )
    # Inside a checkout (a Makefile that knows `make checkpoints`): `make checkpoints` first.
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    inside = dhbatch("validate", "m.yaml", cwd=tmp_path)
    assert "hint: run `make checkpoints` (or `python -m renderer.checkpoints --dest checkpoints --only sadtalker`)" in (
        inside.stderr
    )
    # validate's and plan's JSON carry the same problems, and match their shipped schemas.
    checked = json.loads(dhbatch("validate", "m.yaml", "--json", cwd=tmp_path).stdout)
    jsonschema.Draft202012Validator(schema("validate")).validate(checked)
    assert checked["exit_code"] == 2 and len(checked["problems"]) == 6
    planned = dhbatch("plan", "m.yaml", "--json", cwd=tmp_path)
    assert planned.returncode == 1
    data = json.loads(planned.stdout)
    jsonschema.Draft202012Validator(schema("plan")).validate(data)
    problems = data["problems"]
    assert problems == checked["problems"]
    assert [(p["severity"], p["line"], p["path"]) for p in problems][:3] == [
        ("error", 6, "characters.ceo"),
        ("error", 8, "scripts.quiet.audio"),
        ("error", 9, "scripts.broken.audio"),
    ]
    assert all(p["hint"] for p in problems)


def test_checks_ollama_model_the_server_lacks(tmp_path: Path) -> None:
    server = FakeOllama(tmp_path, "--model", "llama3.2:1b", "--model", "gemma:2b")
    (tmp_path / "m.yaml").write_text(
        "version: 1\n"
        "defaults:\n  llm: {engine: ollama}\n  image: {model: stable-diffusion-2-1-base}\n"
        "characters:\n"
        "  ceo: {description: a CEO}\n"
        "  cto: {description: a CTO, overrides: {llm: {model: mistral}}}\n"
        "  cfo: {description: a CFO, overrides: {llm: {model: 'llama3.2:1b'}}}\n"
        "scripts:\n  hi: {text: hello}\n"
        "matrix: {characters: all, scripts: all}\n"
    )
    try:
        out = dhbatch("validate", "m.yaml", cwd=tmp_path, env={"OLLAMA_HOST": server.host})
        down = dhbatch("validate", "m.yaml", cwd=tmp_path, env={"OLLAMA_HOST": "127.0.0.1:9"})
    finally:
        server.stop()
    ollama = [line for line in findings(out.stderr) if "Ollama" in line]
    assert ollama == [
        f"error: m.yaml:7:3: characters.cto: the Ollama server at {server.host} has no model 'mistral' (it has: "
        "gemma:2b, llama3.2:1b)"
    ]
    assert "hint: run `ollama pull mistral`" in out.stderr
    unreachable = [line for line in findings(down.stderr) if "Ollama" in line]
    assert unreachable == [
        "warning: m.yaml:6:3: characters.ceo, characters.cto, characters.cfo: cannot reach the Ollama server at "
        "127.0.0.1:9: the models asked for (gemma:2b, mistral, llama3.2:1b) were not checked, and the prompt steps "
        "fail unless the server runs during the build"
    ]
