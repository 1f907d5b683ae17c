"""Shared fixtures. Renderer tests build their own tiny models; batch tests use tests/_fake_stages.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# Ray clusters the tests start (and the builds they run) keep to the loopback address: on Linux Ray otherwise binds
# its services to this machine's network address. Read by Ray at import, inherited by subprocesses.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# A test run started in the background by a non-interactive shell inherits SIGINT ignored, and so would the builds it
# starts; the tests that send Ctrl-C (to themselves or to a build) need it to arrive as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUN_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: set RUN_GPU=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo() -> Path:
    return REPO
