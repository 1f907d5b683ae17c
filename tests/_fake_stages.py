"""Light stand-ins for the model stages, used to test the runner's scheduling, caching and failure policy.

They honour the renderer contract (outputs named per stage, one result per job, RenderError for a bad input) and
write content derived from their inputs, so cache reuse and rebuilds are observable. Real stages are tested in the
renderer test files.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batch.stages import STAGES, TARGETS
from renderer.base import BadInputError, ModelPool, StepJob


def _digest(job: StepJob) -> bytes:
    h = hashlib.sha256(job.key.encode())
    for name in sorted(job.inputs):
        h.update(Path(job.inputs[name]).read_bytes())
    h.update(job.text.encode())
    return h.hexdigest().encode()


def write_mp4(path: Path, seed: bytes, frames: int = 6) -> None:
    """A small real H.264 MP4 whose colours come from `seed` (for tests that decode what was published), written as
    the renderer's encoder writes: into a temporary file made by mkstemp (mode 0600), then renamed."""
    import tempfile

    import av
    import numpy as np

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    with av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = np.full((32, 32, 3), [seed[0], seed[1], (seed[2] + 8 * i) % 256], np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def make_registry(
    log: Path | None = None, delay: float = 0.0, chunk_delay: float = 0.0, mp4: bool = False
) -> dict[str, Any]:
    """Stage functions keyed by target. `log` gets one line per step built; `delay` sleeps mid-write; `mp4`: the
    video stages write real (tiny) MP4s. Each reports its jobs as they finish (`done`), as the renderer's do."""

    def stage_fn(jobs: Sequence[StepJob], pool: ModelPool, done: Callable[[int, Any], None] | None = None) -> list[Any]:
        pool.get(f"fake-{jobs[0].stage}", jobs[0].device, "float32", lambda: object())
        out: list[Any] = []
        for job in jobs:
            if "FAIL" in job.text:  # what it made before failing is the failed step's artifact
                made = job.out_dir / STAGES[job.stage].outputs[0]
                made.write_bytes(b"made before failing")
                out.append(BadInputError(f"{job.label}: the text asks to fail", "remove FAIL", artifact=made))
                if done is not None:
                    done(len(out) - 1, out[-1])
                continue
            spec = STAGES[job.stage]
            for name in spec.outputs:
                if mp4 and name.endswith(".mp4"):
                    write_mp4(job.out_dir / name, hashlib.sha256(_digest(job)).digest())
                    continue
                with open(job.out_dir / name, "wb") as fh:
                    fh.write(_digest(job)[:32])
                    fh.flush()
                    if delay:
                        time.sleep(delay)
                    fh.write(_digest(job)[32:])
            if log is not None:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{job.stage} {job.key} {os.getpid()}\n".encode())
                os.close(fd)
            warnings = ["the text asks for a warning"] if "WARN" in job.text else []
            notes = ["this run made it another way"] if "NOTE" in job.text else []
            out.append({"fake": True, "warnings": warnings, "run_notes": notes})
            if done is not None:
                done(len(out) - 1, out[-1])
        if chunk_delay:
            time.sleep(chunk_delay)
        return out

    return {target: stage_fn for target in TARGETS.values()}
