"""A small project on disk for runner tests: manifest, portrait file, audio file; plan and build helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batch.cache import Cache
from batch.manifest import load_manifest
from batch.plan import Plan, plan_manifest
from batch.report import write_report, write_state
from batch.run import Runner, RunResult

MANIFEST = """\
version: 1
vars:
  company: Acme
defaults:
  llm: {{engine: none}}
  voice: {{engine: piper, rate: {rate}}}
  video: {{renderer: puppet, batch_size: {batch}}}
characters:
  ceo:
    description: {ceo}
    seed: 3
  cto:
    image: face.png
scripts:
  hello:
    text: "{hello}"
  bye:
    text: "Goodbye from {{{{ company }}}}."
  recorded:
    audio: voice.wav
matrix:
  characters: [ceo, cto]
  scripts: [hello, bye]
videos:
  - {{id: cto-recorded, character: cto, script: recorded}}
"""


def write_project(root: Path, **overrides: Any) -> Path:
    params = {"rate": 1.0, "batch": 8, "ceo": "a confident CEO in her fifties", "hello": "Hello, I am the boss."}
    params.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / "face.png").write_bytes(b"portrait-bytes")
    (root / "voice.wav").write_bytes(b"recorded-voice-bytes")
    path = root / "m.yaml"
    path.write_text(MANIFEST.format(**params))
    return path


def plan(root: Path, force: tuple[str, ...] = ()) -> tuple[Plan, Cache]:
    manifest = load_manifest(root / "m.yaml")
    cache = Cache(root / "build" / "cache")
    p = plan_manifest(manifest, cache, build_dir=root / "build", checkpoints=root / "checkpoints", force=force)
    return p, cache


def build(root: Path, registry: dict[str, Any], **kwargs: Any) -> RunResult:
    force = tuple(kwargs.pop("force", ()))
    p, cache = plan(root, force)
    result = Runner(
        p, cache, checkpoints=root / "checkpoints", device="cpu", progress=False, stages=registry, force=force, **kwargs
    ).run()
    write_state(p, cache.is_cached)
    write_report(p, result)
    return result


def stale_steps(p: Plan) -> dict[str, dict[str, str]]:
    """{video id: {stage: reason}} for every step that would run."""
    out: dict[str, dict[str, str]] = {}
    for v in p.videos:
        for d in v.decisions:
            if not d.cached:
                out.setdefault(v.video.id, {})[d.stage] = d.reason
    return out
