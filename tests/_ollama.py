"""Start tests/_ollama_server.py (an Ollama-compatible HTTP server on 127.0.0.1) as a subprocess for a test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SERVER = Path(__file__).with_name("_ollama_server.py")


class FakeOllama:
    """A running tests/_ollama_server.py subprocess: its URL and the requests it received."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"requests-{time.monotonic_ns()}.jsonl"
        self.log.touch()
        cmd = [sys.executable, str(SERVER), "--log", str(self.log), "--lifetime", "60", *args]
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
