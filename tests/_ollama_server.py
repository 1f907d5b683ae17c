"""A small stand-in for the Ollama HTTP API, run as a subprocess by tests/test_llm.py.

It speaks the parts of the API the `ollama` client uses for `generate` and `list`: POST /api/generate (one JSON
object when the request says "stream": false, NDJSON chunks otherwise), GET /api/tags and GET /. Unknown models get
Ollama's 404 {"error": "model 'x' not found"}. Every request body is appended as one JSON line to --log, so a test
can check what the client really sent. The server binds 127.0.0.1 on a free port, prints the port on its first
stdout line, and exits by itself after --lifetime seconds.

The answer text is --reply with "{seed}" and "{temperature}" replaced by the request's options, so a test can see
that the options arrived and that the stage cleans what comes back. A request with the prompt stage's JSON schema as
`format` is answered as Ollama's structured output is, a JSON object `{"prompt": <reply>}`, unless --ignore-format (an
older server, or a model that ignores it); for another schema (the write stage's) the reply is sent as it is: the
test writes it as the JSON the model would answer. --trickle sends the answer one byte at a time, that many seconds apart (each read
is quick, the whole answer slow). --reply-for WORDS=REPLY answers differently to requests that mention WORDS.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def make_handler(
    models: list[str],
    reply: str,
    log: Path,
    delay: float,
    trickle: float = 0.0,
    ignore_format: bool = False,
    replies: dict[str, str] | None = None,
    no_think: bool = False,
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
            if not trickle:
                self.wfile.write(payload)
                return
            try:
                for i in range(len(payload)):
                    self.wfile.write(payload[i : i + 1])
                    self.wfile.flush()
                    time.sleep(trickle)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting, as it should

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
            if no_think and "think" in body:  # as some servers answer for a model without the capability
                self._json(400, {"error": f'"{model}" does not support thinking'})
                return
            if model not in models:
                self._json(404, {"error": f"model '{model}' not found"})
                return
            if delay:
                time.sleep(delay)
            options = body.get("options") or {}
            chosen = next((r for key, r in (replies or {}).items() if key in str(body.get("prompt"))), reply)
            text = chosen.replace("{seed}", str(options.get("seed"))).replace(
                "{temperature}", str(options.get("temperature"))
            )
            schema = body.get("format")
            if isinstance(schema, dict) and "prompt" in schema.get("properties", {}) and not ignore_format:
                text = json.dumps({"prompt": text})  # the prompt stage's schema; other replies are given as JSON
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a model the server has (repeatable)")
    parser.add_argument("--reply", default="passport photo, seed {seed}", help="text every generate answers")
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines file of received requests")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering generate")
    parser.add_argument(
        "--reply-for",
        action="append",
        default=[],
        metavar="WORDS=REPLY",
        help="answer REPLY to requests whose prompt contains WORDS (repeatable; others get --reply)",
    )
    parser.add_argument("--no-think", action="store_true", help="refuse requests that carry a `think` field (400)")
    parser.add_argument("--trickle", type=float, default=0.0, help="seconds between the bytes of each answer")
    parser.add_argument("--ignore-format", action="store_true", help="answer plain text even when asked for JSON")
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds after which the server exits")
    args = parser.parse_args(argv)

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0),
        make_handler(
            args.model,
            args.reply,
            args.log,
            args.delay,
            args.trickle,
            args.ignore_format,
            dict(item.split("=", 1) for item in args.reply_for),
            args.no_think,
        ),
    )
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
