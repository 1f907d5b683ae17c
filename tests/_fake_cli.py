"""`dhbatch` (batch.cli.main) with tests/_fake_stages.py's light stages instead of the renderer, as its own process:

    python tests/_fake_cli.py build m.yaml --device cpu ...

Environment: FAKE_LOG (one line per step built), FAKE_DELAY (seconds each output write sleeps mid-file),
FAKE_CHUNK_DELAY (seconds after each chunk), FAKE_MP4=1 (the video stages write real tiny MP4s), FAKE_UPLOAD_PAUSE (a
file to create, then wait, just before the first remote record is written: a window to kill the job mid-upload).
Everything else (options, config files, locks, the cache, publishing, reports, exit codes) is the real command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch.remote  # noqa: E402
import batch.run  # noqa: E402
from batch.cli import main  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402


def use_fake_stages() -> None:
    log = os.environ.get("FAKE_LOG")
    registry = make_registry(
        log=Path(log) if log else None,
        delay=float(os.environ.get("FAKE_DELAY", "0")),
        chunk_delay=float(os.environ.get("FAKE_CHUNK_DELAY", "0")),
        mp4=os.environ.get("FAKE_MP4") == "1",
    )
    init = batch.run.Runner.__init__

    def fake_init(self: batch.run.Runner, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("stages", registry)
        init(self, *args, **kwargs)
        if started := os.environ.get("FAKE_STARTED"):  # the command has planned and is about to build
            Path(started).touch()

    batch.run.Runner.__init__ = fake_init  # type: ignore[method-assign]
    if pause := os.environ.get("FAKE_UPLOAD_PAUSE"):
        put_record = batch.remote.RemoteCache._put_record

        def paused(self: batch.remote.RemoteCache, path: str, data: bytes) -> None:
            Path(pause).touch()
            time.sleep(60)
            put_record(self, path, data)

        batch.remote.RemoteCache._put_record = paused  # type: ignore[method-assign]


def dhbatch_fake(
    *args: str, cwd: Path | None = None, umask: int | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run this script as a process (for tests): `dhbatch ARGS` with the fake stages; `env` adds FAKE_* settings."""
    return subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        check=False,
        timeout=timeout,
        preexec_fn=None if umask is None else lambda: os.umask(umask),
    )


def start_fake(*args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen[str]:
    """The same as a running process (for tests that kill it or race it)."""
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
    )


if __name__ == "__main__":
    use_fake_stages()
    sys.exit(main(sys.argv[1:]))
