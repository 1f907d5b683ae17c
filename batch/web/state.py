"""The objects the routes share (held on `app.state.studio`): the studio manifest, the job store and queue."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from batch.errors import ManifestError, UsageError
from batch.manifest import load_manifest
from batch.plan import check_force, select_videos, template_problems
from batch.studio import STUDIO, NewVideo, Studio
from batch.web import catalog
from batch.web.config import SERVER_DIR, ServeConfig
from batch.web.jobs import Job, JobQueue, JobStore, post_webhook, webhook_problem

logger = logging.getLogger(__name__)


class StudioState:
    """The studio manifest, the job store and queue, and the views of jobs shared by the API and the pages."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.studio = Studio(
            config.manifests_dir,
            config.build_dir / SERVER_DIR,
            build_dir=config.build_dir,
            checkpoints=config.checkpoints,
        )
        self.store = JobStore(config.build_dir / SERVER_DIR / "jobs.sqlite3")
        self.queue = JobQueue(self.store, config, self.manifest_path, on_finish=self._finished)

    def manifest_path(self, name: str) -> Path | None:
        return self.studio.manifest_paths().get(name)

    # -- making jobs ----------------------------------------------------------------------------------------------
    def submit_manifest(
        self, name: str, only: list[str], force: list[str], webhook: str | None, rerun_of: int | None = None
    ) -> Job:
        """Queue a build of a project manifest, checked first as `dhbatch validate` and the CLI's options are."""
        path = self.manifest_path(name)
        if path is None:
            raise UsageError(
                f"no manifest named {name!r}", f"known: {', '.join(self.studio.manifest_paths()) or 'none'}"
            )
        if webhook and (problem := webhook_problem(webhook, self.config.webhook_allow)):
            raise UsageError(f"webhook: {problem}")
        check_force(force)
        manifest = load_manifest(path)
        videos = select_videos(manifest, only)
        if problems := template_problems(manifest, videos):
            raise ManifestError(problems)
        return self.queue.submit(name, only, force, webhook, rerun_of)

    def submit_video(self, new: NewVideo, webhook: str | None = None) -> Job:
        """Write one new video into the studio manifest and queue its build."""
        if webhook and (problem := webhook_problem(webhook, self.config.webhook_allow)):
            raise UsageError(f"webhook: {problem}")
        vid = self.studio.add_video(new)
        return self.queue.submit(STUDIO, [vid], [], webhook)

    def rerun(self, job: Job) -> Job:
        return self.submit_manifest(job.manifest, job.only, job.force, job.webhook, rerun_of=job.id)

    # -- showing jobs ---------------------------------------------------------------------------------------------
    def describe(self, job: Job) -> dict[str, Any]:
        """A job as the API returns it (models.JobOut) and the pages show it."""
        result = job.result if isinstance(job.result, dict) else {}
        found = result.get("videos") if isinstance(result.get("videos"), list) else []
        views = [view for v in found if (view := catalog.video_view(self.config.build_dir, job.manifest, v))]
        videos = catalog.failures_first(views)
        return {
            **{k: v for k, v in dataclasses.asdict(job).items() if k != "result"},
            "position": self.queue.position(job),
            "progress": self.queue.progress(job.id),
            "videos": videos,
            "url": f"/api/jobs/{job.id}",
            "log_url": f"/api/jobs/{job.id}/log",
        }

    def _finished(self, job: Job) -> None:
        if not job.webhook:
            return
        status = post_webhook(job.webhook, json.dumps(self.describe(job)).encode())
        logger.info("job %d: webhook %s", job.id, status)
        self.store.update(job.id, webhook_status=status)


def get_state(request: Request) -> StudioState:
    return request.app.state.studio


#: A route's parameter for the shared state: `state: State`.
State = Annotated[StudioState, Depends(get_state)]
