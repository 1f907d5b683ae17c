"""Shared fixtures. Renderer tests build their own tiny models; batch tests use tests/_fake_stages.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


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
