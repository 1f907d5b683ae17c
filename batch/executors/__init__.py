"""How a plan's steps are executed: the one small interface between the driver (`batch.run.Runner`) and the ways
of running stages (`local`: this process; `ray`: actors of a Ray cluster).

The driver plans, checks and locks the cache, makes a temporary folder per step, hands an executor *chunks* (steps
of one stage for one stage function, as `renderer.base.StepJob`s whose `out_dir` is that folder), and commits what
comes back; publishing stays with the driver too. An executor only computes: it returns, per chunk, one result per
job (an info dict or an exception, the renderer contract) with the outputs written into each job's `out_dir`, and
says where and when the chunk ran. This module stays light: no torch, no ray.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

#: A stage function: (jobs, pool) -> one info dict or RenderError per job (the renderer contract).
StageFn = Callable[[Sequence[Any], Any], list[Any]]


@dataclasses.dataclass
class Chunk:
    """Steps of one stage that one stage function gets together (so its models load once for all of them)."""

    id: int
    stage: str
    target: str
    #: One `renderer.base.StepJob` per step; `out_dir` is the driver's temporary folder for that step.
    jobs: list[Any]
    #: Runs where the models run (a GPU when there is one): one chunk at a time per device, never in threads.
    gpu: bool
    #: time.monotonic() when the driver handed it over (the queue wait is measured from here).
    submitted: float = 0.0
    #: Called as each job finishes, where the stage function reports jobs one by one (a `done` parameter) and the
    #: executor runs in the driver's process: (job index, its result, where and how long so far, as a ChunkResult
    #: without results). The driver commits that step at once, so a killed run keeps it; it skips the step when
    #: the chunk's results come back. Executors that cannot call back leave it unused.
    on_result: Callable[[int, Any, ChunkResult], None] | None = None


@dataclasses.dataclass
class ChunkResult:
    chunk: Chunk
    #: One per job, in order: the stage's info dict, or the exception it reported for that job.
    results: list[Any]
    #: Seconds the stage function ran (the whole chunk).
    seconds: float
    #: Seconds from submission until the stage function started (waiting for a worker, moving inputs).
    queued: float
    #: Where it ran: worker name, node and device.
    worker: str = "local"
    node: str = ""
    device: str = ""


class Executor(Protocol):
    """What the driver needs from a way of running chunks."""

    #: False: hand it one stage at a time, in stage order (the local runner keeps one stage's models warm at once);
    #: True: submit any step whose inputs are committed (stages overlap across videos).
    overlap: bool

    def workers(self, gpu: bool) -> int:
        """How many chunks of this kind can run at once (the driver splits work so that each gets some)."""

    def idle(self, gpu: bool) -> bool:
        """Whether a worker of this kind has nothing to do (the driver then hands it a partial batch rather than
        wait for more steps to fill one)."""

    def submit(self, chunk: Chunk) -> None:
        """Hand over a chunk; it runs later or now, its result comes back from `wait`."""

    def wait(self) -> list[ChunkResult]:
        """Block until at least one submitted chunk has finished and return every finished one (none: nothing left).
        A chunk that could not run at all (its worker kept dying) comes back with an exception per job."""

    def stage_done(self, stage: str) -> None:
        """Every step of `stage` is done (a stage-major executor drops that stage's models)."""

    def interrupt(self) -> list[ChunkResult]:
        """Ctrl-C: start nothing more, stop or finish what runs, and return the chunks that did finish."""

    def close(self) -> None:
        """End of the run: free workers and models."""

    def model_loads(self) -> dict[str, int]:
        """How many times each model was loaded ("model/device/dtype", prefixed "worker/" on a cluster)."""

    def describe(self) -> str:
        """The devices used, for the report ("cpu", "cuda", "ray: 2 GPU + 6 CPU workers")."""


def resolve_stage(target: str, registry: Mapping[str, StageFn]) -> StageFn:
    """The stage function of a target ("renderer.voice:run"): from `registry` (tests), else imported."""
    if target in registry:
        return registry[target]
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def call_stage(
    fn: StageFn, stage: str, jobs: Sequence[Any], pool: Any, done: Callable[[int, Any], None] | None = None
) -> tuple[list[Any], float]:
    """Run a stage function on a chunk under the renderer contract, on whatever worker: one result per job, and the
    seconds it took. A stage that raises a RenderError fails its whole chunk; a bug in a stage fails the chunk's
    jobs with an internal error instead of taking the other videos down. Ctrl-C and SystemExit pass through.
    `done`: handed to a stage function that takes a `done` parameter, which it calls with (index, result) as each
    job finishes (a batching stage keeps its batches and still reports every video when it is ready)."""
    from renderer.base import RenderError

    t0 = time.perf_counter()
    try:
        results = list(fn(jobs, pool, done=done) if done is not None and _reports_each(fn) else fn(jobs, pool))
        if len(results) != len(jobs):
            raise RuntimeError(f"stage {stage} returned {len(results)} results for {len(jobs)} jobs")
    except (KeyboardInterrupt, SystemExit):
        raise
    except RenderError as exc:  # a stage that raised instead of returning: the whole chunk failed
        results = [exc] * len(jobs)
    except Exception as exc:  # noqa: BLE001 - a bug in a stage must not take the other videos down
        logger.debug("stage %s crashed", stage, exc_info=True)
        error = RuntimeError(f"internal error in stage {stage}: {exc.__class__.__name__}: {exc}")
        error.__cause__ = exc  # the driver tells a full disk by its errno
        results = [error] * len(jobs)
    return results, time.perf_counter() - t0


def _reports_each(fn: StageFn) -> bool:
    """Whether a stage function takes `done` (the older contract, (jobs, pool), still holds for the others)."""
    import inspect

    try:
        return "done" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def loads_by_name(pool: Any, prefix: str = "") -> dict[str, int]:
    """A model pool's load counts keyed "model/device/dtype" (with `prefix` before it)."""
    return {prefix + "/".join(key): n for key, n in pool.loads.items()} if pool is not None else {}
