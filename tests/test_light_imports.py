"""`import batch` (and planning) must not import torch: planning a thousand videos stays fast and light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_light_imports_batch_does_not_import_torch(tmp_path: Path, repo: Path) -> None:
    code = (
        "import sys\n"
        "import batch, batch.cli, batch.plan, batch.run, batch.report, batch.cache, renderer.base\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    batch.cli.main(['plan', 'manifests/demo.yaml', '--build-dir', sys.argv[1]])\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'cv2', 'dlib', 'av', 'fastapi', 'starlette', 'uvicorn', 'pydantic', 'ray')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True, cwd=repo
    ).stdout.strip()
    assert out == ""
    assert (tmp_path / "cache" / "hashes.json").is_file()  # the plan really ran
