"""Scratch folders for the benches: made under the system's temporary folder and removed when the process exits
(checkpoints written for a bench are hundreds of MB; a bench run must not leave them behind)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new empty folder, deleted with everything in it at interpreter exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
