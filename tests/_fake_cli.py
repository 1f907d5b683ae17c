"""`dhbatch` as a separate process, the real CLI, with the light stand-ins of tests/_fake_stages.py in place of the
model stages, so that CLI tests of `build` run in a second. Environment: FAKE_DELAY (seconds per step, mid-write).

usage: python tests/_fake_cli.py build m.yaml ...   (the arguments of `dhbatch`)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batch.run  # noqa: E402
from batch.cli import main  # noqa: E402
from tests._fake_stages import make_registry  # noqa: E402


class FakeStagesRunner(batch.run.Runner):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["stages"] = make_registry(delay=float(os.environ.get("FAKE_DELAY", "0")))
        kwargs["device"] = "cpu"  # `auto` would import torch to look for a GPU: seconds, for stages that use none
        super().__init__(*args, **kwargs)


if __name__ == "__main__":
    batch.run.Runner = FakeStagesRunner  # cmd_build imports it from batch.run when it runs
    sys.exit(main(sys.argv[1:]))
