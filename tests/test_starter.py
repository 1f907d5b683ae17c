"""`dhbatch init` writes a starter project that builds offline; the worked example in manifests/README.md is the
file manifests/example.yaml and runs as written: validate names what needs a server or weights, the rest builds."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dhbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No Ollama server: a closed port on 127.0.0.1 (never whatever may listen on the default port).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OLLAMA_HOST": f"127.0.0.1:{closed_port()}"}
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, check=False
    )


def test_starter_init_writes_a_project_that_builds_offline(tmp_path: Path) -> None:
    made = dhbatch("init", "proj", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "proj"
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == [
        "portraits/astronaut.jpg",
        "scripts/welcome.txt",
        "starter.yaml",
    ]
    assert "next: dhbatch build proj/starter.yaml" in made.stdout
    checked = dhbatch("validate", "starter.yaml", cwd=project)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    built = dhbatch("build", "starter.yaml", "--json", cwd=project)
    assert built.returncode == 0, built.stderr
    [video] = json.loads(built.stdout)["videos"]
    assert video["status"] == "built" and video["renderer"] == "puppet"
    assert (project / "build" / "starter" / "host-welcome.mp4").stat().st_size > 10_000
    # A second init never overwrites.
    before = (project / "starter.yaml").read_bytes()
    again = dhbatch("init", "proj", cwd=tmp_path)
    assert again.returncode == 2 and "already exist; nothing was written" in again.stderr
    assert (project / "starter.yaml").read_bytes() == before


def worked_example() -> str:
    text = (ROOT / "manifests" / "README.md").read_text(encoding="utf-8")
    start = text.index("```yaml\n", text.index("## Worked example")) + len("```yaml\n")
    return text[start : text.index("```\n", start)]


def test_starter_worked_example_is_the_file_and_runs_as_written(tmp_path: Path) -> None:
    assert worked_example() == (ROOT / "manifests" / "example.yaml").read_text(encoding="utf-8")
    manifests = tmp_path / "manifests"
    shutil.copytree(ROOT / "manifests", manifests)
    checked = dhbatch("validate", "example.yaml", cwd=manifests)
    assert checked.returncode == 2, checked.stderr
    found = [line for line in checked.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert [line.split(": ", 3)[:3] for line in found] == [
        ["error", "example.yaml:20:3", "characters.ceo"],
        ["warning", "example.yaml:20:3", "characters.ceo"],
        ["warning", "example.yaml:35:1", "videos.ceo-intro, videos.ceo-news"],
    ]
    assert "Stable Diffusion weights missing" in found[0] and "cannot reach the Ollama server" in found[1]
    assert "gtts is Google's online service" in found[2]
    # What the README says builds offline does.
    built = dhbatch("build", "example.yaml", "--only", "host-greeting", "--json", cwd=manifests)
    assert built.returncode == 0, built.stderr
    [video] = json.loads(built.stdout)["videos"]
    assert video["status"] == "built"
    assert (manifests / "build" / "example" / "host-greeting.mp4").is_file()
    planned = dhbatch("plan", "example.yaml", "--only", "host-*", "grace-*", "--json", cwd=manifests)
    assert planned.returncode == 1 and not json.loads(planned.stdout)["problems"]
