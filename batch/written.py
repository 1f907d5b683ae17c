"""Scripts written from documents, as people review them: the text and, per sentence, the passages it cites.

The write stage keeps this in its step record (`info`: script, sentences, each citing `file:lines`); `plan -v` and
the report show it from there, so a reviewer can check a script in a pull request without opening the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batch.plan import Plan


def sentence_lines(info: Mapping[str, Any]) -> list[str]:
    """One line per sentence: the sentence, then the places it cites (`docs/refunds.md:3-4`)."""
    out = []
    for sentence in info.get("sentences") or []:
        if not isinstance(sentence, Mapping):
            continue
        cites = ", ".join(str(c.get("where")) for c in sentence.get("cites", []) if isinstance(c, Mapping))
        out.append(f"{sentence.get('text', '')}  [{cites or 'cites nothing'}]")
    return out


def plan_scripts(plan: Plan, record: Any) -> dict[str, dict[str, Any] | None]:
    """Per video id with a written script: what its write step recorded (engine, model, words, the script and its
    sentences with the places each cites), or None when the step has not run (`record(stage, key)`: the cache's
    step record, or None). For `plan --json` and `plan -v`."""
    out: dict[str, dict[str, Any] | None] = {}
    for vp in plan.videos:
        for step in vp.steps:
            if step.stage == "write":
                rec = record("write", step.key)
                info = rec.get("info") if isinstance(rec, Mapping) else None
                out[vp.video.id] = dict(info) if isinstance(info, Mapping) else None
    return out


def plan_script_lines(plan: Plan, record: Any) -> dict[str, list[str]]:
    """For `plan -v`: per video id, the lines showing its written script."""
    out: dict[str, list[str]] = {}
    for video, info in plan_scripts(plan, record).items():
        if info is None:
            out[video] = ["  script: not written yet (the build writes it)"]
            continue
        head = f"  script ({info.get('engine')}, {info.get('words')} words), sentence by sentence with its sources:"
        out[video] = [head, *(f"    {line}" for line in sentence_lines(info))]
    return out
