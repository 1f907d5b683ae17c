"""Execution: the driver that hands a plan's steps to an executor, commits them atomically and publishes, with the
per-video failure policy. How chunks run (this process, stage by stage; or a Ray cluster) is `batch.executors`."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.cache import Cache, publish
from batch.errors import disk_full_path
from batch.executors import Chunk, ChunkResult, Executor, StageFn
from batch.plan import Plan, Step, VideoPlan, forced_keys
from batch.progress import Progress, reporter
from batch.stages import BATCHED_GPU_TARGETS, ORDER, STAGES

if TYPE_CHECKING:
    from batch.remote import RemoteCache

logger = logging.getLogger(__name__)


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
    #: Where a step that ran now was built (the executor's worker, its node and device), and how long its chunk
    #: waited between the driver handing it over and the stage starting (for a worker, or for its inputs to move).
    worker: str = ""
    node: str = ""
    device: str = ""
    queued: float = 0.0
    #: What a failed step made before it failed, kept in the cache for a person to look at (the portrait that
    #: failed the face check): `Cache.keep_failed`.
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
    #: Where the disk filled up: {"path": the file that could not be written, "needed_bytes": about how much more
    #: this build needs (an estimate from the outputs made so far), "free_bytes": free there now}; None if it did not.
    disk_full: dict[str, Any] | None = None

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
            **({"disk_full": self.disk_full} if self.disk_full else {}),
        }


class _StopRun(Exception):
    """--fail-fast: the first failure stops the run."""


@dataclasses.dataclass
class _InFlight:
    """A chunk handed to the executor: its steps, and the locks and temporary folders the driver holds for it."""

    chunk: Chunk
    steps: list[Step]
    locks: contextlib.ExitStack
    #: The chunk's seconds when the stage last reported a finished job (`Chunk.on_result`).
    reported_s: float = 0.0

    def release(self) -> None:
        for job in self.chunk.jobs:
            if job.out_dir.exists():
                shutil.rmtree(job.out_dir, ignore_errors=True)
        self.locks.close()


class Runner:
    """Runs a plan: the driver. It decides which steps are due, checks and locks the cache, hands chunks of steps to
    an executor (`batch.executors`: this process by default, or a Ray cluster), commits what comes back and
    publishes. `stages` maps a target ("renderer.voice:run") to its function; by default targets are imported."""

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
        executor: Executor | None = None,
        remote: RemoteCache | None = None,
        events: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.plan = plan
        self.cache = cache
        self.checkpoints = checkpoints
        self.fail_fast = fail_fast
        self.force = set(force)
        self._forced_keys: set[str] | None = None
        #: Bars at a terminal, timestamped lines in a CI log (`batch.progress`); told of each video once it is done.
        self.progress = progress if isinstance(progress, Progress) else reporter(progress)
        #: Called with each progress event: a stage starts, a step finishes, a video is done (`build --events`,
        #: the studio).
        self.events = events
        if executor is None:
            from batch.executors.local import LocalExecutor

            executor = LocalExecutor(device=device, jobs=jobs, stages=stages)
        self.executor = executor
        #: A shared cache (batch/remote.py): steps missing here are downloaded from it, steps built are uploaded.
        self.remote = remote
        self._remote_missed: set[str] = set()
        self.outcomes: dict[str, StepOutcome] = {}
        self.failed: dict[str, str] = {}  # step key -> error
        self._reasons: dict[str, str] = {}
        self._steps: dict[str, Step] = {}  # every step of the plan, by key
        self._todo: dict[str, Step] = {}  # not yet handed over, in stage order
        self._done: set[str] = set()  # cached or committed: its outputs can be read
        # Kept as steps finish, so that each look for work costs what is ready, not what is left (10,000 videos):
        self._waiting: dict[str, int] = {}  # step key -> upstream steps not finished yet
        self._downstream: dict[str, list[str]] = defaultdict(list)
        self._ready: dict[str, dict[str, Step]] = {stage: {} for stage in ORDER}  # to do, every upstream finished
        self._left: collections.Counter[str] = collections.Counter()  # stage -> steps to do or in flight
        self._todo_by_target: collections.Counter[str] = collections.Counter()
        self._inflight: dict[int, _InFlight] = {}
        self._chunk_ids = itertools.count()
        self._bars: dict[str, Any] = {}
        self._stop = False
        self._users: dict[str, list[VideoPlan]] = defaultdict(list)  # step key -> the videos made from it
        self._results: dict[str, VideoResult | None] = {}  # video id -> its result once published (None: failed)
        self._commit_lock = threading.RLock()  # steps may be committed from a stage's thread as they finish
        self._disk_full: str | None = None  # the file a full disk kept from being written

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _forced(self, step: Step) -> bool:
        if self._forced_keys is None:
            self._forced_keys = set().union(*(forced_keys(vp.steps, self.force) for vp in self.plan.videos))
        return step.key in self._forced_keys

    def _damaged_input(self, step: Step) -> str | None:
        """Why one of the step's cached inputs may not be used (its bytes no longer match their sha256), or None."""
        for inp in step.inputs:
            if inp.key and not self.cache.intact(inp.stage, inp.key, inp.filename):
                path = self.cache.output(inp.stage, inp.key, inp.filename)
                return f"its input {path} changed after it was checked (damaged cache): run the build again"
        return None

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
        steps: dict[str, Step] = {}
        for vp in self.plan.videos:
            for s in vp.steps:
                steps.setdefault(s.key, s)
                self._users[s.key].append(vp)
        self._steps = steps
        self._todo = {s.key: s for s in sorted(steps.values(), key=lambda s: ORDER.index(s.stage))}
        for key, step in self._todo.items():
            upstream = {inp.key for inp in step.inputs if inp.key}
            self._waiting[key] = len(upstream)
            for up in upstream:
                self._downstream[up].append(key)
            if not upstream:
                self._ready[step.stage][key] = step
            self._left[step.stage] += 1
            self._todo_by_target[step.target] += 1
        self._reasons = {d.key: d.reason for vp in self.plan.videos for d in vp.decisions}
        stopped = False
        try:
            try:
                self._drive()
            except _StopRun:
                stopped = True
            except BaseException:  # Ctrl-C, a bug: keep what finished, lose nothing half-built
                for res in self.executor.interrupt():
                    self._finish(res)
                raise
        finally:
            for flight in self._inflight.values():
                flight.release()
            self._inflight.clear()
            for bar in self._bars.values():
                bar.close()
            self.executor.close()
            if self.remote is not None:
                self.remote.wait_uploads()
        results = [self._result(vp, stopped or self._disk_full is not None) for vp in self.plan.videos]
        return RunResult(
            str(self.plan.manifest.path),
            results,
            time.perf_counter() - t0,
            self.executor.describe(),
            self.executor.model_loads(),
            self._disk_full_info(),
        )

    def _drive(self) -> None:
        """Hand over every step whose inputs are ready, commit what comes back, until nothing is left. A stage-major
        executor gets one stage at a time; an overlapping one gets video A's render while video B's voice runs."""
        while True:
            deferred = self._submit_ready()
            if not self._inflight:
                if not deferred:
                    if self._todo:  # a bug in the scheduling, not the user's: say so rather than skip steps
                        raise RuntimeError(f"{len(self._todo)} steps were never handed over")
                    return
                time.sleep(0.1)  # another build holds their locks: it is building them; look again soon
                continue
            finished = self.executor.wait()
            if not finished:
                raise RuntimeError("executor returned nothing while chunks were in flight")
            for res in finished:
                self._finish(res)
            if self._stop:
                for res in self.executor.interrupt():
                    self._finish(res)
                raise _StopRun()

    def _stage_now(self) -> str | None:
        """For a stage-major executor: the first stage with steps left (in flight or to do)."""
        return next((stage for stage in ORDER if self._left[stage]), None)

    def _take(self, step: Step) -> None:
        """The step leaves the to-do list (handed over, cached, or failed before running)."""
        if self._todo.pop(step.key, None) is not None:
            self._ready[step.stage].pop(step.key, None)
            self._todo_by_target[step.target] -= 1

    def _settle(self, key: str, ok: bool) -> None:
        """A step is finished (built, cached or failed): its downstream steps whose inputs are all finished become
        ready (a failed input: ready to inherit the failure). Also called on a stage's thread (`_commit_one`)."""
        with self._commit_lock:
            if ok:
                self._done.add(key)
            self._left[self._steps[key].stage] -= 1
            for down in self._downstream.get(key, ()):
                self._waiting[down] -= 1
                if (self._waiting[down] == 0 or not ok) and down in self._todo:
                    step = self._todo[down]
                    self._ready[step.stage][down] = step

    def _submit_ready(self) -> int:
        """Submit the steps whose inputs are committed; returns how many wait for another build's locks."""
        only = None if self.executor.overlap else self._stage_now()
        ready: dict[str, list[Step]] = defaultdict(list)  # by target
        for stage in ORDER if only is None else (only,):  # in stage order: a hit makes its downstream ready now
            for key, step in list(self._ready[stage].items()):
                upstream = [inp.key for inp in step.inputs if inp.key]
                if failed := next((k for k in upstream if k in self.failed), None):  # it inherits the failure
                    self.failed[key] = self.failed[failed]
                    self._take(step)
                    self._settle(key, ok=False)
                    continue
                rec = None if self._forced(step) else self.cache.record(step.stage, key)
                if rec is not None:
                    self.cache.seal(step.stage, key)  # a record from before checksums: give it its sha256 now
                    self._take(step)
                    self._record(StepOutcome(step.stage, key, True, "unchanged", 0.0, rec.get("info", {})))
                    continue
                ready[step.target].append(step)
        if self.remote is not None:
            self._fetch_remote(ready)
        deferred = 0
        for target, group in ready.items():
            size = self._chunk_size(group)
            chunks = [group[i : i + size] for i in range(0, len(group), size)]
            if target in BATCHED_GPU_TARGETS and len(chunks[-1]) < size and self._more_coming(target, group):
                if len(chunks) > 1 or not self.executor.idle(True):
                    chunks.pop()  # a partial batch waits for more steps while the GPUs are busy
            for chunk in chunks:
                if not self._submit(chunk):
                    deferred += len(chunk)
        if only is not None and not self._left[only]:
            self._stage_finished(only)
            if deferred == 0 and self._todo:
                return self._submit_ready()
        return deferred

    def _more_coming(self, target: str, ready: list[Step]) -> bool:
        """Whether steps of `target` wait for their inputs (to fill a GPU batch with, on an overlapping executor)."""
        return self._todo_by_target[target] > len(ready)

    def _fetch_remote(self, ready: dict[str, list[Step]]) -> None:
        """Download the ready steps that the remote cache has (in parallel); they are done, like local hits."""
        wanted = [
            (s.stage, s.key)
            for group in ready.values()
            for s in group
            if not self._forced(s) and s.key not in self._remote_missed
        ]
        hits = self.remote.fetch_many(self.cache, wanted)
        self._remote_missed |= {key for _, key in wanted if key not in hits}  # looked up again only under its lock
        for target, group in list(ready.items()):
            for s in group:
                if s.key in hits:
                    self._remote_hit(s, hits[s.key])
            ready[target] = [s for s in group if s.key not in hits]
            if not ready[target]:
                del ready[target]

    def _remote_hit(self, s: Step, rec: dict[str, Any]) -> None:
        self._take(s)
        self._bar(s.stage).update(1)
        self._record(StepOutcome(s.stage, s.key, True, "from the remote cache", 0.0, rec.get("info", {})))

    def _chunk_size(self, group: list[Step]) -> int:
        """Steps of one target per chunk: the stage's chunk (the GPU renderer's larger batches, the image stage's
        batch_size), and on a cluster no more than needed to give every worker of that kind some."""
        spec = STAGES[group[0].stage]
        target = group[0].target
        size = BATCHED_GPU_TARGETS.get(target, spec.chunk)
        if group[0].stage == "image":
            size = int(group[0].settings.get("batch_size", spec.chunk))
        if self.executor.overlap and target not in BATCHED_GPU_TARGETS:
            size = min(size, -(-len(group) // max(1, self.executor.workers(_on_gpu(group[0])))))
        return size

    def _submit(self, steps: list[Step]) -> bool:
        """Lock, re-check and hand over one chunk; False when another build holds a lock (the steps stay to do)."""
        from renderer.base import StepJob

        stage = steps[0].stage
        if self._stop:  # a full disk, --fail-fast: its steps stay to do ("not run")
            return True
        try:
            locks = self.cache.try_lock([s.key for s in steps])
        except OSError as exc:
            if disk_full_path(exc) is None:
                raise
            self._note_disk_full(exc, self.cache.locks)
            return True
        if locks is None:
            return False
        misses = []
        for s in steps:
            self._take(s)
            if not self._forced(s):
                self.cache.forget(s.key)
                rec = self.cache.record(stage, s.key)
                if rec is not None:  # another run built it while we waited for the lock
                    self._bar(stage).update(1)
                    self._record(StepOutcome(stage, s.key, True, "built by another run", 0.0, rec.get("info", {})))
                    continue
                # Another job may have uploaded it since the last look (a step that videos of several shards need).
                if self.remote is not None and (rec := self.remote.fetch(self.cache, stage, s.key, held=True)):
                    self._remote_hit(s, rec)
                    continue
            if damaged := self._damaged_input(s):  # it was checked when its stage ran: something changed it since
                self.failed[s.key] = damaged
                self._bar(stage).update(1)
                self._record(StepOutcome(stage, s.key, False, self._reasons[s.key], 0.0, {}, damaged))
                logger.error("%s: %s failed: %s", s.label, stage, damaged)
                continue
            misses.append(s)
        if not misses:
            locks.close()
            return True
        jobs = []
        flight = _InFlight(
            Chunk(next(self._chunk_ids), stage, misses[0].target, jobs, _on_gpu(misses[0])), misses, locks
        )
        flight.chunk.on_result = lambda index, res, where: self._commit_one(flight, index, res, where)
        try:
            for s in misses:
                jobs.append(
                    StepJob(
                        stage=stage,
                        key=s.key,
                        settings=dict(s.settings),
                        inputs=self._input_paths(s),
                        out_dir=self.cache.new_tmp(s.key),
                        text=s.text,
                        seed=s.seed,
                        checkpoints=self.checkpoints,
                        label=s.label,
                    )
                )
            self._bar(stage)
            flight.chunk.submitted = time.monotonic()
            self.executor.submit(flight.chunk)
        except OSError as exc:
            flight.release()
            if disk_full_path(exc) is None:
                raise
            self._note_disk_full(exc, self.cache.tmp)  # its steps stay unbuilt: "not run"
            return True
        except BaseException:
            flight.release()
            raise
        self._inflight[flight.chunk.id] = flight
        return True

    def _finish(self, res: ChunkResult) -> None:
        """Commit a finished chunk's steps into the cache (each atomically), note failures, free its locks. Called
        again for the same chunk after a Ctrl-C (executors return every finished chunk then): what is committed
        stays, the rest is committed now."""
        flight = self._inflight.get(res.chunk.id)
        if flight is None:  # already handled
            return
        seconds = res.seconds / len(flight.steps)
        with self._commit_lock:
            for s, job, outcome in zip(flight.steps, res.chunk.jobs, res.results, strict=True):
                if s.key not in self.outcomes:  # not committed as it finished (Chunk.on_result), nor before a Ctrl-C
                    self._commit(s, job.out_dir, outcome, seconds, res)
            del self._inflight[res.chunk.id]
        flight.release()
        if self.executor.overlap:
            self._close_finished_bars()

    def _commit_one(self, flight: _InFlight, index: int, res: Any, where: ChunkResult) -> None:
        """A step of a chunk in flight has finished (the stage said so as it went): commit it now, so a run killed
        before the chunk ends keeps it. Called on the stage's thread."""
        with self._commit_lock:
            step = flight.steps[index]
            if step.key in self.outcomes or flight.chunk.id not in self._inflight:
                return
            seconds, flight.reported_s = where.seconds - flight.reported_s, where.seconds
            self._commit(step, flight.chunk.jobs[index].out_dir, res, seconds, where)

    def _commit(self, s: Step, tmp: Path, res: Any, seconds: float, where: ChunkResult) -> None:
        spec = STAGES[s.stage]
        reason = self._reasons[s.key]
        placed = {"worker": where.worker, "node": where.node, "device": where.device, "queued": round(where.queued, 3)}
        if isinstance(res, BaseException) and disk_full_path(res) is not None:
            self._note_disk_full(res, tmp)
        if isinstance(res, BaseException):
            msg = str(res)
            self.failed[s.key] = msg
            kept = self._keep_artifact(s.stage, s.key, tmp, getattr(res, "artifact", None))
            self._bar(s.stage).update(1)
            self._record(StepOutcome(s.stage, s.key, False, reason, seconds, {}, msg, **placed, artifact=kept))
            logger.error("%s: %s failed: %s", s.label, s.stage, msg)
            self._stop = self._stop or self.fail_fast
            return
        info = dict(res or {})
        try:
            self.cache.commit(
                s.stage,
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
                    "worker": {k: placed[k] for k in ("worker", "node", "device")},
                },
            )
        except OSError as exc:
            full = disk_full_path(exc) is not None
            if not full and not isinstance(exc, FileNotFoundError):
                raise
            msg = f"{exc.strerror}: {exc.filename or tmp}" if full else str(exc)
            if full:
                self._note_disk_full(exc, tmp)
            self.failed[s.key] = msg
            self._bar(s.stage).update(1)
            self._record(StepOutcome(s.stage, s.key, False, reason, seconds, info, msg, **placed))
            self._stop = self._stop or self.fail_fast
            return
        self._bar(s.stage).update(1)
        self._record(StepOutcome(s.stage, s.key, False, reason, seconds, info, **placed))
        if self.remote is not None:
            self.remote.upload(self.cache, s.stage, s.key, replace=self._forced(s))

    def _note_disk_full(self, exc: BaseException, fallback: Path) -> None:
        """The disk is full: stop handing out work (what runs finishes; what is built is kept and published)."""
        with self._commit_lock:
            if self._disk_full is None:
                self._disk_full = disk_full_path(exc) or str(fallback)
                logger.error("no space left on device writing %s: stopping the build", self._disk_full)
            self._stop = True

    def _disk_full_info(self) -> dict[str, Any] | None:
        """Where the disk filled up, and about how much more space the steps left to do and their publishing need:
        the mean size of each stage's outputs made so far (or a typical size where none was), at least 1 MB."""
        if self._disk_full is None:
            return None
        made: dict[str, list[int]] = defaultdict(list)
        todo: list[str] = []
        for step in self._steps.values():
            if (rec := self.cache.record(step.stage, step.key)) is not None:
                made[step.stage].append(sum(rec["outputs"].values()))
            else:
                todo.append(step.stage)
        mean = {stage: sum(sizes) / len(sizes) for stage, sizes in made.items()}
        needed = sum(mean.get(stage, _TYPICAL_BYTES[stage]) for stage in todo)
        unpublished = sum(not vp.output.is_file() for vp in self.plan.videos)
        needed += unpublished * mean.get("mux", _TYPICAL_BYTES["mux"])
        where = Path(self._disk_full)
        while not where.exists() and where != where.parent:
            where = where.parent
        return {
            "path": self._disk_full,
            "needed_bytes": int(max(needed, 1e6)),
            "free_bytes": shutil.disk_usage(where).free,
        }

    def _bar(self, stage: str) -> Any:
        if stage not in self._bars:
            total = len({d.key for vp in self.plan.videos for d in vp.decisions if d.stage == stage and not d.cached})
            self._bars[stage] = self.progress.stage(stage, total)
            if self.events is not None:
                self._bars[stage] = _EventBar(self._bars[stage], stage, total, self.events)
        return self._bars[stage]

    def _stage_finished(self, stage: str) -> None:
        self.executor.stage_done(stage)
        if stage in self._bars:
            self._bars.pop(stage).close()

    def _close_finished_bars(self) -> None:
        for stage in [s for s in self._bars if not self._left[s]]:
            self._bars.pop(stage).close()

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
        """Note a step's outcome. A video whose final step is done is published now, not at the end of the run (a
        CI log sees it complete, a kill keeps it), and one whose step failed is reported failed now."""
        first = outcome.key not in self.outcomes
        self.outcomes[outcome.key] = outcome
        if first:
            self._settle(outcome.key, outcome.error is None)
        for vp in self._users.get(outcome.key, ()):
            if vp.video.id in self._results or (outcome.error is None and outcome.key != vp.steps[-1].key):
                continue
            result = self._video_result(vp, stopped=False)
            # Published (or it could not be): final. A failed one is made again at the end, with every step known.
            self._results[vp.video.id] = result if outcome.error is None else None
            self._announce(result)

    def _announce(self, result: VideoResult) -> None:
        """A video is done: the progress reporter says so, and `events` gets {"event": "video", id, status, output,
        error}."""
        self.progress.video(result)
        if self.events is not None:
            fields = {"id": result.id, "status": result.status, "output": result.output, "error": result.error}
            self.events({"event": "video", **fields})

    def _result(self, vp: VideoPlan, stopped: bool) -> VideoResult:
        """A video's result at the end of the run: the one published during the run, or (failed, skipped, or left
        by --fail-fast with every step cached) made now."""
        if (done := self._results.get(vp.video.id)) is not None:
            return done
        if stopped:  # --fail-fast: steps already in the cache are this run's too (a video cached, not skipped)
            for s in vp.steps:
                if s.key not in self.outcomes and s.key not in self.failed and not self._forced(s):
                    if (rec := self.cache.record(s.stage, s.key)) is not None:
                        self.outcomes[s.key] = StepOutcome(s.stage, s.key, True, "unchanged", 0.0, rec.get("info", {}))
        result = self._video_result(vp, stopped)
        if vp.video.id not in self._results:
            self._announce(result)
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
            name = STAGES[final.stage].outputs[0]
            src = self.cache.output(final.stage, final.key, name)
            if not self.cache.intact(final.stage, final.key, name):  # never publish bytes that are not the record's
                error = f"publish: {src} changed after it was checked (damaged cache): run the build again"
                return VideoResult(vp.video.id, "failed", None, vp.renderer, outcomes, error)
            try:
                publish(src, vp.output)
            except OSError as exc:  # this video only: the others are still published, and the report written
                if disk_full_path(exc) is not None:
                    self._note_disk_full(exc, vp.output)
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
            if self._disk_full is not None:
                error = "not run: the disk is full"
            return VideoResult(vp.video.id, "skipped", None, vp.renderer, outcomes, error)
        return VideoResult(vp.video.id, "failed", None, vp.renderer, outcomes, error)


#: Bytes a step's outputs typically take (a 30 s video at 256 pixels), for the space a build still needs when none
#: of its stage's outputs has been made yet.
_TYPICAL_BYTES: Mapping[str, float] = {
    "prompt": 1e3,
    "image": 5e5,
    "voice": 1e6,
    "audio": 1e6,
    "animate": 4e6,
    "enhance": 8e6,
    "mux": 4e6,
}


def _on_gpu(step: Step) -> bool:
    """Whether a step runs where the models run (a GPU when there is one): every stage that is not CPU-parallel, and
    the GPU renderer that batches across videos."""
    return not STAGES[step.stage].parallel or step.target in BATCHED_GPU_TARGETS


def _thaw(value: Any) -> Any:
    from batch.manifest import thaw

    return thaw(value)


class _EventBar:
    """A progress bar that also reports to `events`: {"event": "stage", stage, total} when the stage starts, then
    {"event": "step", stage, done, total} for each finished step."""

    def __init__(self, bar: Any, stage: str, total: int, events: Callable[[dict[str, Any]], None]) -> None:
        self.bar, self.stage, self.total, self.events = bar, stage, total, events
        self.done = 0
        events({"event": "stage", "stage": stage, "total": total})

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.events({"event": "step", "stage": self.stage, "done": self.done, "total": self.total})

    def close(self) -> None:
        self.bar.close()


class EventFile:
    """Writes events as JSON lines with their time (`build --events FILE`), each flushed at once so that a reader
    (the studio's job page) sees the build's progress live."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps({**event, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
