"""The app factory: `create_app(config)` → a FastAPI app serving the pages, the API under /api and the files."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from batch.errors import DHBatchError
from batch.web import auth, catalog
from batch.web.config import ServeConfig
from batch.web.models import error_body
from batch.web.state import StudioState

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
#: Largest request body accepted (a portrait or a recording, base64 in JSON included).
MAX_BODY = 40 * 1024 * 1024


def templates() -> jinja2.Environment:
    """Jinja with autoescape on for every template: everything shown is escaped unless a template says otherwise."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters["when"] = lambda seconds: catalog.when(seconds) or ""
    return env


def create_app(config: ServeConfig) -> FastAPI:
    from batch.web.routers import api_jobs, api_manifests, files, pages

    state = StudioState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.queue.start()
        try:
            yield
        finally:
            state.queue.stop()
            state.store.close()

    app = FastAPI(
        title="Digital Human Batch studio",
        description="Build talking-head videos from the project's manifests, or from one video described inline.",
        version="1",
        lifespan=lifespan,
        # The docs (pages.api_docs, no CDN) and the OpenAPI document (below) go through the same checks as every route.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(auth.require_token), Depends(auth.refuse_cross_site)],
    )
    app.state.studio = state
    app.state.templates = templates()
    for router in (pages.router, api_manifests.router, api_jobs.router, files.router):
        app.include_router(router)
    _handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    return app


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", "")


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(auth.TokenInQuery)
    async def token_cookie(request: Request, exc: auth.TokenInQuery) -> Response:
        response = RedirectResponse(exc.url, status_code=303)
        response.set_cookie(auth.TOKEN_COOKIE, exc.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(DHBatchError)
    async def library_error(request: Request, exc: DHBatchError) -> Response:
        status = 422 if exc.exit_code == 2 else 500
        return _error(request, status, error_body(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(request, exc.status_code, {"error": str(exc.detail)}, exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(
            request, 500, {"error": f"internal error: {exc.__class__.__name__}: {exc}", "hint": "see the server's log"}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"path": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return _error(request, 422, {"error": "invalid request", "problems": problems})


def _error(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    if _wants_json(request):
        return JSONResponse(body, status_code=status, headers=headers)
    page = request.app.state.templates.get_template("error.html").render(status=status, body=body, csrf="", nav="")
    return HTMLResponse(page, status_code=status, headers=headers)


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413), by Content-Length and while reading a chunked body."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit // 1024 // 1024} MB")
            return message

        await self.app(scope, counted, send)


async def _too_large(send: Any, limit: int) -> None:
    body = f'{{"error": "request body over {limit // 1024 // 1024} MB"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
