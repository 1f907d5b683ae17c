"""The studio's defences, against a real `dhbatch serve` on 127.0.0.1: the token, uploads checked by decoding, no path
out of the project, no cross-site form posts, everything shown escaped. No build runs here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._web_util import PORTRAIT, REPO, Server, make_project, serve

pytest.importorskip("fastapi")

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("studio-sec"))


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    with serve(project, token=TOKEN) as s:
        yield s


@pytest.fixture
def browser(server: Server) -> Iterator[tuple[httpx.Client, str]]:
    """A client holding the token and CSRF cookies, as a browser would after opening the page; and the CSRF token."""
    with server.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        page = c.get("/new")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        yield c, csrf


def _new(
    c: httpx.Client, csrf: str, headers: dict | None = None, files: dict | None = None, **fields: str
) -> httpx.Response:
    data = {"csrf": csrf, "character": "pick", "pick": "m:eileen", "script": "text", "text": "Hello.", **fields}
    return c.post("/new", data=data, files=files or {"unused": ("", b"")}, headers=headers or {})


def test_web_security_token_required_on_every_request(server: Server) -> None:
    with server.client() as c:
        for path in ("/", "/new", "/api/manifests", "/api/openapi.json", "/api/docs", "/static/studio.js"):
            response = c.get(path)
            assert response.status_code == 401, path
        assert c.get("/api/manifests", headers={"Authorization": "Bearer wrong-token-000000000"}).status_code == 401
        assert c.post("/api/jobs", json={"manifest": "m"}).status_code == 401
        assert c.get("/api/manifests", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # Opening the page once with ?token= leaves a cookie and a URL without the token.
        opened = c.get("/jobs?token=" + TOKEN)
        assert opened.status_code == 303 and opened.headers["location"] == "/jobs"
        assert c.get("/jobs").status_code == 200 and c.get("/static/studio.css").status_code == 200


def test_web_security_other_address_needs_a_token(project: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "batch.cli", "serve", str(project), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.returncode == 2 and "--token" in out.stderr and "Traceback" not in out.stderr


def test_web_security_upload_that_is_not_an_image(server: Server, browser: tuple[httpx.Client, str]) -> None:
    c, csrf = browser
    fake = b"<?php system($_GET['x']); ?>" + b"\0" * 100
    response = _new(c, csrf, character="portrait", files={"portrait": ("face.png", fake, "image/png")})
    assert response.status_code == 422
    assert "face.png is not an image; upload a PNG or JPEG portrait" in response.text
    truncated = PORTRAIT.read_bytes()[:2000]  # a JPEG header, then nothing: only decoding every pixel finds it
    response = _new(c, csrf, character="portrait", files={"portrait": ("cut.jpg", truncated, "image/jpeg")})
    assert response.status_code == 422 and "cut.jpg cannot be decoded" in response.text
    noise = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x07" * 64
    response = _new(c, csrf, script="recording", files={"recording": ("talk.wav", noise, "audio/wav")})
    assert response.status_code == 422 and "talk.wav" in response.text
    too_big = c.post(
        "/api/jobs", content=b"{" + b" " * (40 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert too_big.status_code == 413
    manifests = server.project / "manifests"
    assert not (manifests / "studio.yaml").exists() and not (manifests / "studio").exists()


def test_web_security_no_path_leaves_the_project(server: Server, browser: tuple[httpx.Client, str]) -> None:
    c, csrf = browser
    escaped = _new(c, csrf, id="../../../tmp/owned")
    assert escaped.status_code == 422 and "is not a valid id" in escaped.text
    picked = _new(c, csrf, pick="../../../etc/passwd:root")
    assert picked.status_code == 422 and "no manifest named" in picked.text
    inline = c.post(
        "/api/jobs",
        json={"video": {"character": {"pick": "m:eileen"}, "script": {"text": "hi"}, "voice": {"model": "../../x"}}},
    )
    assert inline.status_code == 422 and "voice.model" in inline.json()["problems"][0]["path"]
    assert not (server.project / "manifests" / "studio.yaml").exists()
    for path in ("/files/m/..%2F..%2F..%2Fetc%2Fpasswd.mp4", "/files/..%2Fmanifests/m.mp4", "/static/..%2Fapp.py"):
        assert c.get(path).status_code == 404, path
    assert c.get("/manifests/..%2F..%2Fetc").status_code == 404
    # A name sent with an upload never picks the file's name on disk.
    ok = _new(
        c, csrf, character="portrait", files={"portrait": ("../../evil.jpg", PORTRAIT.read_bytes(), "image/jpeg")}
    )
    assert ok.status_code == 303, ok.text
    (stored,) = (server.project / "manifests" / "studio" / "portraits").iterdir()
    assert re.fullmatch(r"[0-9a-f]{20}\.jpg", stored.name)
    assert not (server.project.parent / "evil.jpg").exists()
    c.delete(f"/api/jobs/{ok.headers['location'].rsplit('/', 1)[1]}")


def test_web_security_cross_site_form_posts_are_refused(server: Server, browser: tuple[httpx.Client, str]) -> None:
    c, csrf = browser
    evil = {"Origin": "http://evil.example"}
    assert _new(c, csrf, headers=evil).status_code == 403
    assert _new(c, csrf, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert _new(c, csrf, headers={"Referer": "http://evil.example/page"}).status_code == 403
    assert _new(c, "").status_code == 403  # same site, but without the page's token
    assert _new(c, "x" * 43).status_code == 403
    assert c.post("/manifests/m/build", data={"csrf": csrf}, headers=evil).status_code == 403
    assert c.post("/api/jobs", json={"manifest": "nothere"}, headers=evil).status_code == 403
    assert c.delete("/api/jobs/1", headers=evil).status_code == 403
    assert c.post("/api/jobs", content=b'{"manifest": "m"}', headers={"Content-Type": "text/plain"}).status_code == 403
    assert _new(c, csrf, headers={"Origin": server.url}, id="same-site").status_code == 303
    assert c.get("/api/jobs").json()[0]["only"] == ["same-site"]


def test_web_security_html_in_a_script_is_shown_escaped(server: Server, browser: tuple[httpx.Client, str]) -> None:
    c, csrf = browser
    text = 'Hi <img src=x onerror="alert(1)"> & <script>alert(2)</script>'
    made = _new(c, csrf, id="xss", text=text, name="<b>Bold</b>")
    assert made.status_code == 303
    c.delete(f"/api/jobs/{made.headers['location'].rsplit('/', 1)[1]}")
    page = c.get("/manifests/studio").text
    assert "Hi &lt;img src=x onerror=&#34;alert(1)&#34;&gt; &amp; &lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "Content-Security-Policy" in c.get("/manifests/studio").headers
    form = _new(c, csrf, id="bad id <script>", text="x")  # a refused value is shown back escaped too
    assert form.status_code == 422 and "&lt;script&gt;" in form.text and "<script>" not in form.text.split("</head>")[1]


def test_web_security_failed_step_artifact_shown_only_from_the_cache(
    server: Server, browser: tuple[httpx.Client, str]
) -> None:
    """A failed step's artifact (the report names it, e.g. a drawn portrait that failed the face check) is shown beside
    its error; a report naming a file outside the cache gets nothing served."""
    from PIL import Image

    c, _ = browser
    project = server.project
    (project / "manifests" / "f.yaml").write_text(
        "version: 1\ncharacters:\n  a: {image: portraits/astronaut.jpg}\nscripts:\n  s: {text: hi}\n"
        "videos:\n  - {id: fine, character: a, script: s}\n  - {id: drawn, character: a, script: s}\n"
    )
    key = "ab" * 32
    artifact = project / "build" / "cache" / "failed" / "image" / key[:2] / key / "portrait.png"
    artifact.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(artifact)

    def failed(vid: str, path: str) -> dict:
        step = {"stage": "image", "key": key, "status": "failed", "reason": "new", "error": "no face", "artifact": path}
        return {"id": vid, "status": "failed", "renderer": "puppet", "output": None, "error": "image: no face",
                "steps": [step]}  # fmt: skip

    report = {"manifest": "f.yaml", "seconds": 1.0, "device": "cpu", "warnings": 0,
              "summary": {"built": 0, "cached": 0, "failed": 2, "skipped": 0},
              "videos": [failed("fine", "/etc/hostname"), failed("drawn", str(artifact))]}  # fmt: skip
    (project / "build" / "f").mkdir(parents=True)
    (project / "build" / "f" / "report.json").write_text(json.dumps(report))
    page = c.get("/manifests/f").text
    assert '<img class="artifact" src="/files/f/failed/drawn/image"' in page and "image: no face" in page
    shown = c.get("/files/f/failed/drawn/image")
    assert shown.headers["content-type"] == "image/png" and shown.content == artifact.read_bytes()
    assert c.get("/files/f/failed/fine/image").status_code == 404
    assert c.get("/files/f/failed/drawn/voice").status_code == 404
