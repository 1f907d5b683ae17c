"""The studio's webhook calls (batch/web/jobs.py): trusted hosts only, retried with back-off, never redirected."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from batch.web.jobs import post_webhook, webhook_problem


class _Answers(http.server.BaseHTTPRequestHandler):
    answers: list[tuple[int, dict[str, str]]] = []
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.path)
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        self.send_response(status)
        for name, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Answers.answers, _Answers.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_web_jobs_webhook_hosts_must_be_trusted() -> None:
    assert webhook_problem("http://127.0.0.1:9/x", ["127.0.0.1"]) is None
    assert webhook_problem("https://Hooks.Example.com/x", ["hooks.example.com"]) is None
    assert "--webhook-allow evil.com" in webhook_problem("http://evil.com/x", ["127.0.0.1"])
    assert "host '127.0.0.1.evil.com' is not trusted" in webhook_problem(
        "http://127.0.0.1@127.0.0.1.evil.com/", ["127.0.0.1"]
    )
    assert "http:// or https://" in webhook_problem("file:///etc/passwd", ["127.0.0.1"])
    assert "not a URL" in webhook_problem("http://127.0.0.1:99999/", ["127.0.0.1"])


def test_web_jobs_webhook_retries_then_gives_up_and_never_follows_redirects(receiver: str) -> None:
    _Answers.answers = [(500, {}), (503, {})]
    assert post_webhook(f"{receiver}/a", b"{}", backoff=0.01) == "delivered (HTTP 200, attempt 3)"
    _Answers.answers = [(500, {})] * 3
    assert post_webhook(f"{receiver}/b", b"{}", attempts=3, backoff=0.01) == "failed after 3 attempts (HTTP 500)"
    _Answers.answers = [(307, {"Location": f"{receiver}/elsewhere"})]
    assert post_webhook(f"{receiver}/c", b"{}", backoff=0.01).startswith("refused (HTTP 307")
    assert "/elsewhere" not in _Answers.seen
    assert post_webhook("http://127.0.0.1:1/closed", b"{}", attempts=2, backoff=0.01).startswith("failed after 2")
