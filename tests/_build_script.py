"""Run a build of tests/_project.py's manifest with the fake stages, as a separate process (for kill/race tests).

usage: python tests/_build_script.py ROOT LOG DELAY CHUNK_DELAY
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._fake_stages import make_registry  # noqa: E402
from tests._project import build  # noqa: E402

if __name__ == "__main__":
    root, log, delay, chunk_delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    result = build(root, make_registry(log=log, delay=delay, chunk_delay=chunk_delay))
    sys.exit(1 if result.failed else 0)
