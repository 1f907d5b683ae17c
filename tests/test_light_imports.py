"""`import batch` (and planning) must not import torch: planning a thousand videos stays fast and light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str, build_dir: Path, repo: Path) -> str:
    """`code` in a fresh interpreter in the repository (sys.argv[1]: the build folder); its stdout."""
    return subprocess.run(
        [sys.executable, "-c", code, str(build_dir)], capture_output=True, text=True, check=True, cwd=repo
    ).stdout.strip()


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
    assert run_python(code, tmp_path, repo) == ""
    assert (tmp_path / "cache" / "hashes.json").is_file()  # the plan really ran


def test_light_imports_offline_build_does_not_import_torch(tmp_path: Path, repo: Path) -> None:
    """The offline path (Hibari voice, puppet, mux) with the default `--device auto` never imports torch: only a
    stage that runs models on a device resolves it (1.5-2 s and 300 MB saved on every demo build)."""
    code = (
        "import sys\n"
        "import batch.cli\n"
        "code = batch.cli.main(['-q', 'build', 'manifests/demo.yaml', '--only', 'eileen-thanks', '--build-dir', "
        "sys.argv[1]])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    out = run_python(code, tmp_path, repo)
    assert out.splitlines()[-1] == "0 False", out
    report = (tmp_path / "demo" / "report.json").read_text()
    assert '"device": "cpu"' in report
