"""renderer.voice with engine gtts, against a local HTTP server that answers like Google Translate's TTS endpoint.

The server speaks the same protocol gTTS parses: a POST of `f.req=<rpc>` answered by a body whose line holds
`jQ1olc","[\\"<base64 MP3>\\"]`. The MP3s are real (libmp3lame via PyAV, 24 kHz mono like Google's).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _audio_util import encode_audio, read_wav, tone

from renderer.base import SAMPLE_RATE, BackendError, ModelPool, StepJob
from renderer.voice import GTTS_URL_ENV, run

pytest.importorskip("gtts")

MP3_RATE = 24_000
NETWORK_HINT = "gTTS needs network access to translate.google.com; use voice engine: piper or hibari"


def gtts_mp3(seconds: float, freq: float = 330.0) -> bytes:
    """A bare MP3 stream like Google's (no ID3 tag or Xing header, so parts can be concatenated)."""
    return encode_audio(
        tone(seconds, MP3_RATE, freq=freq), MP3_RATE, "mp3", "libmp3lame", {"id3v2_version": "0", "write_xing": "0"}
    )


class FakeTranslate:
    """A local stand-in for translate.google.com's batchexecute endpoint.

    `statuses` is the sequence of HTTP statuses to answer with (the last one repeats); a 200 carries `mp3` (or
    `raw_audio` as the audio field), or no audio at all when `mp3` is None. `requests` records the decoded RPC parameters [text, lang, speed, "null"].
    """

    def __init__(self, statuses: list[int], mp3: bytes | None, raw_audio: str | None = None) -> None:
        self.statuses = list(statuses)
        self.mp3 = mp3
        self.raw_audio = raw_audio  # sent in place of the base64 audio (a malformed answer)
        self.requests: list[list[Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                rpc = json.loads(urllib.parse.parse_qs(body)["f.req"][0])
                fake.requests.append(json.loads(rpc[0][0][1]))
                status = fake.statuses.pop(0) if len(fake.statuses) > 1 else fake.statuses[0]
                if status == 200 and fake.mp3 is not None:
                    audio = fake.raw_audio or base64.b64encode(fake.mp3).decode()
                    line = f'[["wrb.fr","jQ1olc","[\\"{audio}\\"]",null,null,null,"generic"]]'
                elif status == 200:
                    line = '[["wrb.fr","jQ1olc",null,null,null,[3],"generic"]]'
                else:
                    line = "error"
                payload = f")]}}'\n\n{len(line)}\n{line}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/_/TranslateWebserverUi/data/batchexecute"

    def __enter__(self) -> FakeTranslate:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """gTTS sends through the environment's proxies; the fake server is local."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield


def gtts_job(tmp_path: Path, text: str = "Hello from the test server.", **settings: Any) -> StepJob:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    voice = {"engine": "gtts", "model": "en_US-joe-medium", "rate": 1.0, "sentence_silence": 0.2}
    voice |= {"noise_scale": 0.0, "noise_w_scale": 0.0, "lang": "en", "tld": "com", "slow": False, **settings}
    return StepJob(
        stage="voice", key="k", settings=voice, inputs={}, out_dir=out_dir, text=text, label="characters.ceo"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gtts_voice_writes_16k_wav_and_no_timings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTranslate([200], gtts_mp3(1.2)) as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path, "Guten Morgen.", lang="de", slow=True)
        (result,) = run([job], ModelPool())
    assert isinstance(result, dict), result
    assert result["engine"] == "gtts"
    assert server.requests == [["Guten Morgen.", "de", True, "null"]]
    samples, rate, channels, width = read_wav(job.out_dir / "speech.wav")
    assert (rate, channels, width) == (SAMPLE_RATE, 1, 2)
    assert len(samples) / rate == pytest.approx(1.2, abs=0.08)  # MP3 adds a little padding
    spectrum = np.abs(np.fft.rfft(samples[:, 0].astype(np.float64)))
    assert np.argmax(spectrum) * rate / len(samples) == pytest.approx(330, abs=3)
    assert json.loads((job.out_dir / "phonemes.json").read_text()) == []


def test_gtts_long_text_is_sent_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "This sentence is long enough. " * 8  # 240 characters: gTTS sends at most 100 per request
    with FakeTranslate([200], gtts_mp3(0.5)) as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path, text)
        (result,) = run([job], ModelPool())
    assert isinstance(result, dict), result
    parts = len(server.requests)
    assert parts >= 3
    # Each part is a separate MP3 whose encoder delay and padding (~50 ms at 24 kHz) stay in the decoded audio.
    assert 0.5 * parts <= result["seconds"] <= 0.6 * parts


def test_gtts_retries_after_429(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTranslate([429, 503, 200], gtts_mp3(0.5)) as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path)
        started = time.monotonic()
        (result,) = run([job], ModelPool(), gtts_backoff=0.01)
        elapsed = time.monotonic() - started
    assert isinstance(result, dict), result
    assert len(server.requests) == 3
    assert 0.03 <= elapsed < 5  # waited 0.01 s then 0.02 s
    assert (job.out_dir / "speech.wav").stat().st_size > 1000


def test_gtts_persistent_500_is_backend_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTranslate([500], gtts_mp3(0.5)) as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path)
        (result,) = run([job], ModelPool(), gtts_backoff=0.001)
    assert isinstance(result, BackendError)
    assert "characters.ceo" in str(result) and "500" in str(result) and "5 tries" in str(result)
    assert "engine: piper" in result.hint
    assert len(server.requests) == 5
    assert list(job.out_dir.iterdir()) == []  # no 0-byte files left behind


def test_gtts_answer_without_audio_is_backend_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTranslate([200], None) as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path, lang="xx")
        (result,) = run([job], ModelPool(), gtts_backoff=0.001)
    assert isinstance(result, BackendError)
    assert "xx" in str(result) and "voice.lang" in result.hint
    assert list(job.out_dir.iterdir()) == []


def test_gtts_connection_refused_gives_network_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GTTS_URL_ENV, f"http://127.0.0.1:{free_port()}/batchexecute")
    job = gtts_job(tmp_path)
    (result,) = run([job], ModelPool(), gtts_backoff=0.001)
    assert isinstance(result, BackendError)
    assert result.hint == NETWORK_HINT
    assert "characters.ceo" in str(result)
    assert list(job.out_dir.iterdir()) == []


def test_gtts_default_endpoint_is_google(monkeypatch: pytest.MonkeyPatch) -> None:
    from renderer.voice import gtts_class

    cls = gtts_class()
    (default,) = cls("Hi.", tld="co.uk", lang_check=False)._prepare_requests()
    assert default.url == "https://translate.google.co.uk/_/TranslateWebserverUi/data/batchexecute"
    (local,) = cls("Hi.", lang_check=False, endpoint="http://127.0.0.1:9/x")._prepare_requests()
    assert local.url == "http://127.0.0.1:9/x"
    assert local.body == default.body


def test_gtts_malformed_answer_is_backend_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTranslate([200], b"", raw_audio="!!not-base64!!") as server:
        monkeypatch.setenv(GTTS_URL_ENV, server.url)
        job = gtts_job(tmp_path)
        (result,) = run([job], ModelPool(), gtts_backoff=0.001)
    assert isinstance(result, BackendError) and "malformed answer" in str(result), result
    assert "characters.ceo" in str(result) and list(job.out_dir.iterdir()) == []
