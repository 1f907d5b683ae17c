"""The server's settings, checked before anything listens."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from batch.errors import UsageError

#: Environment variable holding the token (instead of --token, which other users of the machine can see).
TOKEN_ENV = "DHBATCH_TOKEN"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    project: Path
    build_dir: Path
    checkpoints: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    webhook_allow: tuple[str, ...] = ()
    device: str = "auto"
    jobs: int = 1

    @property
    def manifests_dir(self) -> Path:
        return self.project / "manifests"

    def check(self) -> None:
        """Refuse what would be unsafe or cannot work, before anything listens."""
        if not is_loopback(self.host) and not self.token:
            raise UsageError(
                f"--host {self.host} would let other machines in without a token",
                f"give --token (or set {TOKEN_ENV}) to listen on {self.host}, or keep the default 127.0.0.1",
            )
        if self.token is not None and len(self.token) < 16:
            raise UsageError(
                "the token is too short", "use at least 16 random characters (e.g. `openssl rand -hex 16`)"
            )
        if not self.manifests_dir.is_dir():
            raise UsageError(
                f"{self.project} has no manifests/ folder", "run `dhbatch serve` in the project (or give its folder)"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The server's own files in the build folder: the job history, each job's log and events. A manifest's name never
#: starts with a dot, so no manifest's output folder (build/<name>/) is this one.
SERVER_DIR = ".studio"
