"""`dhbatch serve`: its arguments, and the server they describe. Loads FastAPI and uvicorn only when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from batch.errors import UsageError
from batch.web.config import TOKEN_ENV, ServeConfig


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("serve", help="the studio: a web page and an HTTP API for building videos")
    sp.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=argparse.SUPPRESS)
    sp.add_argument("project", nargs="?", type=Path, default=Path("."), help="the project folder (default: here)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a token)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sp.add_argument("--token", help=f"required on every request (default: ${TOKEN_ENV})")
    sp.add_argument("--webhook-allow", nargs="+", default=[], metavar="HOST", help="hosts that job webhooks may call")
    sp.add_argument("--build-dir", type=Path, help="outputs and cache (default: PROJECT/build)")
    sp.add_argument("--checkpoints", type=Path, help="weights folder (default: PROJECT/checkpoints)")
    sp.add_argument("--device", default="auto", help="device for the builds: auto | cpu | cuda[:N] | mps")
    sp.add_argument("--jobs", "-j", type=int, default=1, help="parallel CPU steps in each build")


@dataclasses.dataclass(frozen=True)
class Server:
    config: ServeConfig

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.config.port}/"

    def run(self) -> None:
        import uvicorn

        from batch.web.app import create_app

        uvicorn.run(create_app(self.config), host=self.config.host, port=self.config.port, log_level="warning")


def prepare(args: argparse.Namespace) -> Server:
    """The server that `args` ask for, checked (a token for any address but loopback, a project with manifests/)."""
    try:
        from batch.web.state import ServeConfig
    except ImportError as exc:
        raise UsageError(
            f"dhbatch serve needs the web extra ({exc.name} is missing)", "pip install -e '.[web]'"
        ) from exc
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    project = args.project.resolve()
    config = ServeConfig(
        project=project,
        build_dir=(args.build_dir or project / "build").resolve(),
        checkpoints=(args.checkpoints or project / "checkpoints").resolve(),
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        webhook_allow=tuple(args.webhook_allow),
        device=args.device,
        jobs=args.jobs,
    )
    config.check()
    return Server(config)
