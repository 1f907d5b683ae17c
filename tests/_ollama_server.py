"""A small stand-in for the Ollama HTTP API, run as a subprocess by tests/test_llm.py.

It speaks the parts of the API the `ollama` client uses for `generate` and `list`: POST /api/generate (one JSON
object when the request says "stream": false, NDJSON chunks otherwise), GET /api/tags and GET /. Unknown models get
Ollama's 404 {"error": "model 'x' not found"}. Every request body is appended as one JSON line to --log, so a test
can check what the client really sent. The server binds 127.0.0.1 on a free port, prints the port on its first
stdout line, and exits by itself after --lifetime seconds.

The answer text is --reply with "{seed}" and "{temperature}" replaced by the request's options, so a test can see
that the options arrived and that the stage cleans what comes back. With --replies FILE (a JSON list of
{"when": TEXT, "reply": TEXT}), a request whose prompt contains a rule's "when" gets that rule's reply instead (the
first that matches), so one server can answer several scripts of a build differently.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def make_handler(
    models: list[str], reply: str, log: Path, delay: float, rules: list[dict] | None = None
) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _record(self, body: object) -> None:
            with lock, log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"method": self.command, "path": self.path, "body": body}) + "\n")

        def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, obj: object) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._record(None)
            if self.path == "/":
                self._send(200, b"Ollama is running", "text/plain")
            elif self.path == "/api/tags":
                self._json(200, {"models": [{"name": m, "model": m, "modified_at": _now(), "size": 1} for m in models]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._json(400, {"error": "invalid JSON"})
                return
            self._record(body)
            if self.path != "/api/generate":
                self._json(404, {"error": "not found"})
                return
            model = body.get("model", "")
            if model not in models:
                self._json(404, {"error": f"model '{model}' not found"})
                return
            if delay:
                time.sleep(delay)
            options = body.get("options") or {}
            prompt = str(body.get("prompt", ""))
            chosen = next((r["reply"] for r in rules or [] if r["when"] in prompt), reply)
            text = chosen.replace("{seed}", str(options.get("seed"))).replace(
                "{temperature}", str(options.get("temperature"))
            )
            base = {"model": model, "created_at": _now()}
            if body.get("stream", True):
                # Ollama streams newline-delimited JSON: one fragment per chunk, then a final done record.
                pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
                lines = [json.dumps({**base, "response": p, "done": False}) for p in pieces]
                lines.append(json.dumps({**base, "response": "", "done": True, "done_reason": "stop"}))
                self._send(200, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
            else:
                self._json(200, {**base, "response": text, "done": True, "done_reason": "stop"})

    return Handler


class FakeOllama:
    """This server, running as a subprocess for a test: its URL and the requests it received."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"requests-{time.monotonic_ns()}.jsonl"
        self.log.touch()
        cmd = [sys.executable, __file__, "--log", str(self.log), "--lifetime", "60", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server prints its port once it listens
        assert line.strip().isdigit(), f"fake Ollama server did not start: {line!r}"
        self.host = f"http://127.0.0.1:{int(line)}"

    def requests(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a model the server has (repeatable)")
    parser.add_argument("--reply", default="passport photo, seed {seed}", help="text every generate answers")
    parser.add_argument("--replies", type=Path, help='JSON list of {"when": TEXT, "reply": TEXT} rules')
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines file of received requests")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering generate")
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds after which the server exits")
    args = parser.parse_args(argv)

    rules = json.loads(args.replies.read_text(encoding="utf-8")) if args.replies else None
    handler = make_handler(args.model, args.reply, args.log, args.delay, rules)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
