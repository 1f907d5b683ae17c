"""The SadTalker benchmark's child processes still drive the stage (they reach into pipeline internals to cap frames
and to pick preparation settings), on the CPU at toy lengths. Needs ../shared/sadtalker for fill-rule checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench_sadtalker.py"

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_sadtalker
    finally:
        sys.path.remove(str(REPO / "bench"))
    if bench_sadtalker._fill() is None:
        pytest.skip("needs ../shared/sadtalker for the fill-rule checkpoints")
    root = tmp_path_factory.mktemp("bench_ckpt")
    bench_sadtalker.write_checkpoints(root)
    return root


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH), *args, "--device", "cpu"], capture_output=True, text=True, check=False, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_memory_child_prepares_the_whole_audio_and_renders_the_capped_frames(checkpoints: Path) -> None:
    info = _child("--child-memory", "1.0", "--frames-cap", "1", "--ckpt", str(checkpoints), "--batch-size", "1")
    assert info["frames"] == "1 of 25 rendered" and info["peak_rss_mib"] > 0


def test_bench_clips_child_renders_every_clip_with_the_preparation_setting(checkpoints: Path) -> None:
    args = ("--child-clips", "0", "2", "--clip-seconds", "0.04", "--ckpt", str(checkpoints), "--batch-size", "4")
    assert _child(*args, "--prepare", "0:2") == {"clips": 2, "frames": 2}
