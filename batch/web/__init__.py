"""The studio: `dhbatch serve`, a web page and an HTTP API over the same planning and running code as the CLI.

Needs the `web` extra (fastapi, uvicorn, python-multipart). Nothing here is imported by `import batch`; the CLI
loads it when `serve` runs. Layout: `app.py` (the app factory), `auth.py` (token, host and cross-site checks),
`models.py` (the API's pydantic models), `routers/` (one per resource), `jobs.py` (the build queue), `catalog.py`
(what the pages and the API show of manifests and builds), `templates/` and `static/` (no CDN, no build step).
"""
