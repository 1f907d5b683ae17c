"""`dhbatch` as its own process, with the light stages of tests/_fake_stages.py in place of the models: the whole
command line (arguments, planning, locks, cache, publishing, report, exit codes) runs as a user runs it.

usage: python tests/_fake_cli.py DHBATCH-ARGS...
Environment: FAKE_LOG (a file that gets one line per step built), FAKE_DELAY (seconds a stage sleeps mid-write),
FAKE_CHUNK_DELAY (seconds after each chunk), FAKE_MP4=1 (video stages write real tiny MP4s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch import cli  # noqa: E402
from batch.run import Runner  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402


def main() -> int:
    log = os.environ.get("FAKE_LOG")
    registry = make_registry(
        log=Path(log) if log else None,
        delay=float(os.environ.get("FAKE_DELAY", "0")),
        chunk_delay=float(os.environ.get("FAKE_CHUNK_DELAY", "0")),
        mp4=os.environ.get("FAKE_MP4") == "1",
    )
    init = Runner.__init__

    def with_fake_stages(self: Runner, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("stages", registry)
        init(self, *args, **kwargs)

    Runner.__init__ = with_fake_stages  # type: ignore[method-assign]
    return cli.main()


def dhbatch_fake(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run this script as a process (for tests): `dhbatch ARGS` with the fake stages; `env` adds FAKE_* settings."""
    return subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        check=False,
    )


if __name__ == "__main__":
    sys.exit(main())
