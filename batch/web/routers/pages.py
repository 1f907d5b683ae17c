"""The pages: the project's manifests, a manifest's gallery, the new-video form, the job queue and a job.

Server-rendered (Jinja, autoescaped); static/studio.js only refreshes a job's progress and the queue. Every form
carries the CSRF token (auth.refuse_cross_site checks it) and works without the script.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile

from batch.errors import DHBatchError
from batch.studio import MAX_PORTRAIT_BYTES, MAX_RECORDING_BYTES, NewVideo, Upload, voice_choices
from batch.web import auth, catalog
from batch.web.models import error_body
from batch.web.state import State, StudioState

router = APIRouter(include_in_schema=False)

#: What the pages may load: only this server's own files (no inline script, no CDN, no frames).
CSP = (
    "default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A page, with the browser's CSRF token in its forms (and its cookie set when new)."""
    token, new = auth.csrf_token(request)
    page = request.app.state.templates.get_template(name).render(csrf=token, **context)
    response = HTMLResponse(page, status_code=status)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if new:
        response.set_cookie(auth.CSRF_COOKIE, token, httponly=True, samesite="strict")
    return response


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, state: State) -> HTMLResponse:
    cfg = state.config
    manifests = [catalog.overview(cfg.build_dir, name, path) for name, path in state.studio.manifest_paths().items()]
    return render(request, "index.html", nav="manifests", manifests=manifests)


@router.get("/manifests/{name}", response_class=HTMLResponse)
def manifest_page(name: str, request: Request, state: State) -> HTMLResponse:
    path = state.manifest_path(name)
    if path is None:
        raise HTTPException(404, f"no manifest named {name!r}")
    info = catalog.gallery(state.config.build_dir, state.config.checkpoints, name, path)
    return render(request, "gallery.html", nav="manifests", m=info)


@router.post("/manifests/{name}/build")
async def build_manifest(name: str, request: Request, state: State) -> RedirectResponse:
    form = await request.form(**auth.FORM_LIMITS)
    only = [str(form["only"])] if form.get("only") else []
    force = [str(form["force"])] if form.get("force") else []
    return _see(f"/jobs/{state.submit_manifest(name, only, force, None).id}")


@router.get("/new", response_class=HTMLResponse)
def new_form(request: Request, state: State) -> HTMLResponse:
    return _new_page(request, state, {}, [])


def _new_page(
    request: Request, state: StudioState, values: dict[str, Any], errors: list[str], status: int = 200
) -> HTMLResponse:
    return render(
        request,
        "new.html",
        status=status,
        nav="new",
        characters=state.studio.characters(),
        voices=voice_choices(state.config.checkpoints),
        values=values,
        errors=errors,
        limits={"portrait": MAX_PORTRAIT_BYTES // 2**20, "recording": MAX_RECORDING_BYTES // 2**20},
    )


async def _upload(field: Any, limit: int) -> Upload | None:
    if not isinstance(field, UploadFile) or not field.filename:
        return None
    return Upload(field.filename, await field.read(limit + 1))  # one byte over the limit is enough to refuse it


@router.post("/new", response_class=HTMLResponse)
async def new_video(request: Request, state: State) -> Response:
    form = await request.form(**auth.FORM_LIMITS)
    values = {k: v for k, v in form.items() if isinstance(v, str) and k != auth.CSRF_FIELD}
    character, script = values.get("character", "pick"), values.get("script", "text")
    engine, _, model = values.get("voice", "").partition("|")
    voice: dict[str, Any] = {"engine": engine, "model": model} if engine else {}
    try:
        if values.get("rate"):
            voice["rate"] = float(values["rate"])
        seed = int(values.get("seed") or 0)
    except ValueError:
        return _new_page(request, state, values, ["rate and seed are numbers"], 422)
    new = NewVideo(
        id=values.get("id", "").strip(),
        name=values.get("name", "").strip(),
        pick=values.get("pick", "") if character == "pick" else "",
        portrait=await _upload(form.get("portrait"), MAX_PORTRAIT_BYTES) if character == "portrait" else None,
        description=values.get("description", "") if character == "describe" else "",
        seed=seed,
        text=values.get("text", "") if script == "text" else "",
        recording=await _upload(form.get("recording"), MAX_RECORDING_BYTES) if script == "recording" else None,
        voice=voice,
    )
    try:
        job = state.submit_video(new)
    except DHBatchError as exc:
        body = error_body(exc)
        problems = [p.get("text") or f"{p.get('field')}: {p.get('message')}" for p in body.get("problems", [])]
        return _new_page(request, state, values, problems or [body["error"]], 422)
    return _see(f"/jobs/{job.id}")


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, state: State) -> HTMLResponse:
    jobs = [state.describe(j) for j in state.store.list()]
    return render(request, "jobs.html", nav="jobs", jobs=jobs)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, state: State) -> HTMLResponse:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return render(request, "job.html", nav="jobs", job=state.describe(job), log=state.queue.log(job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: int, state: State) -> RedirectResponse:
    if state.queue.cancel(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    return _see(f"/jobs/{job_id}")


@router.post("/jobs/{job_id}/rerun")
def rerun(job_id: int, state: State) -> RedirectResponse:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return _see(f"/jobs/{state.rerun(job).id}")


@router.get("/api/docs", response_class=HTMLResponse)
def api_docs(request: Request) -> HTMLResponse:
    """The API's documentation, made from its OpenAPI document (no CDN, no script)."""
    spec = request.app.openapi()
    operations = [
        {"method": method.upper(), "path": path, **op}
        for path, methods in spec.get("paths", {}).items()
        for method, op in methods.items()
    ]
    return render(request, "docs.html", nav="api", spec=spec, operations=operations)
