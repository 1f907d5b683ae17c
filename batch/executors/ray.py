"""The Ray executor: a build's chunks run on the actors of a Ray cluster, every GPU of a machine or of many.

One actor per GPU (`num_gpus=1`) and one per remaining CPU slot, each holding a warm `renderer.base.ModelPool` for
the whole run, so a model loads once per actor, not once per step. GPU chunks (image, the SadTalker renderer,
enhance) go to the GPU actors, CPU chunks (voice, puppet, mux) to the CPU actors; without GPUs every chunk goes to
the CPU actors. The driver submits a step as soon as its inputs are committed, so stages overlap across videos.

Inputs travel as bytes through Ray's object store and outputs come back the same way, unless the actor sees the
build folder at the driver's path (the same machine, or storage every node mounts): then it reads and writes there.
The driver commits every step itself, so nothing is committed twice or half; a stage that reports each job as it
finishes (`done`) has it streamed back and committed at once (a Ray streaming generator). An actor (or node) lost
mid-chunk has the chunk's jobs not reported yet handed to another actor (Ray restarts the lost one); a step that
fails for its own reasons comes back as that step's error, like on the local runner, and is not retried.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from queue import SimpleQueue
from typing import Any
from urllib.parse import urlparse

from batch.errors import UsageError
from batch.executors import Chunk, ChunkResult, StageFn, call_stage, loads_by_name, resolve_stage
from batch.stages import ORDER

logger = logging.getLogger(__name__)

#: Chunks handed to one actor at a time: a GPU actor gets one running and one waiting, so the GPU never idles while
#: the next chunk's inputs move; a CPU actor one, so that at the end of a build no chunk waits behind another on a
#: busy actor while a free one idles (a chunk once handed to an actor stays there).
PER_ACTOR = {True: 2, False: 1}
#: Tries per chunk when its actors keep dying (a chunk that kills its worker is not retried forever).
ATTEMPTS = 3
#: Times Ray restarts a lost actor (a restart reloads its models).
MAX_RESTARTS = 3
#: Seconds to wait for a cluster's port before saying it cannot be reached.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for the actors to start (their resources may be taken by another job).
START_TIMEOUT = 300.0


def connect(address: str) -> bool:
    """Join or start the Ray cluster `address` names; True when this call started it (the run shuts it down).

    `ray`: a local Ray instance for this run (every GPU and CPU of this machine); `auto`: the cluster `ray start` runs
    here, or the one RAY_ADDRESS names; `ray://HOST:PORT` (Ray Client) or `HOST:PORT`: that cluster. A Ray already
    initialised in this process is used as it is."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            "--cluster needs Ray, which is not installed", "install the cluster extra: pip install -e '.[cluster]'"
        ) from exc
    if ray.is_initialized():
        return False
    if address != "ray":
        _check_reachable(_auto_address() if address == "auto" else address)
    quiet = not logger.isEnabledFor(logging.INFO)
    options: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}
    # ray.init makes SIGTERM a bare sys.exit (and its core logs a crash report): the caller's handler (the CLI's,
    # which stops the build as Ctrl-C does and exits 143) is put back.
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address == "ray":
            ray.init(address="local", include_dashboard=False, **options)  # a new one, whatever RAY_ADDRESS says
            return True
        ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - Ray's refusals have many types (no cluster, a token missing, ...)
        raise UsageError(
            f"cannot join the Ray cluster {address!r}: {exc}",
            "start one (`ray start --head`), check the address, or use `--cluster ray` for a local one",
        ) from exc
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return False


def _auto_address() -> str | None:
    """Where `auto` leads: RAY_ADDRESS, or the cluster the last `ray start` on this machine recorded (None: Ray will
    say that it found none, at once)."""
    from ray._private.services import find_bootstrap_address  # Ray's own lookup, used by ray.init("auto")

    found = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
    return None if found in (None, "", "auto", "local") else found


def _check_reachable(address: str | None) -> None:
    """A quick TCP check, so an unreachable address is an error in seconds (Ray itself retries for minutes)."""
    if address is None:
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UsageError(
            f"--cluster {address!r} is not a cluster address", "use ray, auto, ray://HOST:PORT or HOST:PORT"
        )
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {host}:{port}: {exc.strerror or exc}",
            "check that its head node runs (`ray status` there) and that this machine may connect to that port",
        ) from exc


class Worker:
    """A Ray actor: one device and its warm model pool for the whole run; runs whole chunks of one stage."""

    def __init__(self, name: str, device: str, label: str, stages: Mapping[str, StageFn], marker: tuple[str, str]):
        import ray

        from renderer.base import ModelPool, resolve_device

        self.name = name
        self.pool = ModelPool()
        self.device = "cpu" if device == "cpu" else resolve_device(device)  # "cpu" without importing torch
        gpus = ray.get_gpu_ids()
        self.label = f"cuda:{gpus[0]}" if device == "cuda" and gpus else label
        self.node = ray.util.get_node_ip_address()
        self.stages = dict(stages)
        path, token = marker
        try:  # the build folder is here, at the driver's path: read and write it directly
            self.shared = Path(path).read_text() == token
        except OSError:
            self.shared = False

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "device": self.label, "pid": os.getpid(), "shared": self.shared}

    def run(self, stage: str, target: str, jobs: list[Any], paths: list[str] | None, *blobs: bytes) -> Iterator[Any]:
        """Run a chunk, streamed (the driver calls it with num_returns="streaming"): one item per job the stage
        reports finished as it goes (a stage with a `done` parameter), then the chunk's results. With `paths` (the
        inputs as the driver names them; `blobs`, their contents) the inputs are written to a private folder first
        and the outputs come back as bytes; without, the jobs' paths are used."""
        fn = resolve_stage(target, self.stages)
        local = tempfile.mkdtemp(prefix="dhbatch-") if paths is not None else None
        try:
            if local is not None:
                jobs = self._localise(jobs, dict(zip(paths, blobs, strict=True)), Path(local))
            jobs = [dataclasses.replace(job, device=self.device) for job in jobs]
            items: SimpleQueue[tuple[str, Any]] = SimpleQueue()
            t0 = time.perf_counter()

            def done(index: int, result: Any) -> None:
                items.put(("job", (index, result, time.perf_counter() - t0)))

            def work() -> None:  # on a thread, so that this method can yield while the stage runs
                try:
                    items.put(("end", call_stage(fn, stage, jobs, self.pool, done)))
                except BaseException as exc:  # noqa: BLE001 - handed to the actor's thread, raised there
                    items.put(("raise", exc))

            threading.Thread(target=work, name=f"dhbatch-{stage}", daemon=True).start()
            sent: set[int] = set()
            while True:
                kind, value = items.get()
                if kind == "raise":
                    raise value
                if kind == "job":
                    index, result, seconds = value
                    sent.add(index)
                    files = self._files(jobs[index]) if local is not None else None
                    yield {"index": index, "result": result, "seconds": seconds, "files": files}
                    continue
                results, seconds = value
                outputs = None
                if local is not None:
                    outputs = [{} if i in sent else self._files(job) for i, job in enumerate(jobs)]
                loads = loads_by_name(self.pool)
                yield {"results": results, "outputs": outputs, "seconds": seconds, "loads": loads, "pid": os.getpid()}
                return
        finally:
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)

    @staticmethod
    def _files(job: Any) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in Path(job.out_dir).iterdir() if p.is_file()}

    @staticmethod
    def _localise(jobs: list[Any], files: dict[str, bytes], root: Path) -> list[Any]:
        out = []
        for i, job in enumerate(jobs):
            inputs = {}
            for name, path in job.inputs.items():
                local = root / f"{i}" / "in" / name / Path(path).name
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(files[str(path)])
                inputs[name] = local
            out_dir = root / f"{i}" / "out"
            out_dir.mkdir(parents=True)
            out.append(dataclasses.replace(job, inputs=inputs, out_dir=out_dir))
        return out


@dataclasses.dataclass
class _Actor:
    handle: Any
    name: str
    gpu: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    running: int = 0
    chunks: int = 0
    #: Process ids of its incarnations that died (Ray restarts it MAX_RESTARTS times).
    dead: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Task:
    chunk: Chunk
    actor: _Actor
    blobs: list[Any]
    #: The chunk's jobs this task runs (a chunk back from a lost worker runs only those not reported finished).
    indices: list[int]


class RayExecutor:
    """Chunks on the actors of a Ray cluster (see the module's docstring). `gpu_resource` names the resource that
    marks a GPU (Ray's "GPU"; a custom one, e.g. for accelerators Ray does not know, makes its actors run on the
    CPU devices). `transfer`: "auto" (the build folder where actors see it, bytes elsewhere) or "bytes" (always)."""

    overlap = True

    def __init__(
        self,
        address: str,
        *,
        scratch: Path,
        device: str = "auto",
        stages: Mapping[str, StageFn] | None = None,
        gpu_resource: str = "GPU",
        cpu_workers: int | None = None,
        transfer: str = "auto",
    ) -> None:
        self.address = address
        self._device_spec = device
        self._gpu_resource = gpu_resource
        self._cpu_workers = cpu_workers
        self._stages = dict(stages or {})
        self._transfer = transfer
        self._marker = scratch / f"cluster-{uuid.uuid4().hex}"
        self._token = uuid.uuid4().hex
        self._own: bool | None = None  # None: not connected yet (a build with nothing to run never connects)
        self._counts: dict[bool, int] = {}
        self._actors: dict[bool, list[_Actor]] = {}
        #: Chunks not handed to an actor yet, per kind: a heap of (rank, chunk) (`_enqueue`).
        self._queue: dict[bool, list[tuple[tuple[bool, int, int], Chunk]]] = {True: [], False: []}
        self._tasks: dict[Any, _Task] = {}  # object ref -> what it runs
        self._attempts: dict[int, int] = collections.Counter()
        self._lost_on: dict[int, set[str]] = collections.defaultdict(set)
        #: Jobs of a chunk reported finished as it ran (chunk id -> job index -> result): not run again.
        self._reported: dict[int, dict[int, Any]] = collections.defaultdict(dict)
        self._ready: list[ChunkResult] = []  # to return at the next wait
        self._finished: list[ChunkResult] = []
        self._loads: dict[tuple[str, int], dict[str, int]] = {}

    def _connect(self) -> dict[bool, int]:
        """Join the cluster (the first time work comes) and size the two kinds of workers from its resources."""
        if self._own is None:
            import ray

            self._own = connect(self.address)
            resources = ray.cluster_resources()
            no_gpu = self._device_spec == "cpu" and self._gpu_resource == "GPU"  # a custom resource's actors use CPUs
            gpus = 0 if no_gpu else int(resources.get(self._gpu_resource, 0))
            cpus = int(resources.get("CPU", 1))
            #: A GPU actor takes a CPU slot of its own where there are enough (it prepares the GPU's batches).
            self._gpu_cpus = 1 if cpus >= 2 * gpus else 0
            self._counts = {True: gpus, False: self._cpu_workers or max(1, cpus - gpus * self._gpu_cpus)}
        return self._counts

    # -- what the driver asks -------------------------------------------------------------------------------------
    def _kind(self, gpu: bool) -> bool:
        """GPU chunks go to the GPU actors, or to the CPU actors on a cluster without GPUs."""
        return self._connect()[True] > 0 and gpu  # connects first, whichever kind is asked

    def workers(self, gpu: bool) -> int:
        return self._connect()[self._kind(gpu)]

    def idle(self, gpu: bool) -> bool:
        kind = self._kind(gpu)
        actors = self._actors.get(kind)
        return not self._queue[kind] and (actors is None or any(a.running == 0 for a in actors))

    def submit(self, chunk: Chunk) -> None:
        self._enqueue(chunk)
        self._dispatch()

    def _enqueue(self, chunk: Chunk) -> None:
        """Later stages first (a video whose voice is done renders before the next video's voice starts, so videos
        finish early and stages overlap), then in the order submitted; a chunk back from a lost worker first."""
        rank = (not self._attempts[chunk.id], -ORDER.index(chunk.stage), chunk.id)
        heapq.heappush(self._queue[self._kind(chunk.gpu)], (rank, chunk))

    def wait(self) -> list[ChunkResult]:
        import ray

        out: list[ChunkResult] = []
        while not out and (self._tasks or self._ready):
            out, self._ready = self._ready, []  # chunks that failed without running (no worker left)
            if out or not self._tasks:
                break
            done, _ = ray.wait(list(self._tasks), num_returns=1, timeout=1.0)  # a timeout: Ctrl-C gets through
            if not done:
                continue
            done, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=0)
            for stream in done:
                result = self._receive(stream, self._tasks[stream])
                if result is not None:
                    out.append(result)
            self._dispatch()
        self._finished += out
        return out

    def stage_done(self, stage: str) -> None:
        pass  # the actors keep every model warm for the whole run

    def interrupt(self) -> list[ChunkResult]:
        """Ctrl-C: the actors are stopped (what they had half-written is the driver's to delete); the chunks that had
        finished come back to be committed."""
        import ray

        for queue in self._queue.values():
            queue.clear()
        if self._tasks:
            done, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=0)
            for stream in done:
                with contextlib.suppress(Exception):
                    if (result := self._receive(stream, self._tasks[stream], retry=False)) is not None:
                        self._finished.append(result)
        self._stop_actors()
        return list(self._finished)

    def close(self) -> None:
        import ray

        self._stop_actors()
        self._marker.unlink(missing_ok=True)
        if self._own and ray.is_initialized():
            ray.shutdown()

    def model_loads(self) -> dict[str, int]:
        total: dict[str, int] = collections.Counter()
        for (name, _pid), loads in self._loads.items():  # a restarted actor loads again
            for model, n in loads.items():
                total[f"{name}/{model}"] += n
        return dict(sorted(total.items()))

    def describe(self) -> str:
        where = "a local Ray" if self.address == "ray" else f"Ray at {self.address}"
        if not self._counts:
            return f"{where} (not used)"
        gpu = f"{self._counts[True]} {self._gpu_resource} + " if self._counts[True] else ""
        cpus = self._counts[False]
        return f"{where}: {gpu}{cpus} CPU worker{'s' * (cpus != 1)}"

    # -- actors ---------------------------------------------------------------------------------------------------
    def _start(self, kind: bool) -> list[_Actor]:
        """Start the actors of one kind (when its first chunk comes), and wait until they run."""
        import ray

        if kind not in self._actors:
            if not self._marker.exists():
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.write_text(self._token)
            remote = ray.remote(Worker)
            actors = []
            for i in range(self._counts[kind]):
                options: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": 0}
                if kind and self._gpu_resource == "GPU":
                    options.update(num_gpus=1, num_cpus=self._gpu_cpus)
                    device, label = "cuda", "cuda"
                elif kind:
                    options.update(resources={self._gpu_resource: 1}, num_cpus=self._gpu_cpus)
                    device, label = "cpu", f"{self._gpu_resource}:{i}"
                else:
                    options.update(num_cpus=1)
                    device, label = "cpu", "cpu"
                name = f"{'gpu' if kind else 'cpu'}-{i}"
                marker = (str(self._marker), self._token if self._transfer == "auto" else "")
                handle = remote.options(**options).remote(name, device, label, self._stages, marker)
                actors.append(_Actor(handle, name, kind))
            try:
                infos = ray.get([a.handle.info.remote() for a in actors], timeout=START_TIMEOUT)
            except ray.exceptions.GetTimeoutError as exc:
                raise UsageError(
                    f"the Ray cluster did not start {len(actors)} {'GPU' if kind else 'CPU'} workers in "
                    f"{START_TIMEOUT:.0f} s",
                    "check `ray status`: another job may hold its resources",
                ) from exc
            except ray.exceptions.RayActorError as exc:
                raise UsageError(
                    f"a Ray worker failed to start: {exc}", "install dhbatch the same way on every node"
                ) from exc
            for actor, info in zip(actors, infos, strict=True):
                actor.info = info
            self._actors[kind] = actors
            where = collections.Counter(
                f"{i['node']} ({'shared build folder' if i['shared'] else 'bytes'})" for i in infos
            )
            logger.info("%d %s workers: %s", len(actors), "GPU" if kind else "CPU", dict(where))
        return self._actors[kind]

    def _dispatch(self) -> None:
        """Hand queued chunks to the least busy actors of their kind (another actor than one lost with the chunk
        where there is one)."""
        for kind, queue in self._queue.items():
            while queue:
                actors = self._start(kind)
                if not actors:
                    self._fail_all(queue, "no worker of this kind is left on the cluster (every one died)")
                    break
                chunk = queue[0][1]
                free = [a for a in actors if a.running < PER_ACTOR[a.gpu]]
                fresh = [a for a in free if a.name not in self._lost_on[chunk.id]]
                if not free or (not fresh and len(self._lost_on[chunk.id]) < len(actors)):
                    break
                actor = min(fresh or free, key=lambda a: (a.running, a.chunks))
                heapq.heappop(queue)
                self._send(chunk, actor)

    def _send(self, chunk: Chunk, actor: _Actor) -> None:
        import ray

        indices = [i for i in range(len(chunk.jobs)) if i not in self._reported[chunk.id]]
        jobs = [chunk.jobs[i] for i in indices]
        paths: list[str] | None = None
        blobs: list[Any] = []
        if not actor.info["shared"]:
            paths = sorted({str(p) for job in jobs for p in job.inputs.values()})
            blobs = [ray.put(Path(p).read_bytes()) for p in paths]
        stream = actor.handle.run.options(num_returns="streaming").remote(
            chunk.stage, chunk.target, jobs, paths, *blobs
        )
        actor.running += 1
        actor.chunks += 1
        self._tasks[stream] = _Task(chunk, actor, blobs, indices)

    def _receive(self, stream: Any, task: _Task, retry: bool = True) -> ChunkResult | None:
        """The next item of a task's stream: a job reported finished (its outputs written into the driver's folder
        and handed to `Chunk.on_result`), or the chunk's end, returned as its result. None for a job, and when the
        actor was lost (the chunk, less the jobs already reported, went back in the queue)."""
        import ray

        chunk, actor = task.chunk, task.actor
        try:
            got = ray.get(next(stream))
        except StopIteration:  # ended without its last item: taken as lost
            got = None
        except _lost_exceptions() as exc:  # the actor, its process or its node died: the chunk goes elsewhere
            del self._tasks[stream]
            actor.running -= 1
            return self._lost(task, exc) if retry else None
        except ray.exceptions.RayError as exc:  # the task could not run (its arguments were lost, ...)
            got = {"results": [_lost_error(chunk, exc)] * len(task.indices), "seconds": 0.0, "outputs": None}
            got.update(loads={}, pid=actor.info["pid"])
        if got is None:
            del self._tasks[stream]
            actor.running -= 1
            return self._lost(task, RuntimeError("the stream ended early")) if retry else None
        queued = max(0.0, time.monotonic() - chunk.submitted - got["seconds"])
        where = (actor.name, actor.info["node"], actor.info["device"])
        if "index" in got:  # one job, reported as it finished
            index = task.indices[got["index"]]
            self._place(chunk.jobs[index], got["result"], got["files"])
            self._reported[chunk.id][index] = got["result"]
            if chunk.on_result is not None:
                chunk.on_result(index, got["result"], ChunkResult(chunk, [], got["seconds"], queued, *where))
            return None
        del self._tasks[stream]
        actor.running -= 1
        results = dict(self._reported.pop(chunk.id, {}))
        for i, index in enumerate(task.indices):
            results[index] = got["results"][i]
            self._place(chunk.jobs[index], got["results"][i], got["outputs"][i] if got["outputs"] else None)
        actor.info["pid"] = got["pid"]  # the incarnation that ran it (a restarted actor has a new one)
        self._loads[(actor.name, got["pid"])] = got["loads"]
        return ChunkResult(chunk, [results[i] for i in range(len(chunk.jobs))], got["seconds"], queued, *where)

    @staticmethod
    def _place(job: Any, result: Any, files: dict[str, bytes] | None) -> None:
        """Outputs that came as bytes, into the driver's folder for the job; a failed step's artifact with them."""
        for name, data in (files or {}).items():
            (Path(job.out_dir) / name).write_bytes(data)
        artifact = getattr(result, "artifact", None)
        if files and isinstance(artifact, Path) and artifact.name in files:
            result.artifact = Path(job.out_dir) / artifact.name

    def _lost(self, task: _Task, exc: Exception) -> ChunkResult | None:
        chunk, actor = task.chunk, task.actor
        if actor.info["pid"] not in actor.dead:  # one death, however many of its chunks it took along
            actor.dead.add(actor.info["pid"])
        self._attempts[chunk.id] += 1
        self._lost_on[chunk.id].add(actor.name)
        logger.warning("worker %s was lost running %s (%s)", actor.name, chunk.stage, type(exc).__name__)
        if len(actor.dead) > MAX_RESTARTS:  # Ray gave up restarting it
            self._actors[actor.gpu] = [a for a in self._actors[actor.gpu] if a is not actor]
        reported = self._reported[chunk.id]
        if self._attempts[chunk.id] >= ATTEMPTS or len(reported) == len(chunk.jobs):  # given up, or all reported
            self._reported.pop(chunk.id)
            error = _lost_error(chunk, exc)
            results = [reported.get(i, error) for i in range(len(chunk.jobs))]
            return ChunkResult(chunk, results, 0.0, 0.0, actor.name, actor.info["node"], actor.info["device"])
        for index in task.indices:  # whatever the lost actor wrote there is not kept (reported jobs are)
            if index in self._reported[chunk.id]:
                continue
            job = chunk.jobs[index]
            shutil.rmtree(job.out_dir, ignore_errors=True)
            Path(job.out_dir).mkdir(parents=True)
        self._enqueue(chunk)
        return None

    def _fail_all(self, queue: list[tuple[tuple[bool, int, int], Chunk]], why: str) -> None:
        from renderer.base import BackendError

        while queue:
            _, chunk = heapq.heappop(queue)
            error = BackendError(f"{chunk.stage}: {why}", "check the cluster (`ray status`) and run again")
            self._ready.append(ChunkResult(chunk, [error] * len(chunk.jobs), 0.0, 0.0, "none"))

    def _stop_actors(self) -> None:
        import ray

        for actors in self._actors.values():
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor.handle, no_restart=True)
        self._actors.clear()
        self._tasks.clear()


def _lost_exceptions() -> tuple[type[Exception], ...]:
    from ray import exceptions as e

    return (e.RayActorError, e.ObjectLostError, e.WorkerCrashedError, e.NodeDiedError, e.OutOfMemoryError)


def _lost_error(chunk: Chunk, exc: Exception) -> Exception:
    from renderer.base import BackendError

    return BackendError(
        f"{chunk.stage}: the Ray worker running it was lost {ATTEMPTS} times ({type(exc).__name__})",
        "check the cluster's nodes (`ray status`, their logs) and run again: what was built is kept",
    )
