"""The studio's HTTP API against a real `dhbatch serve` on 127.0.0.1, building with the real offline path (Piper and
the puppet at 256 on one short sentence)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests._web_util import PORTRAIT, REPO, SENTENCE, Server, make_project, serve

pytest.importorskip("fastapi")
pytest.importorskip("piper")
pytest.importorskip("dlib")


class _Hook(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that fails its first call (HTTP 503) and accepts the next ones."""

    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        self.send_response(503 if len(self.calls) == 1 else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hook() -> Iterator[tuple[str, list[dict]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hook.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}/done", _Hook.calls
    server.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("studio-api"))
    (root / "manifests" / "broken.yaml").write_text(
        "version: 1\ncharacters:\n  a: {image: portraits/astronaut.jpg}\nscripts:\n  s: {text: hi}\n"
        "videos:\n  - {id: v, character: a, script: nope}\n"
    )
    return root


MIXED = f"""\
version: 1
defaults:
  video: {{renderer: puppet, size: 256}}
characters:
  eileen: {{name: Eileen, image: portraits/astronaut.jpg, seed: 1}}
  blank: {{image: portraits/blank.png, seed: 1}}
scripts:
  short: {{text: "{SENTENCE}"}}
videos:
  - {{id: good, character: eileen, script: short}}
  - {{id: faceless, character: blank, script: short}}
"""


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    with serve(project, "--webhook-allow", "127.0.0.1") as s:
        yield s


def test_web_api_builds_a_manifest_and_calls_the_webhook(server: Server, hook: tuple[str, list[dict]]) -> None:
    url, calls = hook
    with server.client() as c:
        listed = {m["name"]: m for m in c.get("/api/manifests").json()}
        assert listed["m"]["videos"] == 1 and listed["m"]["last_build"] is None
        assert listed["broken"]["videos"] is None and "unknown script 'nope'" in listed["broken"]["problems"][0]

        created = c.post("/api/jobs", json={"manifest": "m", "webhook": url})
        assert created.status_code == 201, created.text
        job = server.wait_job(c, created.json()["id"], ("done", "failed"))
        assert job["status"] == "done", job
        assert [p["stage"] for p in job["progress"]] == ["voice", "animate", "mux"]
        assert all(p["done"] == p["total"] == 1 for p in job["progress"])
        (video,) = job["videos"]
        assert video["id"] == "eileen-short" and video["status"] == "built" and video["renderer"] == "puppet"
        assert {s["stage"]: s["reason"] for s in video["steps"]} == {"voice": "new", "animate": "new", "mux": "new"}

        mp4 = c.get(video["video_url"])
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        assert mp4.content == (server.project / "build" / "m" / "eileen-short.mp4").read_bytes()
        part = c.get(video["video_url"], headers={"Range": "bytes=0-99"})  # what a <video> element asks for
        assert part.status_code == 206 and len(part.content) == 100
        assert c.get(video["thumbnail_url"]).headers["content-type"] == "image/png"

        (videos,) = [m["last_build"]["videos"] for m in c.get("/api/manifests").json() if m["name"] == "m"]
        assert videos[0]["status"] == "built"
        gallery = c.get("/api/manifests/m/videos").json()
        assert gallery[0]["id"] == "eileen-short" and gallery[0]["video_url"]

        deadline = time.monotonic() + 30  # the webhook: one 503, then delivered on the retry
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(calls) == 2 and calls[1]["id"] == job["id"] and calls[1]["status"] == "done"
        assert calls[1]["videos"][0]["video_url"] == video["video_url"]
        job = server.wait_job(c, job["id"], ("done",))
        for _ in range(50):
            if job["webhook_status"]:
                break
            time.sleep(0.1)
            job = c.get(f"/api/jobs/{job['id']}").json()
        assert job["webhook_status"].startswith("delivered (HTTP 200, attempt 2)")


def test_web_api_inline_video_is_written_to_the_studio_manifest(server: Server) -> None:
    portrait = base64.b64encode(PORTRAIT.read_bytes()).decode()
    body = {
        "video": {
            "id": "hello-api",
            # The portrait, seed and sentence of m.yaml's video: the build reuses its steps from the cache.
            "character": {"portrait": portrait, "portrait_filename": "me.jpg", "name": "Ann", "seed": 1},
            "script": {"text": SENTENCE},
            "voice": {"engine": "piper"},
        }
    }
    with server.client() as c:
        created = c.post("/api/jobs", json=body)
        assert created.status_code == 201, created.text
        job = server.wait_job(c, created.json()["id"], ("done", "failed"))
        assert job["status"] == "done" and job["manifest"] == "studio" and job["only"] == ["hello-api"], job
        assert job["videos"][0]["status"] == "cached" and job["videos"][0]["video_url"].startswith("/files/studio/")
        again = c.post("/api/jobs", json=body)
        assert again.status_code == 422 and again.json()["problems"][0]["field"] == "id"

    studio = server.project / "manifests" / "studio.yaml"
    data = yaml.safe_load(studio.read_text())
    (entry,) = data["videos"]
    assert entry == {"id": "hello-api", "character": "hello-api", "script": "hello-api",
                     "overrides": {"voice": {"engine": "piper"}}}  # fmt: skip
    image = studio.parent / data["characters"]["hello-api"]["image"]
    assert image.read_bytes() == PORTRAIT.read_bytes() and image.parent == studio.parent / "studio" / "portraits"
    # Reproducible: the CLI sees the same video, up to date.
    plan = subprocess.run(
        [sys.executable, "-m", "batch.cli", "plan", str(studio), "--build-dir", str(server.project / "build")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "hello-api (puppet): up to date" in plan.stdout


def test_web_api_inline_video_with_a_recording(server: Server) -> None:
    sample_rate, seconds = 22050, 1.2
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    recording = base64.b64encode(buf.getvalue()).decode()
    body = {
        "video": {"character": {"pick": "m:eileen"}, "script": {"recording": recording, "recording_filename": "hi.wav"}}
    }
    with server.client() as c:
        created = c.post("/api/jobs", json=body)
        assert created.status_code == 201, created.text
        job = server.wait_job(c, created.json()["id"], ("done", "failed"))
    assert job["status"] == "done", job
    assert [s["stage"] for s in job["videos"][0]["steps"]] == ["audio", "animate", "mux"]
    data = yaml.safe_load((server.project / "manifests" / "studio.yaml").read_text())
    audio = data["scripts"][job["only"][0]]["audio"]
    assert (server.project / "manifests" / audio).read_bytes() == buf.getvalue()


def test_web_api_refuses_bad_jobs_with_located_problems(server: Server) -> None:
    with server.client() as c:
        broken = c.post("/api/jobs", json={"manifest": "broken"})
        assert broken.status_code == 422
        (problem,) = broken.json()["problems"]
        assert problem["file"].endswith("broken.yaml") and problem["line"] == 7 and "nope" in problem["message"]
        assert "no video id matches" in c.post("/api/jobs", json={"manifest": "m", "only": ["zz"]}).json()["error"]
        assert "not a stage" in c.post("/api/jobs", json={"manifest": "m", "force": ["paint"]}).json()["error"]
        hook = c.post("/api/jobs", json={"manifest": "m", "webhook": "http://example.com/x"})
        assert hook.status_code == 422 and "--webhook-allow example.com" in hook.json()["error"]
        assert c.post("/api/jobs", json={"manifest": "nothere"}).status_code == 422
        both = c.post("/api/jobs", json={"manifest": "m", "video": {"character": {}, "script": {}}})
        assert both.status_code == 422 and "either" in both.json()["problems"][0]["message"]
        assert c.get("/api/jobs/999").status_code == 404
        # Without a token the server answers to loopback names only: a DNS name rebound to 127.0.0.1 gets nothing.
        assert c.get("/api/manifests", headers={"Host": "evil.example:8000"}).status_code == 403
        assert c.get("/api/manifests", headers={"Host": "localhost"}).status_code == 200
        assert "/api/jobs" in c.get("/api/openapi.json").json()["paths"]


def test_web_pages_show_the_manifests_gallery_and_jobs(server: Server) -> None:
    with server.client() as c:
        jobs = c.get("/api/jobs").json()
        job, studio_job = jobs[-1], next(j for j in jobs if j["only"] == ["hello-api"])
        video_url = job["videos"][0]["video_url"]
        for path, expected in [
            ("/", ['href="/manifests/m"', "/files/m/thumbs/eileen-short.png", "unknown script"]),
            ("/manifests/m", [f'src="{video_url}"', "eileen-short", "renderer <b>puppet</b>", SENTENCE]),
            ("/manifests/broken", ["unknown script &#39;nope&#39;"]),
            ("/new", ['value="m:eileen"', 'name="csrf"', "piper · en_US-joe-medium"]),
            ("/jobs", [f'href="/jobs/{job["id"]}"']),
            (f"/jobs/{job['id']}", [f'src="{video_url}"', "$ dhbatch build manifests/m.yaml"]),
            (f"/jobs/{studio_job['id']}", ["Saved in <code>manifests/studio.yaml</code> as <code>hello-api</code>"]),
            ("/api/docs", ["/api/jobs/{job_id}", "JobIn"]),
        ]:
            page = c.get(path, headers={"Accept": "text/html"})
            assert page.status_code == 200, (path, page.text)
            for text in expected:
                assert text in page.text, (path, text)
        missing = c.get("/jobs/999", headers={"Accept": "text/html"})
        assert missing.status_code == 404 and "<h1>Error 404</h1>" in missing.text


def test_web_api_failed_video_comes_first_with_its_reason(server: Server) -> None:
    from PIL import Image

    Image.new("RGB", (320, 320), (200, 190, 180)).save(server.project / "manifests" / "portraits" / "blank.png")
    (server.project / "manifests" / "mixed.yaml").write_text(MIXED)
    with server.client() as c:
        job = server.wait_job(c, c.post("/api/jobs", json={"manifest": "mixed"}).json()["id"], ("done", "failed"))
        assert job["status"] == "failed" and job["exit_code"] == 1
        assert job["error"].startswith("1 of 2 videos failed: faceless: animate:") and "no face" in job["error"]
        assert [(v["id"], v["status"]) for v in job["videos"]] == [("faceless", "failed"), ("good", "cached")]
        page = c.get(f"/jobs/{job['id']}", headers={"Accept": "text/html"}).text
        assert page.index("faceless") < page.index("good") and "no face found" in page
        gallery = c.get("/manifests/mixed", headers={"Accept": "text/html"}).text
        assert gallery.index('id="video-faceless"') < gallery.index('id="video-good"')
        assert "Build faceless" in gallery  # what the next build would run, for the failed one


WRITTEN = """\
version: 1
defaults:
  llm: {engine: none}
  video: {renderer: puppet, size: 256}
characters:
  eileen: {name: Eileen, image: portraits/astronaut.jpg, seed: 1}
scripts:
  refunds: {brief: "How refunds work", sources: [docs/refunds.md], words: 20}
videos:
  - {id: eileen-refunds, character: eileen, script: refunds}
"""


def test_web_gallery_shows_a_written_script_with_its_sources(server: Server) -> None:
    """A script written from documents: before its build the gallery says the next build writes it; after, the
    page and the API show the script, sentence by sentence with the lines each cites."""
    import shutil

    docs = server.project / "manifests" / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copy(REPO / "tests" / "fixtures" / "corpus" / "refunds.md", docs / "refunds.md")
    (server.project / "manifests" / "written.yaml").write_text(WRITTEN)
    with server.client() as c:
        (before,) = c.get("/api/manifests/written/videos").json()
        assert before["script"] is None and "written from its documents by the next build" in before["says"]
        job = server.wait_job(c, c.post("/api/jobs", json={"manifest": "written"}).json()["id"], ("done", "failed"))
        assert job["status"] == "done", job
        (after,) = c.get("/api/manifests/written/videos").json()
        sentences = after["script"]["sentences"]
        assert after["says"] == after["script"]["text"] and after["says"].startswith("You can return any product")
        assert any(c["where"].startswith("docs/refunds.md:") for s in sentences for c in s["cites"])
        page = c.get("/manifests/written", headers={"Accept": "text/html"}).text
        assert "written from documents" in page and '<code class="cite">docs/refunds.md:' in page


# Last: it stops the module's server.
def test_web_api_one_build_at_a_time_cancel_and_history_after_restart(server: Server, project: Path) -> None:
    with server.client() as c:
        first = c.post("/api/jobs", json={"manifest": "m", "force": ["mux"]}).json()
        second = c.post("/api/jobs", json={"manifest": "m", "force": ["mux"]}).json()
        server.wait_job(c, first["id"], ("running",))
        waiting = c.get(f"/api/jobs/{second['id']}").json()
        assert waiting["status"] == "queued" and waiting["position"] == 1
        cancelled = c.delete(f"/api/jobs/{second['id']}").json()
        assert cancelled["status"] == "cancelled"
        assert server.wait_job(c, first["id"], ("done", "failed"))["status"] == "done"
        rerun = c.post(f"/api/jobs/{second['id']}/rerun").json()
        assert rerun["rerun_of"] == second["id"] and rerun["force"] == ["mux"]
        server.wait_job(c, rerun["id"], ("running",))
        assert c.delete(f"/api/jobs/{rerun['id']}").status_code == 200  # a running build: SIGTERM
        assert server.wait_job(c, rerun["id"], ("done", "failed", "cancelled"))["status"] == "cancelled"
        before = c.get("/api/jobs").json()
    assert (project / "build" / ".studio" / "jobs.sqlite3").is_file()  # beside the outputs, in no manifest's folder
    server.proc.terminate()
    server.proc.wait(timeout=30)
    with serve(project) as again, again.client() as c:
        after = c.get("/api/jobs").json()
        assert [(j["id"], j["status"]) for j in after] == [(j["id"], j["status"]) for j in before]
        assert c.get(f"/api/jobs/{first['id']}/log").text.startswith("$ dhbatch build manifests/m.yaml --force mux")
