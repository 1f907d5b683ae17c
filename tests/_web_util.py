"""The studio's test helpers: a small project on disk, and `dhbatch serve` started on 127.0.0.1 as a real process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PORTRAIT = REPO / "manifests" / "portraits" / "astronaut.jpg"
SENTENCE = "Hello there, nice to meet you."

MANIFEST = f"""\
version: 1
defaults:
  video: {{renderer: puppet, size: 256}}
characters:
  eileen: {{name: Eileen, image: portraits/astronaut.jpg, seed: 1}}
scripts:
  short: {{text: "{SENTENCE}"}}
videos:
  - {{id: eileen-short, character: eileen, script: short}}
"""


def make_project(root: Path, manifest: str = MANIFEST) -> Path:
    """manifests/m.yaml (one short puppet video at 256) beside its portrait; an empty checkpoints/ marks the root."""
    (root / "manifests" / "portraits").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    shutil.copy(PORTRAIT, root / "manifests" / "portraits" / "astronaut.jpg")
    (root / "manifests" / "m.yaml").write_text(manifest)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, project: Path, log: Path) -> None:
        self.proc, self.url, self.project, self.log = proc, url, project, log

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def wait_job(self, client: httpx.Client, job_id: int, until: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {job['status']} after {timeout}s; log:\n{self.log.read_text()}"
                )
            time.sleep(0.2)


@contextlib.contextmanager
def serve(project: Path, *args: str, token: str | None = None) -> Iterator[Server]:
    """`python -m batch.cli serve PROJECT --port P ...` until it answers; stopped (SIGINT, as Ctrl-C) afterwards."""
    port = free_port()
    log = project / f"serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DHBATCH_TOKEN", None)
    cmd = [sys.executable, "-m", "batch.cli", "serve", str(project), "--port", str(port), "--device", "cpu", *args]
    if token:
        cmd += ["--token", token]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=project)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dhbatch serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/api/manifests", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"dhbatch serve did not answer in 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(proc, url, project, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
