"""`import batch` (and planning) must not import torch: planning a thousand videos stays fast and light."""

from __future__ import annotations

import subprocess
import sys


def test_light_imports_batch_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import batch, batch.cli, batch.plan, batch.run, batch.report, batch.cache, renderer.base\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'cv2', 'dlib', 'av') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
