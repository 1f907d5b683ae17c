"""A real HTTP file server on 127.0.0.1 for download tests: serves in-memory files, honours `Range: bytes=N-`,
and records every request so tests can check what was asked for."""

from __future__ import annotations

import dataclasses
import http.server
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclasses.dataclass
class Request:
    path: str
    headers: dict[str, str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        """As huggingface.co answers a HEAD on /resolve/: for a path with `headers`, a file kept in Git gets a relative
        307 to /api/resolve-cache/... whose 200 carries ETag and X-Repo-Commit; a Git LFS file (X-Linked-Etag in its
        headers) gets a 302 to another host with X-Linked-Etag. Paths without `headers` get a plain 200."""
        self.server.requests.append(Request(f"HEAD {self.path}", {k.lower(): v for k, v in self.headers.items()}))
        if self.path.startswith("/api/resolve-cache"):
            original = self.path.removeprefix("/api/resolve-cache")
            self.send_response(200)
            for name, value in self.server.headers.get(original, {}).items():
                self.send_header(name, value)
            self.send_header("X-Repo-Commit", "0" * 40)
        elif self.path not in self.server.files:
            self.send_error(404, "not found")
            return
        elif extra := self.server.headers.get(self.path):
            if "X-Linked-Etag" in extra:
                self.send_response(302)
                self.send_header("Location", f"https://cdn.invalid{self.path}")
                for name, value in extra.items():
                    self.send_header(name, value)
            else:
                self.send_response(307)
                self.send_header("Location", f"/api/resolve-cache{self.path}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "not found")
            return
        start = 0
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and self.server.ranges:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: Mapping[str, bytes], ranges: bool, headers: Mapping[str, Mapping[str, str]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.headers = dict(headers)
        self.ranges = ranges
        self.requests: list[Request] = []

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextmanager
def file_server(
    files: Mapping[str, bytes], *, ranges: bool = True, headers: Mapping[str, Mapping[str, str]] | None = None
) -> Iterator[_Server]:
    """Serve `files` ({"/url/path": bytes}) in a background thread for the duration of the `with` block; `headers`
    ({"/url/path": {name: value}}) are sent in answer to a HEAD request."""
    server = _Server(files, ranges, headers or {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def canned_server(status: int, body: bytes) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every POST with `status` and `body` (a proxy's error page, something that
    is not the service asked for); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just free), for "server down" tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
