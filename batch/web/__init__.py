"""The studio: `dhbatch serve`, a web page and an HTTP API over the same planning and running code as the CLI.

Needs the `web` extra (fastapi, uvicorn, python-multipart). Nothing here is imported by `import batch`; the CLI
loads it when `serve` runs. Layout: `command.py` (the `serve` arguments), `config.py` (the settings, checked),
`app.py` (the app factory), `auth.py` (token, host and cross-site checks, as dependencies), `models.py` (the API's
pydantic models), `routers/` (one per resource), `state.py` (what the routes share), `jobs.py` (the build queue in
SQLite), `catalog.py` (what the pages and the API show of manifests and builds), `templates/` (Jinja, autoescaped)
and `static/` (one small script and a style sheet: no CDN, no build step).
"""
