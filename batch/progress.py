"""How a build shows its progress on stderr: a tqdm bar per stage at a terminal; in a CI log (no terminal, or `CI`
set) plain lines with a UTC timestamp, which read well in a log viewer and can be grepped:

    2026-12-07T08:01:02.345Z animate: 12 steps to run
    2026-12-07T08:01:14.101Z animate: 3/12 done, ETA 35s
    2026-12-07T08:01:14.102Z video ceo-hello: built build/demo/ceo-hello.mp4 (ran voice, animate, mux)
    2026-12-07T08:01:50.020Z animate: 12/12 done in 47.7s

A stage's first line says how many steps it runs; then a line per finished step, at most one every 10 s (the last
step always); a video's line comes as soon as its last step is done (or one of its steps failed).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batch.manifest import display_path

if TYPE_CHECKING:
    from batch.run import VideoResult

#: In a CI log, at most one progress line per stage every this many seconds (the last step always has its line).
LINE_INTERVAL = 10.0


def timestamp(when: float | None = None) -> str:
    """UTC, ISO 8601, milliseconds: the same form as the `-v` log lines."""
    when = time.time() if when is None else when
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def interactive(stream: IO[str]) -> bool:
    """A person watching a terminal, not a CI job (`CI` set to anything but empty, 0 or false means CI)."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")
    return not ci and hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """Says nothing (`-q`); the base of the two that do."""

    def stage(self, stage: str, total: int) -> Any:
        """A bar for a stage's `total` steps to run: `update(n)` as steps finish, `close()` at the end."""
        return _NoBar()

    def video(self, result: VideoResult) -> None:
        """A video is done: built, cached, failed or skipped."""


def reporter(enabled: bool, stream: IO[str] | None = None) -> Progress:
    """Bars at a terminal, lines in a CI log, or nothing."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return Progress()
    return Bars(stream) if interactive(stream) else Lines(stream)


class Bars(Progress):
    """A tqdm bar per stage, redrawn in place; the videos are listed by the summary at the end."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def stage(self, stage: str, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{stage:>8}", unit="step", file=self.stream, leave=True, dynamic_ncols=True)


class Lines(Progress):
    """Timestamped plain lines (module docstring); safe to call from the runner's worker threads."""

    def __init__(self, stream: IO[str], interval: float = LINE_INTERVAL) -> None:
        self.stream = stream
        self.interval = interval
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            print(f"{timestamp()} {text}", file=self.stream, flush=True)

    def stage(self, stage: str, total: int) -> Any:
        self.say(f"{stage}: {total} step{'s' * (total != 1)} to run")
        return _LineBar(self, stage, total)

    def video(self, result: VideoResult) -> None:
        if result.status in ("failed", "skipped"):
            self.say(f"video {result.id}: {result.status.upper()} {result.error}")
            return
        ran = [s.stage for s in result.steps if s.status == "ran"]
        detail = f"ran {', '.join(ran)}" if ran else "all steps cached"
        output = display_path(Path(result.output)) if result.output else "-"
        self.say(f"video {result.id}: {result.status} {output} ({detail})")


class _LineBar:
    def __init__(self, lines: Lines, stage: str, total: int) -> None:
        self.lines, self.stage, self.total = lines, stage, total
        self.done = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.done < self.total and now - self.last < self.lines.interval:
                return
            self.last = now
            elapsed, done = now - self.start, self.done
        if done >= self.total:
            self.lines.say(f"{self.stage}: {done}/{self.total} done in {elapsed:.1f}s")
        else:
            eta = elapsed / done * (self.total - done)
            self.lines.say(f"{self.stage}: {done}/{self.total} done, ETA {eta:.0f}s")

    def close(self) -> None:
        pass


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
