"""`dhbatch` (batch.cli.main) with tests/_fake_stages.py's light stages instead of the renderer, as its own process:

    python tests/_fake_cli.py build m.yaml --device cpu ...

Environment: FAKE_LOG (one line per step built), FAKE_DELAY (seconds each output write sleeps mid-file).
Everything else (options, config files, the remote cache, reports) is the real command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch.run  # noqa: E402
from batch.cli import main  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402


def use_fake_stages() -> None:
    log = os.environ.get("FAKE_LOG")
    registry = make_registry(log=Path(log) if log else None, delay=float(os.environ.get("FAKE_DELAY", "0")))
    init = batch.run.Runner.__init__

    def fake_init(self: batch.run.Runner, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("stages", registry)
        init(self, *args, **kwargs)

    batch.run.Runner.__init__ = fake_init  # type: ignore[method-assign]


if __name__ == "__main__":
    use_fake_stages()
    sys.exit(main(sys.argv[1:]))
