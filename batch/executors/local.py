"""The local executor: chunks run in this process, one warm copy of each model, stage by stage.

GPU chunks (and every chunk with `jobs=1`) run one at a time on the driver's thread, in the order submitted; CPU
chunks of a parallel stage run on `jobs` threads. Models stay warm for a stage and are dropped when it is done.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from batch.errors import UsageError
from batch.executors import Chunk, ChunkResult, StageFn, call_stage, loads_by_name, resolve_stage

#: Numbers the thread pools, whose threads are found again by name.
_POOLS = itertools.count()


class LocalExecutor:
    overlap = False

    def __init__(self, *, device: str = "auto", jobs: int = 1, stages: Mapping[str, StageFn] | None = None) -> None:
        self.device_spec = device
        self.jobs = max(1, jobs)
        self._stages = dict(stages or {})
        self._device: str | None = None
        self._cpu_used = False
        from renderer.base import ModelPool  # light: no torch

        self._pool = ModelPool()
        self._inline: list[Chunk] = []  # GPU chunks, or any chunk with jobs=1: run by wait(), in order
        self._threaded: list[Chunk] = []  # CPU chunks waiting to start on the threads
        self._futures: list[Future] = []
        #: Every chunk that finished, until the run ends: `interrupt` returns them all, those `wait` returned too (a
        #: Ctrl-C may have come while the driver committed them; it commits each step once).
        self._finished: list[ChunkResult] = []
        self._threads: ThreadPoolExecutor | None = None
        self._prefix = f"dhbatch-local-{next(_POOLS)}"
        self._stop = threading.Event()
        self._node = socket.gethostname()

    # -- what the driver asks -------------------------------------------------------------------------------------
    def workers(self, gpu: bool) -> int:
        return 1 if gpu else self.jobs

    def idle(self, gpu: bool) -> bool:
        return True

    def submit(self, chunk: Chunk) -> None:
        threaded = self.jobs > 1 and not chunk.gpu
        (self._threaded if threaded else self._inline).append(chunk)

    def wait(self) -> list[ChunkResult]:
        if self._inline:  # GPU chunks first, alone: two render loops would only compete for the device
            self._finished.append(self._run(self._inline.pop(0)))
            return self._finished[-1:]
        if self._threaded:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix=self._prefix)
            for chunk in self._threaded:
                self._futures.append(self._threads.submit(self._run_unless_stopped, chunk))
            self._threaded.clear()
        if not self._futures:
            return []
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        return self._collect(done)

    def stage_done(self, stage: str) -> None:
        self._pool.release()

    def interrupt(self) -> list[ChunkResult]:
        """No chunk starts after this; the running ones finish before it returns: threads left inside native code
        (PyAV, ONNX Runtime) while the interpreter exits crash the process. Returns every chunk that finished, those
        `wait` returned too (a Ctrl-C may have come while the driver committed them)."""
        self._stop.set()
        self._inline.clear()
        self._threaded.clear()
        self._join()
        return list(self._finished)

    def close(self) -> None:
        self._stop.set()
        self._join()
        self._pool.release()

    def model_loads(self) -> dict[str, int]:
        return loads_by_name(self._pool)

    def describe(self) -> str:
        return self._device or ("cpu" if self._cpu_used else "not used")

    # -- running --------------------------------------------------------------------------------------------------
    def _collect(self, done: Any) -> list[ChunkResult]:
        out = []
        for future in done:
            if future.exception() is not None:  # not a stage's failure (call_stage keeps those): a bug or Ctrl-C
                raise future.exception()
            if future.result() is not None:
                out.append(future.result())
        self._futures = [f for f in self._futures if f not in done]
        return out

    def _join(self) -> None:
        if self._threads is None:
            return
        self._threads.shutdown(wait=True, cancel_futures=True)
        # A Ctrl-C inside submit() can come between a new thread's start and the pool noting it, and shutdown()
        # only joins the threads it noted: join every thread of this pool.
        for thread in threading.enumerate():
            if thread.name.startswith(f"{self._prefix}_") and thread is not threading.current_thread():
                thread.join()
        self._threads = None

    def _run_unless_stopped(self, chunk: Chunk) -> ChunkResult | None:
        if self._stop.is_set():
            return None
        result = self._run(chunk)
        self._finished.append(result)  # here, not in wait(): a Ctrl-C in submit() leaves a future untracked
        return result

    def _run(self, chunk: Chunk) -> ChunkResult:
        import dataclasses

        started = time.monotonic()
        # CPU stages (voice, puppet, mux) run on the CPU whatever --device says: resolving `auto` imports torch,
        # 1.5-2 s and 300 MB that the offline path does not need.
        device = self.device() if chunk.gpu else "cpu"
        self._cpu_used |= not chunk.gpu
        jobs = [dataclasses.replace(job, device=device) for job in chunk.jobs]
        fn = resolve_stage(chunk.target, self._stages)
        done = None
        if chunk.on_result is not None:
            report = chunk.on_result

            def done(index: int, result: Any) -> None:
                so_far = time.monotonic() - started
                report(
                    index,
                    result,
                    ChunkResult(chunk, [], so_far, started - chunk.submitted, "local", self._node, device),
                )

        results, seconds = call_stage(fn, chunk.stage, jobs, self._pool, done)
        return ChunkResult(chunk, results, seconds, started - chunk.submitted, "local", self._node, device)

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
