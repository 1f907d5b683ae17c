"""The studio's build queue: jobs kept in one SQLite file (history survives a restart), each build run as
`python -m batch.cli build MANIFEST --json --events FILE` in its own process, one at a time per build folder.

A subprocess keeps the server out of the build's memory and makes cancelling clean: SIGTERM is the CLI's own kill
path, which leaves nothing partial (the next build resumes from the cache). Finished jobs can call a webhook.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from batch.web.config import ServeConfig

logger = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
#: Seconds to wait after SIGTERM before SIGKILL.
TERM_GRACE = 20.0
#: Webhook: attempts, and the first pause between them (doubled after each failure).
WEBHOOK_ATTEMPTS = 4
WEBHOOK_BACKOFF = 0.5
WEBHOOK_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest TEXT NOT NULL,
    only_ids TEXT NOT NULL DEFAULT '[]',
    force TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER,
    error TEXT,
    result TEXT,
    webhook TEXT,
    webhook_status TEXT,
    rerun_of INTEGER
)
"""


@dataclasses.dataclass
class Job:
    id: int
    manifest: str
    only: list[str]
    force: list[str]
    status: str
    created: float
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    error: str | None = None
    #: The build's `--json` output (per-video results), once it finished.
    result: dict[str, Any] | None = None
    webhook: str | None = None
    webhook_status: str | None = None
    rerun_of: int | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobStore:
    """Jobs in SQLite. One connection shared by the server's threads, behind a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(
        self, manifest: str, only: Sequence[str], force: Sequence[str], webhook: str | None, rerun_of: int | None = None
    ) -> Job:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (manifest, only_ids, force, status, created, webhook, rerun_of) VALUES (?,?,?,?,?,?,?)",
                (manifest, json.dumps(list(only)), json.dumps(list(force)), "queued", time.time(), webhook, rerun_of),
            )
            job_id = cur.lastrowid
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, statuses: Iterable[str] = STATUSES, limit: int = 200) -> list[Job]:
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY id DESC LIMIT ?", (*statuses, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: int, **fields: Any) -> None:
        cols = {
            ("only_ids" if k == "only" else k): (json.dumps(v) if k in ("only", "force", "result") else v)
            for k, v in fields.items()
        }
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), job_id)
            )

    def recover(self) -> int:
        """After a restart: jobs that were running when the server stopped are failed (their builds were killed with
        it and left nothing partial); queued jobs stay queued and run now. Returns how many were failed."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE status = 'running'",
                (time.time(), "the server stopped while this build ran; nothing partial was kept: re-run it"),
            )
            return cur.rowcount


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        manifest=row["manifest"],
        only=json.loads(row["only_ids"]),
        force=json.loads(row["force"]),
        status=row["status"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        exit_code=row["exit_code"],
        error=row["error"],
        result=json.loads(row["result"]) if row["result"] else None,
        webhook=row["webhook"],
        webhook_status=row["webhook_status"],
        rerun_of=row["rerun_of"],
    )


class JobQueue:
    """Runs queued jobs in order, one at a time: the server's manifests all build into its one build folder (a
    second build there would only wait on the first one's locks).

    `manifest_path(name)` maps a job's manifest name to its file (None when it is gone); `on_finish(job)` is called
    (in the job's own thread) when a job has ended."""

    def __init__(
        self,
        store: JobStore,
        config: ServeConfig,
        manifest_path: Callable[[str], Path | None],
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = store
        self.on_finish = on_finish
        self.config = config
        self.manifest_path = manifest_path
        self.jobs_dir = store.path.parent / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Condition()
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._cancelled: set[int] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._waiters: list[threading.Thread] = []

    # -- files of a job -------------------------------------------------------------------------------------------
    def log_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id}.log"

    def events_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id}.events.jsonl"

    def log(self, job_id: int, tail: int = 64 * 1024) -> str:
        """The end of the build's log (its stderr)."""
        try:
            with self.log_path(job_id).open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def progress(self, job_id: int) -> list[dict[str, Any]]:
        """Per stage, in the order the build ran them: {stage, done, total}, from the build's events."""
        stages: dict[str, dict[str, Any]] = {}
        try:
            lines = self.events_path(job_id).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # the line being written
            stage = event.get("stage")
            if event.get("event") == "stage":
                stages[stage] = {"stage": stage, "done": 0, "total": event.get("total", 0)}
            elif event.get("event") == "step" and stage in stages:
                stages[stage]["done"] = max(stages[stage]["done"], event.get("done", 0))
        return list(stages.values())

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None unless queued."""
        if job.status != "queued":
            return None
        queued = sorted(j.id for j in self.store.list(["queued"], limit=10_000))
        return queued.index(job.id) + 1 if job.id in queued else None

    # -- control --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        failed = self.store.recover()
        if failed:
            logger.warning("%d job(s) were running when the server stopped; marked failed", failed)
        self._thread = threading.Thread(target=self._loop, name="dhbatch-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop starting jobs; cancel the running builds (SIGTERM) and wait for them."""
        with self._wake:
            self._stopping = True
            running = list(self._running)
            self._wake.notify_all()
        for job_id in running:
            self.cancel(job_id, reason="the server stopped")
        for thread in [self._thread, *self._waiters]:
            if thread is not None:
                thread.join(timeout=TERM_GRACE + 5)

    def submit(
        self,
        manifest: str,
        only: Sequence[str] = (),
        force: Sequence[str] = (),
        webhook: str | None = None,
        rerun_of: int | None = None,
    ) -> Job:
        job = self.store.add(manifest, only, force, webhook, rerun_of)
        with self._wake:
            self._wake.notify_all()
        return job

    def cancel(self, job_id: int, reason: str = "cancelled") -> Job | None:
        """A queued job is cancelled at once; a running one is sent SIGTERM (the job ends when its build has)."""
        with self._wake:
            job = self.store.get(job_id)
            if job is None or job.final:
                return job
            if job.status == "queued":
                self.store.update(job_id, status="cancelled", finished=time.time(), error=reason)
            elif job_id in self._running:
                self._cancelled.add(job_id)
                self._running[job_id].send_signal(signal.SIGTERM)
                self.store.update(job_id, error=reason)
        return self.store.get(job_id)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                queued = sorted(self.store.list(["queued"], limit=10_000), key=lambda j: j.id)
                job = queued[0] if queued and not self._running else None
                if job is not None:
                    self._launch(job)
                self._wake.wait(timeout=1.0)

    def _launch(self, job: Job) -> None:
        path = self.manifest_path(job.manifest)
        if path is None:
            self.store.update(job.id, status="failed", finished=time.time(), error=f"manifest {job.manifest!r} is gone")
            return
        s = self.config
        chosen = [arg for stage in job.force for arg in ("--force", stage)] + (
            ["--only", *job.only] if job.only else []
        )
        cmd = [sys.executable, "-m", "batch.cli", "-v", "build", str(path), "--json", *chosen]
        cmd += ["--events", str(self.events_path(job.id)), "--build-dir", str(s.build_dir)]
        cmd += ["--checkpoints", str(s.checkpoints), "--device", s.device, "--jobs", str(s.jobs)]
        self.events_path(job.id).unlink(missing_ok=True)
        out = (self.jobs_dir / f"{job.id}.json").open("wb")
        log = self.log_path(job.id).open("wb")
        log.write(f"$ dhbatch build manifests/{path.name} {' '.join(chosen)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=log, stdin=subprocess.DEVNULL, cwd=s.project)
        except OSError as exc:
            self.store.update(job.id, status="failed", finished=time.time(), error=f"cannot start the build: {exc}")
            out.close()
            log.close()
            return
        self._running[job.id] = proc
        self.store.update(job.id, status="running", started=time.time())
        waiter = threading.Thread(
            target=self._wait, args=(job.id, proc, out, log), name=f"dhbatch-job-{job.id}", daemon=True
        )
        self._waiters = [*(t for t in self._waiters if t.is_alive()), waiter]
        waiter.start()

    def _wait(self, job_id: int, proc: subprocess.Popen[bytes], out: Any, log: Any) -> None:
        deadline = None
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if job_id in self._cancelled:
                    deadline = deadline or time.monotonic() + TERM_GRACE
                    if time.monotonic() > deadline:
                        proc.kill()
        out.close()
        log.close()
        result_file = self.jobs_dir / f"{job_id}.json"
        try:
            result = json.loads(result_file.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            result = None
        result_file.unlink(missing_ok=True)
        with self._wake:
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
            job = self.store.get(job_id)
            error = job.error if job is not None else None
            if cancelled:
                status = "cancelled"
            elif code == 0:
                status, error = "done", None
            else:
                status = "failed"
                error = _failure(code, result, self.log(job_id, tail=4000))
            self.store.update(
                job_id,
                status=status,
                finished=time.time(),
                exit_code=code,
                error=error,
                result=result if isinstance(result, dict) else None,
            )
            del self._running[job_id]
            self._wake.notify_all()
        job = self.store.get(job_id)
        if job is not None and self.on_finish is not None:
            self.on_finish(job)


def _failure(code: int, result: Any, log: str) -> str:
    """What to say about a build that did not succeed: the failed videos, else the CLI's error lines."""
    if isinstance(result, dict) and result.get("videos"):
        failed = [v for v in result["videos"] if v.get("status") in ("failed", "skipped")]
        if failed:
            return f"{len(failed)} of {len(result['videos'])} videos failed: " + "; ".join(
                f"{v['id']}: {v.get('error')}" for v in failed[:5]
            )
    lines = [ln for ln in log.splitlines() if ln.startswith(("error:", "  ", "interrupted"))]
    if lines:
        return "\n".join(lines[-20:])
    return f"the build exited with status {code}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook is called at the trusted address only: a redirect elsewhere is not followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post_webhook(url: str, body: bytes, attempts: int = WEBHOOK_ATTEMPTS, backoff: float = WEBHOOK_BACKOFF) -> str:
    """POST `body` (JSON) to `url`, retrying with back-off on errors and 5xx; returns what happened, for the job."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    last = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with opener.open(request, timeout=WEBHOOK_TIMEOUT) as response:
                return f"delivered (HTTP {response.status}, attempt {attempt})"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code != 429:
                return f"refused ({last}, attempt {attempt})"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    return f"failed after {attempts} attempts ({last})"


def webhook_problem(url: str, allowed: Iterable[str]) -> str | None:
    """Why `url` may not be called (None when it may): http(s) only, to a host the server was told to trust."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        return f"{url!r} is not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return f"{url!r}: a webhook is an http:// or https:// URL"
    if host not in {h.lower().strip("[]") for h in allowed}:
        return f"host {host!r} is not trusted for webhooks: start the server with --webhook-allow {host}"
    return None
