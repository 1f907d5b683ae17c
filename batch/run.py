"""Execution: stage-major over a plan, one warm copy of each model, atomic outputs, per-video failure policy."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batch.cache import Cache, publish
from batch.errors import UsageError
from batch.plan import Plan, Step, VideoPlan, forced_keys
from batch.progress import Progress, reporter
from batch.stages import BATCHED_GPU_TARGETS, ORDER, STAGES

logger = logging.getLogger(__name__)
#: Numbers the thread pools of `_run_parallel`, whose threads are found again by name.
_POOLS = itertools.count()

#: A stage function: (jobs, pool) -> one info dict or RenderError per job (the renderer contract).
StageFn = Callable[[Sequence[Any], Any], list[Any]]


@dataclasses.dataclass
class StepOutcome:
    stage: str
    key: str
    cached: bool
    reason: str
    seconds: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    #: Whether this run ran the step: False for a cached step, and for one that never ran (its upstream failed, or
    #: --fail-fast stopped the run).
    ran: bool = True
    #: What a failed step made before it failed, kept in the cache for a person to look at (the portrait that
    #: failed the face check): `Cache.failed_entry`.
    artifact: str | None = None

    def __post_init__(self) -> None:
        if self.cached:
            self.ran = False

    @property
    def status(self) -> str:
        if self.cached:
            return "cached"
        if not self.ran:
            return "not run"
        return "failed" if self.error else "ran"

    @property
    def warnings(self) -> list[str]:
        """What the stage said about its output (`info["warnings"]`: no face in some frames, a silent track), and,
        for a step that ran now, about how this run made it (`info["run_notes"]`: a batch split to fit in memory);
        a cached step's run notes belong to the run that built it."""
        info = self.info if isinstance(self.info, dict) else {}
        found = [info.get("warnings")] + ([] if self.cached else [info.get("run_notes")])
        return [str(w) for items in found if isinstance(items, list) for w in items]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status, "warnings": self.warnings}


@dataclasses.dataclass
class VideoResult:
    id: str
    status: str  # built | cached | failed | skipped
    output: str | None
    renderer: str
    steps: list[StepOutcome]
    error: str | None = None
    seconds: float = 0.0
    #: Not built now, but an earlier build's MP4 is kept where the outputs' glob misses it (`report.retire_outdated`).
    last_good: str | None = None

    @property
    def warnings(self) -> list[tuple[str, str]]:
        """(stage, warning) of every step, cached ones included: they still describe the output."""
        return [(step.stage, text) for step in self.steps for text in step.warnings]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["steps"] = [s.as_dict() for s in self.steps]
        return d


@dataclasses.dataclass
class RunResult:
    manifest: str
    videos: list[VideoResult]
    seconds: float
    device: str
    model_loads: dict[str, int]

    @property
    def failed(self) -> list[VideoResult]:
        return [v for v in self.videos if v.status in ("failed", "skipped")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "model_loads": self.model_loads,
            "summary": {s: sum(v.status == s for v in self.videos) for s in ("built", "cached", "failed", "skipped")},
            "warnings": sum(len(v.warnings) for v in self.videos),
            "videos": [v.as_dict() for v in self.videos],
        }


class _StopRun(Exception):
    """--fail-fast: the first failure stops the run."""


class Runner:
    """Runs a plan. `stages` maps a target ("renderer.voice:run") to its function; by default targets are imported."""

    def __init__(
        self,
        plan: Plan,
        cache: Cache,
        *,
        checkpoints: Path,
        device: str = "auto",
        fail_fast: bool = False,
        jobs: int = 1,
        force: Sequence[str] = (),
        progress: bool | Progress = True,
        stages: Mapping[str, StageFn] | None = None,
    ) -> None:
        self.plan = plan
        self.cache = cache
        self.checkpoints = checkpoints
        self.device_spec = device
        self.fail_fast = fail_fast
        self.jobs = max(1, jobs)
        self.force = set(force)
        self._forced_keys: set[str] | None = None
        #: Bars at a terminal, timestamped lines in a CI log (`batch.progress`); told of each video once it is done.
        self.progress = progress if isinstance(progress, Progress) else reporter(progress)
        self._stages = dict(stages or {})
        self._device: str | None = None
        self._pool: Any = None
        self._lock = threading.Lock()
        self.outcomes: dict[str, StepOutcome] = {}
        self.failed: dict[str, str] = {}  # step key -> error
        self._reasons: dict[str, str] = {}
        self._users: dict[str, list[VideoPlan]] = {}  # step key -> the videos made from it
        self._done: dict[str, VideoResult | None] = {}  # video id -> its result, once it is known

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _fn(self, target: str) -> StageFn:
        if target not in self._stages:
            module, _, name = target.partition(":")
            self._stages[target] = getattr(importlib.import_module(module), name)
        return self._stages[target]

    def _pool_(self) -> Any:
        if self._pool is None:
            from renderer.base import ModelPool

            self._pool = ModelPool()
        return self._pool

    def device(self) -> str:
        if self._device is None:
            if self.device_spec == "cpu":
                self._device = "cpu"
            else:
                from renderer.base import RenderError, resolve_device

                try:
                    self._device = resolve_device(self.device_spec)
                except RenderError as exc:
                    raise UsageError(exc.message, exc.hint) from exc
        return self._device

    def _forced(self, step: Step) -> bool:
        if self._forced_keys is None:
            self._forced_keys = set().union(*(forced_keys(vp.steps, self.force) for vp in self.plan.videos))
        return step.key in self._forced_keys

    def _input_paths(self, step: Step) -> dict[str, Path]:
        paths = {}
        for inp in step.inputs:
            p = inp.path if inp.path is not None else self.cache.output(inp.stage, inp.key, inp.filename)
            if p.is_file():
                paths[inp.name] = p
        return paths

    # -- execution ------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with self.cache.in_use():  # `gc` waits until no build uses the cache
            return self._run()

    def _run(self) -> RunResult:
        t0 = time.perf_counter()
        self.cache.sweep_tmp()
        users: dict[str, list[VideoPlan]] = defaultdict(list)
        steps: dict[str, Step] = {}
        for vp in self.plan.videos:
            for s in vp.steps:
                users[s.key].append(vp)
                steps.setdefault(s.key, s)
        self._reasons = {d.key: d.reason for vp in self.plan.videos for d in vp.decisions}
        self._users = users
        stopped = False
        try:
            for stage in ORDER:
                todo = [s for s in steps.values() if s.stage == stage and not self._blocked(s)]
                if todo:
                    self._run_stage(stage, todo)
                if self._pool is not None:
                    self._pool.release()
        except _StopRun:
            stopped = True
        results = [self._result(vp, stopped) for vp in self.plan.videos]
        loads = {}
        if self._pool is not None:
            loads = {"/".join(k): n for k, n in self._pool.loads.items()}
        return RunResult(
            str(self.plan.manifest.path), results, time.perf_counter() - t0, self._device or "not used", loads
        )

    def _blocked(self, step: Step) -> bool:
        """A step whose upstream failed is not run; it inherits the failure."""
        for inp in step.inputs:
            if inp.key and inp.key in self.failed:
                self.failed[step.key] = self.failed[inp.key]
                return True
        return False

    def _run_stage(self, stage: str, todo: list[Step]) -> None:
        spec = STAGES[stage]
        pending: list[Step] = []
        for s in todo:
            rec = None if self._forced(s) else self.cache.record(stage, s.key)
            if rec is not None:
                self._record(StepOutcome(stage, s.key, True, "unchanged", 0.0, rec.get("info", {})))
            else:
                pending.append(s)
        if not pending:
            return
        groups: dict[str, list[Step]] = defaultdict(list)
        for s in pending:
            groups[s.target].append(s)
        chunks: list[list[Step]] = []
        for group in groups.values():
            size = BATCHED_GPU_TARGETS.get(group[0].target, spec.chunk)
            if stage == "image":
                size = int(group[0].settings.get("batch_size", spec.chunk))
            chunks += [group[i : i + size] for i in range(0, len(group), size)]
        serial: list[list[Step]] = []  # GPU-batched stages run one chunk at a time
        parallel: list[list[Step]] = []
        for c in chunks:
            (parallel if spec.parallel and c[0].target not in BATCHED_GPU_TARGETS else serial).append(c)
        bar = self.progress.stage(stage, len(pending))
        try:
            for c in serial:
                self._run_chunk(stage, c, bar)
            if self.jobs > 1 and len(parallel) > 1:
                self._run_parallel(stage, parallel, bar)
            else:
                for c in parallel:
                    self._run_chunk(stage, c, bar)
        finally:
            bar.close()

    def _run_parallel(self, stage: str, chunks: list[list[Step]], bar: Any) -> None:
        """Chunks on `jobs` threads. When the run stops (Ctrl-C, --fail-fast, a bug), no new chunk starts and the
        running ones finish before this returns: leaving threads inside native code (PyAV, ONNX Runtime) while the
        interpreter exits crashes the process."""
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        stop = threading.Event()

        def work(chunk: list[Step]) -> None:
            if not stop.is_set():
                self._run_chunk(stage, chunk, bar)

        prefix = f"dhbatch-{stage}-{next(_POOLS)}"  # this pool's threads, by name
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix=prefix)
        try:
            futures = [pool.submit(work, c) for c in chunks]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            # A Ctrl-C inside submit() can come between a new thread's start and the pool noting it, and shutdown()
            # only joins the threads it noted: join every thread of this pool.
            for thread in threading.enumerate():
                if thread.name.startswith(f"{prefix}_") and thread is not threading.current_thread():
                    thread.join()

    def _run_chunk(self, stage: str, chunk: list[Step], bar: Any) -> None:
        from renderer.base import RenderError, StepJob

        spec = STAGES[stage]
        with self.cache.locked([s.key for s in chunk]):
            misses = []
            for s in chunk:
                if not self._forced(s):
                    self.cache.forget(s.key)
                    rec = self.cache.record(stage, s.key)
                    if rec is not None:  # another run built it while we waited for the lock
                        self._record(StepOutcome(stage, s.key, True, "built by another run", 0.0, rec.get("info", {})))
                        bar.update(1)
                        continue
                misses.append(s)
            if not misses:
                return
            tmps = [self.cache.new_tmp(s.key) for s in misses]
            try:
                jobs = [
                    StepJob(
                        stage=stage,
                        key=s.key,
                        settings=dict(s.settings),
                        inputs=self._input_paths(s),
                        out_dir=tmp,
                        text=s.text,
                        device=self.device(),
                        seed=s.seed,
                        checkpoints=self.checkpoints,
                        label=s.label,
                    )
                    for s, tmp in zip(misses, tmps, strict=True)
                ]
                t0 = time.perf_counter()
                try:
                    results = list(self._fn(misses[0].target)(jobs, self._pool_()))
                    if len(results) != len(jobs):
                        raise RuntimeError(f"stage {stage} returned {len(results)} results for {len(jobs)} jobs")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except RenderError as exc:  # a stage that raised instead of returning: the whole chunk failed
                    results = [exc] * len(jobs)
                except Exception as exc:  # noqa: BLE001 - a bug in a stage must not take the other videos down
                    logger.debug("stage %s crashed", stage, exc_info=True)
                    results = [RuntimeError(f"internal error in stage {stage}: {exc.__class__.__name__}: {exc}")] * len(
                        jobs
                    )
                seconds = (time.perf_counter() - t0) / len(jobs)
                any_failed = False
                for s, tmp, res in zip(misses, tmps, results, strict=True):
                    reason = self._reasons[s.key]
                    if isinstance(res, BaseException):
                        msg = str(res)
                        self.failed[s.key] = msg
                        kept = self._keep_artifact(stage, s.key, tmp, getattr(res, "artifact", None))
                        bar.update(1)
                        self._record(StepOutcome(stage, s.key, False, reason, seconds, {}, msg, artifact=kept))
                        logger.error("%s: %s failed: %s", s.label, stage, msg)
                        any_failed = True
                        continue
                    info = dict(res or {})
                    try:
                        self.cache.commit(
                            stage,
                            s.key,
                            tmp,
                            spec.outputs,
                            spec.optional,
                            {
                                "fingerprint": _thaw(s.fingerprint),
                                "info": info,
                                "seconds": round(seconds, 3),
                                "label": s.label,
                                "created": time.time(),
                            },
                        )
                    except FileNotFoundError as exc:
                        self.failed[s.key] = str(exc)
                        bar.update(1)
                        self._record(StepOutcome(stage, s.key, False, reason, seconds, info, str(exc)))
                        any_failed = True
                        continue
                    bar.update(1)
                    self._record(StepOutcome(stage, s.key, False, reason, seconds, info))
            finally:
                for tmp in tmps:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
        if any_failed and self.fail_fast:
            raise _StopRun()

    def _keep_artifact(self, stage: str, key: str, tmp: Path, artifact: Any) -> str | None:
        """Move what a failed step left for people to see (a RenderError's `artifact`, in its tmp folder) into the
        cache's failed/ folder before the tmp folder is swept; its path, or None."""
        if not isinstance(artifact, Path) or artifact.parent != tmp or not artifact.is_file():
            return None
        try:
            return str(self.cache.keep_failed(stage, key, artifact))
        except OSError as exc:  # nothing to show is no reason to lose the error itself
            logger.warning("could not keep %s: %s", artifact.name, exc)
            return None

    def _record(self, outcome: StepOutcome) -> None:
        """Note a step's outcome; a video whose final step is done, or whose step failed, is published (or reported
        failed) now, not at the end of the run, and the progress reporter says so."""
        self.outcomes[outcome.key] = outcome
        for vp in self._users.get(outcome.key, ()):
            if outcome.error is None and outcome.key != vp.steps[-1].key:
                continue
            with self._lock:
                if vp.video.id in self._done:
                    continue
                self._done[vp.video.id] = None
            result = self._video_result(vp, stopped=False)
            if outcome.error is None:  # published (or it could not be); a failed one is made again at the end
                self._done[vp.video.id] = result
            self.progress.video(result)

    def _result(self, vp: VideoPlan, stopped: bool) -> VideoResult:
        """A video's result at the end of the run: the one published during the run, or (failed, skipped, or left
        by --fail-fast with every step cached) made now."""
        done = self._done.get(vp.video.id)
        if done is not None:
            return done
        reported = vp.video.id in self._done
        if stopped:  # --fail-fast: the steps already in the cache are this run's too (a video cached, not skipped)
            for s in vp.steps:
                if s.key not in self.outcomes and s.key not in self.failed and not self._forced(s):
                    rec = self.cache.record(s.stage, s.key)
                    if rec is not None:
                        self.outcomes[s.key] = StepOutcome(s.stage, s.key, True, "unchanged", 0.0, rec.get("info", {}))
        result = self._video_result(vp, stopped)
        if not reported:
            self.progress.video(result)
        return result

    def _video_result(self, vp: VideoPlan, stopped: bool) -> VideoResult:
        outcomes = []
        error = None
        for s in vp.steps:
            o = self.outcomes.get(s.key)
            if o is None:
                reason = next(d.reason for d in vp.decisions if d.key == s.key)
                o = StepOutcome(
                    s.stage, s.key, False, reason, 0.0, {}, self.failed.get(s.key) and "upstream failed", ran=False
                )
            outcomes.append(o)
            if error is None and s.key in self.failed:
                error = f"{s.stage}: {self.failed[s.key]}"
        final = vp.steps[-1]
        if error is None and final.key in self.outcomes and self.outcomes[final.key].error is None:
            src = self.cache.output(final.stage, final.key, STAGES[final.stage].outputs[0])
            try:
                publish(src, vp.output)
            except OSError as exc:  # this video only: the others are still published, and the report written
                reason = exc.strerror or str(exc)
                error = f"publish: cannot write {vp.output}: {reason} (it is built and cached: fix the folder and run again)"
                return VideoResult(vp.video.id, "failed", None, vp.renderer, outcomes, error)
            status = "cached" if all(o.cached for o in outcomes) else "built"
            return VideoResult(
                vp.video.id,
                status,
                str(vp.output),
                vp.renderer,
                outcomes,
                None,
                round(sum(o.seconds for o in outcomes), 3),
            )
        if error is None:
            error = "not run: the run stopped at the first failure (--fail-fast)" if stopped else "not run"
            return VideoResult(vp.video.id, "skipped", None, vp.renderer, outcomes, error)
        return VideoResult(vp.video.id, "failed", None, vp.renderer, outcomes, error)


def _thaw(value: Any) -> Any:
    from batch.manifest import thaw

    return thaw(value)
