"""Who may talk to the studio, as FastAPI dependencies applied to every route.

- A token, when the server has one (`--token` or DHBATCH_TOKEN; required to listen on anything but loopback), on
  every request: `Authorization: Bearer TOKEN`, or the cookie the page sets after it was opened once with
  `?token=TOKEN`.
- Without a token the server answers only to loopback host names (a web page elsewhere cannot reach it through a
  DNS name that points at 127.0.0.1).
- Requests that change something are refused when they come from another site (Sec-Fetch-Site, Origin, Referer),
  and form posts (the only kind a foreign page can send without the browser asking first) must also carry the
  page's CSRF token, which matches a cookie set by the server (double submit).
"""

from __future__ import annotations

import hmac
import secrets
import urllib.parse

from fastapi import HTTPException, Request

TOKEN_COOKIE = "dhbatch_token"
CSRF_COOKIE = "dhbatch_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
#: Limits on a posted form (Starlette parses it once, for the CSRF check; the page reads the same parse).
FORM_LIMITS = {"max_files": 4, "max_fields": 40, "max_part_size": 256 * 1024}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenInQuery(Exception):
    """A page opened with a valid `?token=`: answered with the token as a cookie and the same URL without it."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def require_token(request: Request) -> None:
    token: str | None = request.app.state.studio.config.token
    if not token:
        host = _hostname(request.headers.get("host", ""))
        if host not in LOOPBACK_NAMES:
            raise HTTPException(403, f"this server answers to 127.0.0.1 and localhost only, not {host!r}")
        return
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and _same(auth[7:].strip(), token):
        return
    if _same(request.cookies.get(TOKEN_COOKIE), token):
        return
    if _same(request.query_params.get("token"), token):
        if request.method == "GET" and not request.url.path.startswith("/api/"):
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            raise TokenInQuery(request.url.path + ("?" + urllib.parse.urlencode(query) if query else ""), token)
        return
    raise HTTPException(
        401,
        "this server needs its token: send `Authorization: Bearer TOKEN`, or open the page once with ?token=TOKEN",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _hostname(host_header: str) -> str:
    """`127.0.0.1:8000` → `127.0.0.1`, `[::1]:8000` → `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0]


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


async def refuse_cross_site(request: Request) -> None:
    """Unsafe methods only from this site; form posts also with the CSRF token."""
    if request.method in SAFE_METHODS:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    referer = request.headers.get("referer")
    if site in ("cross-site", "same-site"):
        raise HTTPException(403, f"refused: a {site} request (post from this server's own pages)")
    if origin is not None and _origin(origin) != own:
        raise HTTPException(403, f"refused: a request from {origin!r}, not from this server's pages")
    if origin is None and referer and _origin(referer) != own:
        raise HTTPException(403, "refused: a request from another site's page")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json":
        # A form (or text/plain): foreign pages send these without the browser asking first, so the page's token
        # must come with it. JSON and body-less requests from another site are refused above (Origin) or by the
        # browser's CORS preflight, which this server never grants.
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            sent = (await request.form(**FORM_LIMITS)).get(CSRF_FIELD)
        if not _same(str(sent) if sent is not None else None, request.cookies.get(CSRF_COOKIE)):
            raise HTTPException(
                403, "refused: the form's security token is missing or stale; reload the page and try again"
            )


def csrf_token(request: Request) -> tuple[str, bool]:
    """The browser's CSRF token, and whether it is new (then the page sets the cookie)."""
    current = request.cookies.get(CSRF_COOKIE)
    if current and len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True
