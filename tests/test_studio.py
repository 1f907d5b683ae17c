"""The studio manifest (batch/studio.py): what the new-video form writes, and what it refuses. No server, no build."""

from __future__ import annotations

import io
import math
import shutil
import struct
import wave
from pathlib import Path

import pytest
import yaml

from batch.errors import ManifestError
from batch.manifest import load_manifest
from batch.studio import NewVideo, Studio, StudioError, Upload

REPO = Path(__file__).resolve().parent.parent
PORTRAIT = REPO / "manifests" / "portraits" / "astronaut.jpg"


@pytest.fixture
def studio(tmp_path: Path) -> Studio:
    manifests = tmp_path / "manifests"
    (manifests / "portraits").mkdir(parents=True)
    shutil.copy(PORTRAIT, manifests / "portraits" / "a.jpg")
    (manifests / "team.yaml").write_text(
        "version: 1\ncharacters:\n  eve: {name: Eve, image: portraits/a.jpg, seed: 4, voice: {rate: 1.2}}\n"
        "  max: {description: a tall man, seed: 2}\nscripts:\n  s: {text: hi}\nmatrix: {characters: all, scripts: all}\n"
    )
    return Studio(manifests, tmp_path / "build" / ".studio")


def _wav(seconds: float, amplitude: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        n = int(seconds * 22050)
        w.writeframes(b"".join(struct.pack("<h", int(amplitude * 32767 * math.sin(i / 8))) for i in range(n)))
    return buf.getvalue()


def test_studio_writes_reproducible_entries(studio: Studio) -> None:
    assert [c.value for c in studio.characters()] == ["team:eve", "team:max"]
    assert studio.add_video(NewVideo(pick="team:eve", text="Hello {{ character.name }}.")) == "eve-1"
    assert (
        studio.add_video(NewVideo(name="Kim", portrait=Upload("me.jpg", PORTRAIT.read_bytes()), text="Hi.")) == "kim-1"
    )
    assert (
        studio.add_video(NewVideo(id="drawn", description="a painter", seed=9, text="Yo.", voice={"rate": 0.9}))
        == "drawn"
    )
    assert studio.add_video(NewVideo(pick="studio:kim-1", text="Again.")) == "kim-2"  # a studio character is reused
    data = yaml.safe_load(studio.path.read_text())
    assert data["characters"]["eve-1"] == {"name": "Eve", "image": "portraits/a.jpg", "seed": 4, "voice": {"rate": 1.2}}
    assert data["characters"]["kim-1"]["image"].startswith("studio/portraits/")
    assert data["characters"]["drawn"] == {"description": "a painter", "seed": 9}
    assert [(v["id"], v["character"]) for v in data["videos"]] == [
        ("eve-1", "eve-1"),
        ("kim-1", "kim-1"),
        ("drawn", "drawn"),
        ("kim-2", "kim-1"),
    ]
    assert data["videos"][2]["overrides"] == {"voice": {"rate": 0.9}}
    manifest = load_manifest(studio.path)  # a manifest like any other
    assert manifest.characters["kim-1"].image.read_bytes() == PORTRAIT.read_bytes()
    assert sorted(p.name for p in studio.manifests_dir.iterdir()) == ["portraits", "studio", "studio.yaml", "team.yaml"]


def test_studio_refused_entry_leaves_the_manifest_as_it_was(studio: Studio) -> None:
    studio.add_video(NewVideo(pick="team:eve", text="Fine."))
    before = studio.path.read_bytes()
    with pytest.raises(ManifestError) as err:
        studio.add_video(NewVideo(pick="team:eve", text="Broken {{ oops("))
    (problem,) = err.value.problems
    assert problem.file.endswith("manifests/studio.yaml") and problem.line > 0 and "template syntax" in problem.message
    with pytest.raises(ManifestError, match="voice.engine"):
        studio.add_video(NewVideo(pick="team:eve", text="x", voice={"engine": "espeak"}))
    with pytest.raises(StudioError) as err:
        studio.add_video(NewVideo(id="eve-1", pick="team:eve", text="x"))  # taken
    assert err.value.problems[0][0] == "id"
    for bad in (
        NewVideo(text="x"),  # no character
        NewVideo(pick="team:eve", description="y", text="x"),  # two
        NewVideo(pick="team:eve"),  # no script
        NewVideo(id="a/../b", pick="team:eve", text="x"),
        NewVideo(pick="../team:eve", text="x"),
        NewVideo(pick="team:nobody", text="x"),
    ):
        with pytest.raises(StudioError):
            studio.add_video(bad)
    assert studio.path.read_bytes() == before
    assert sorted(p.name for p in studio.manifests_dir.iterdir()) == ["portraits", "studio.yaml", "team.yaml"]


def test_studio_uploads_are_decoded_before_they_are_kept(studio: Studio) -> None:
    from PIL import Image

    tiny = io.BytesIO()
    Image.new("RGB", (32, 32)).save(tiny, "PNG")
    gif = io.BytesIO()
    Image.new("RGB", (128, 128)).save(gif, "GIF")
    for name, data, message in [
        ("t.png", tiny.getvalue(), "32×32"),
        ("a.gif", gif.getvalue(), "is a GIF image"),
        ("x.jpg", b"\xff\xd8\xff" + b"\0" * 50, "not an image"),
        ("big.jpg", b"\0" * (10 * 1024 * 1024 + 1), "the limit is 10.0 MB"),
    ]:
        with pytest.raises(StudioError, match=message):
            studio.add_video(NewVideo(portrait=Upload(name, data), text="x"))
    pytest.importorskip("av")
    with pytest.raises(StudioError, match="silent"):
        studio.add_video(NewVideo(pick="team:eve", recording=Upload("quiet.wav", _wav(0.5, 0.0))))
    with pytest.raises(StudioError, match="upload a .wav"):
        studio.add_video(NewVideo(pick="team:eve", recording=Upload("talk.exe", _wav(0.5, 0.5))))
    assert not studio.path.exists()
    vid = studio.add_video(NewVideo(pick="team:eve", recording=Upload("talk.wav", _wav(0.5, 0.5))))
    script = yaml.safe_load(studio.path.read_text())["scripts"][vid]
    assert script["audio"].startswith("studio/recordings/") and script["audio"].endswith(".wav")


def test_studio_manifest_broken_by_hand_is_reported_not_overwritten(studio: Studio) -> None:
    studio.path.write_text("version: 1\nvideos: [{id: a, character: nobody, script: s}]\n")
    with pytest.raises(ManifestError, match="unknown character 'nobody'"):
        studio.add_video(NewVideo(pick="team:eve", text="x"))
    assert "nobody" in studio.path.read_text()
    assert [c.manifest for c in studio.characters()] == ["team", "team"]  # an invalid manifest offers none


def test_studio_checks_a_new_video_as_validate_does(tmp_path: Path) -> None:
    """With a build folder, what would fail the build before rendering is refused at once: a portrait without a face,
    a drawn character without Stable Diffusion's weights."""
    pytest.importorskip("dlib")
    from PIL import Image

    manifests = tmp_path / "manifests"
    manifests.mkdir()
    studio = Studio(
        manifests, tmp_path / "build" / ".studio", build_dir=tmp_path / "build", checkpoints=tmp_path / "ck"
    )
    blank = io.BytesIO()
    Image.new("RGB", (320, 320), (200, 190, 180)).save(blank, "PNG")
    with pytest.raises(ManifestError) as err:
        studio.add_video(NewVideo(portrait=Upload("wall.png", blank.getvalue()), text="Hello."))
    (problem,) = err.value.problems
    assert problem.file.endswith("studio.yaml") and "no face" in problem.message
    with pytest.raises(ManifestError, match="stable-diffusion"):
        studio.add_video(NewVideo(description="a robot", text="Hello.", voice={"engine": "piper"}))
    assert not studio.path.exists()
    assert studio.add_video(NewVideo(portrait=Upload("me.jpg", PORTRAIT.read_bytes()), text="Hello.")) == "video-1"
