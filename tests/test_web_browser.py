"""The studio in a real browser: Debian's Chromium driven by Playwright against a real `dhbatch serve`, building with
the real offline path (Piper, the puppet at 256). A person's path: a portrait and a sentence → a video that plays."""

from __future__ import annotations

import json
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests._web_util import PORTRAIT, SENTENCE, Server, make_project, serve

pytest.importorskip("fastapi")
pytest.importorskip("piper")
pytest.importorskip("dlib")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the test extra)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "Debian's chromium is not installed (no /usr/bin/chromium): `apt-get install chromium`, or `make browser` as "
        "root; the browser tests never download a browser",
        allow_module_level=True,
    )
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(make_project(tmp_path_factory.mktemp("studio-browser"))) as s:
        yield s


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(90_000)
        yield page
        browser.close()


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def test_web_browser_makes_a_video_from_a_portrait_and_a_sentence(
    server: Server, page: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page.goto(f"{server.url}/new")
    page.set_input_files("input[name=portrait]", str(PORTRAIT))  # picking a file selects "Upload a portrait"
    assert page.is_checked("input[name=character][value=portrait]")
    page.fill("input[name=name]", "Ada")
    page.fill("textarea[name=text]", SENTENCE)
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs/*")
    page.wait_for_selector("#job[data-status=done]")  # the page follows the job and shows the result when it ends
    video = page.locator("video").first
    page.wait_for_function("document.querySelector('video').readyState >= 1")  # the player loaded its metadata
    duration = video.evaluate("v => v.duration")
    page.wait_for_function("document.querySelector('video').readyState >= 2")  # and a frame to show
    page.wait_for_timeout(1500)  # the player's loading spinner fades out
    shot = tmp_path_factory.mktemp("screenshots") / "studio-job-done.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    studio = server.project / "manifests" / "studio.yaml"
    data = yaml.safe_load(studio.read_text())
    assert data["videos"] == [
        {
            "id": "ada-1",
            "character": "ada-1",
            "script": "ada-1",
            "overrides": {"voice": {"engine": "piper", "rate": 1.0}},
        }
    ]
    assert data["scripts"]["ada-1"] == {"text": SENTENCE}
    assert (studio.parent / data["characters"]["ada-1"]["image"]).read_bytes() == PORTRAIT.read_bytes()
    report = json.loads((server.project / "build" / "studio" / "report.json").read_text())
    (voice,) = [s for s in report["videos"][0]["steps"] if s["stage"] == "voice"]
    wav = server.project / "build" / "cache" / "steps" / "voice" / voice["key"][:2] / voice["key"] / "speech.wav"
    assert abs(duration - _wav_seconds(wav)) < 0.1, (duration, _wav_seconds(wav))
    assert video.get_attribute("src").startswith("/files/studio/ada-1.mp4")


def test_web_browser_cancels_a_running_job(server: Server, page: object) -> None:
    page.goto(f"{server.url}/new")
    page.check("input[name=character][value=pick]")
    page.select_option("select[name=pick]", "m:eileen")
    page.fill("textarea[name=text]", " ".join([SENTENCE, "We make videos from a portrait and a script."] * 12))
    page.click("details.more summary")  # the video id is tucked away
    page.fill("input[name=id]", "long-one")
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs/*")
    page.wait_for_selector("#progress .stage")  # the build is running a stage
    page.click("#cancel button")
    page.wait_for_selector("#job[data-status=cancelled]")
    assert page.locator("#job-status").inner_text().strip() == "cancelled"
    assert not (server.project / "build" / "studio" / "long-one.mp4").exists()
    tmp = server.project / "build" / "cache" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())  # the build left nothing half-written
    assert page.is_visible("text=Run again")
