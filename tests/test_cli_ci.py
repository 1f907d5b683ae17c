"""The build's contract with CI, through the CLI: outputs that never lie, JSON that matches its shipped schema on
success and on error, progress lines for a CI log, exit codes, `--only` patterns. `build` runs in a separate process
with the fake stages (tests/_fake_cli.py) so that each test takes a second or two."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from batch.jsonout import schema
from tests._fake_stages import make_registry
from tests._project import build, write_project

FAKE_CLI = Path(__file__).with_name("_fake_cli.py")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def dhbatch(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process; `build` with the fake stages on the CPU (`auto` would import torch)."""
    environ = {**os.environ, "CI": "", **env}
    args = (*args, "--device", "cpu") if args[0] == "build" else args
    return subprocess.run(
        [sys.executable, str(FAKE_CLI), *args], capture_output=True, text=True, cwd=cwd, env=environ, check=False
    )


def as_json(out: subprocess.CompletedProcess[str], command: str) -> dict:
    """stdout parsed and validated against the command's shipped schema; its exit_code is the process's."""
    assert out.stdout.strip(), f"no JSON on stdout; stderr: {out.stderr}"
    data = json.loads(out.stdout)
    jsonschema.Draft202012Validator.check_schema(schema(command))
    jsonschema.Draft202012Validator(schema(command)).validate(data)
    assert data["exit_code"] == out.returncode and data["command"] == command and data["schema_version"] == 1
    return data


def mp4s(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "build" / "m").glob("*.mp4"))}


def test_cli_json_of_every_command_matches_its_schema(tmp_path: Path) -> None:
    """plan, build, validate and gc answer in their documented shape; a cached step is not reported as run."""
    write_project(tmp_path)
    valid = as_json(dhbatch("validate", "m.yaml", "--json", cwd=tmp_path), "validate")
    assert valid["counts"] == {"characters": 2, "scripts": 3, "videos": 5} and valid["error"] is None
    for broken in ({**valid, "counts": {"characters": "2"}}, {k: v for k, v in valid.items() if k != "manifest"}):
        with pytest.raises(jsonschema.ValidationError):  # the schema holds the documented shape, not just anything
            jsonschema.validate(broken, schema("validate"))
    stale = as_json(dhbatch("plan", "m.yaml", "--json", cwd=tmp_path), "plan")
    assert stale["exit_code"] == 1 and stale["stale"] and len(stale["videos"]) == 5
    built = as_json(dhbatch("build", "m.yaml", "--json", cwd=tmp_path), "build")
    assert built["exit_code"] == 0 and built["summary"] == {"built": 5, "cached": 0, "failed": 0, "skipped": 0}
    assert all(s["ran"] and s["status"] == "ran" for s in built["videos"][0]["steps"])
    assert Path(built["report"]).is_file()
    again = as_json(dhbatch("build", "m.yaml", "--json", cwd=tmp_path), "build")
    steps = [s for v in again["videos"] for s in v["steps"]]
    assert again["summary"]["cached"] == 5 and steps
    assert all(s["cached"] and not s["ran"] and s["status"] == "cached" and s["seconds"] == 0 for s in steps)

    write_project(tmp_path, hello="A new hello.")
    build(tmp_path, make_registry())
    shown = as_json(dhbatch("gc", "m.yaml", "--json", cwd=tmp_path), "gc")
    assert not shown["deleted"] and len(shown["entries"]) == 5 and shown["bytes"] > 0
    done = as_json(dhbatch("gc", "m.yaml", "--yes", "--json", cwd=tmp_path), "gc")
    assert done["deleted"] and {e["key"] for e in done["entries"]} == {e["key"] for e in shown["entries"]}
    assert as_json(dhbatch("gc", "m.yaml", "--json", cwd=tmp_path), "gc")["entries"] == []


def test_cli_json_comes_on_errors_too(tmp_path: Path) -> None:
    """A bad manifest, a bad command line, an unwritable build folder: stdout still holds a JSON document, with the
    located problems, and its exit code; the message for people stays on stderr."""
    m = write_project(tmp_path)
    m.write_text(m.read_text().replace("engine: piper", "engine: pipr").replace("batch_size: 8", "batch_size: many"))
    for command in ("validate", "plan", "build", "gc"):
        out = dhbatch(command, "m.yaml", "--json", cwd=tmp_path)
        data = as_json(out, command)
        assert out.returncode == 2 and data["error"]["kind"] == "manifest", out.stderr
        problems = {(p["line"], p["path"]) for p in data["error"]["problems"]}
        assert (6, "defaults.voice.engine") in problems and (7, "defaults.video.batch_size") in problems, problems
        assert "invalid manifest (2 problems)" in out.stderr and "Traceback" not in out.stderr
    write_project(tmp_path)
    usage = dhbatch("build", "m.yaml", "--jobs", "many", "--json", cwd=tmp_path)
    data = as_json(usage, "build")
    assert usage.returncode == 2 and data["error"]["kind"] == "usage" and "--jobs" in data["error"]["message"]
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    io = dhbatch("build", "m.yaml", "--build-dir", str(blocker / "build"), "--json", cwd=tmp_path)
    assert io.returncode == 3 and as_json(io, "build")["error"]["kind"] == "io"


def test_cli_failed_video_leaves_no_old_mp4_among_the_outputs(tmp_path: Path) -> None:
    """After a build, every build/m/*.mp4 is the output of the manifest as it is now: a video that fails has its
    earlier MP4 moved to build/m/last-good/ (linked from the report), and gets it back once it builds again."""
    write_project(tmp_path)
    build(tmp_path, make_registry())  # in-process: the CLI then finds everything cached
    before = mp4s(tmp_path)
    assert len(before) == 5
    write_project(tmp_path, hello="FAIL now")  # ceo-hello and cto-hello fail at their voice step
    out = dhbatch("build", "m.yaml", "--json", cwd=tmp_path)
    data = as_json(out, "build")
    assert out.returncode == 1 and data["summary"] == {"built": 0, "cached": 3, "failed": 2, "skipped": 0}
    assert sorted(mp4s(tmp_path)) == ["ceo-bye.mp4", "cto-bye.mp4", "cto-recorded.mp4"]
    out_dir = tmp_path / "build" / "m"
    for vid in ("ceo-hello", "cto-hello"):
        kept = out_dir / "last-good" / f"{vid}.mp4"
        assert kept.read_bytes() == before[f"{vid}.mp4"]
        video = next(v for v in data["videos"] if v["id"] == vid)
        assert video["status"] == "failed" and video["output"] is None and video["last_good"] == str(kept)
    report = json.loads((out_dir / "report.json").read_text())
    assert {v["id"]: v["last_good"] for v in report["videos"]}["cto-hello"] == str(out_dir / "last-good/cto-hello.mp4")
    html = (out_dir / "report.html").read_text()
    assert '<a href="last-good/cto-hello.mp4">last good MP4</a>' in html
    # The failed step's artifact is kept in the cache and linked beside its error.
    voice = next(s for v in data["videos"] if v["id"] == "cto-hello" for s in v["steps"] if s["stage"] == "voice")
    assert voice["status"] == "failed" and "cache/failed/voice/" in voice["artifact"]
    assert Path(voice["artifact"]).read_bytes() == b"made before failing"
    assert os.path.relpath(voice["artifact"], out_dir) in html

    write_project(tmp_path)  # fixed: built (here: from the cache) and published again; last-good emptied
    assert dhbatch("build", "m.yaml", cwd=tmp_path).returncode == 0
    assert mp4s(tmp_path) == before and not list((out_dir / "last-good").iterdir())
    gc = as_json(dhbatch("gc", "m.yaml", "--yes", "--json", cwd=tmp_path), "gc")  # the failed step is out of reach
    assert [(e["stage"], e["failed"]) for e in gc["entries"]] == [("voice", True)]
    assert not Path(voice["artifact"]).exists()


def test_cli_only_build_retires_outputs_that_changed_since(tmp_path: Path) -> None:
    """`build --only` leaves the other videos alone, but an MP4 of a video that changed since it was built is not
    left among the outputs as if it were current: it moves to last-good/ and the report marks it stale."""
    write_project(tmp_path)
    build(tmp_path, make_registry())  # in-process: the CLI then finds everything cached
    write_project(tmp_path, hello="A new hello.")
    out = dhbatch("build", "m.yaml", "--only", "ceo-hello", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(mp4s(tmp_path)) == ["ceo-bye.mp4", "ceo-hello.mp4", "cto-bye.mp4", "cto-recorded.mp4"]
    report = json.loads((tmp_path / "build" / "m" / "report.json").read_text())
    cto = next(v for v in report["videos"] if v["id"] == "cto-hello")
    assert cto["status"] == "stale" and cto["output"] is None and cto["last_good"].endswith("last-good/cto-hello.mp4")
    assert report["summary"]["stale"] == 1 and report["summary"]["built"] == 4  # 1 now, 3 by the first build


def test_cli_fail_fast_reports_cached_videos_as_ready(tmp_path: Path) -> None:
    """--fail-fast stops at the first failure; the videos that were already up to date are cached, with their
    output, and counted as ready, not skipped."""
    write_project(tmp_path)
    build(tmp_path, make_registry())  # in-process: the CLI then finds everything cached
    write_project(tmp_path, hello="FAIL now")
    out = dhbatch("build", "m.yaml", "--fail-fast", cwd=tmp_path)
    assert out.returncode == 1
    for vid in ("ceo-bye", "cto-bye", "cto-recorded"):
        assert re.search(rf"^cached  {vid}: build/m/{vid}.mp4 \(all steps cached", out.stdout, re.M), out.stdout
    assert "SKIPPED" not in out.stdout and "3/5 videos ready" in out.stdout
    assert sorted(mp4s(tmp_path)) == ["ceo-bye.mp4", "cto-bye.mp4", "cto-recorded.mp4"]


def test_cli_ci_log_has_timestamped_progress_and_a_line_per_video_as_it_completes(tmp_path: Path) -> None:
    """No terminal (or CI set): plain timestamped lines; a stage says how many steps it runs and how far it got;
    each video has its line as soon as it is done, before the last stage ends."""
    write_project(tmp_path)
    out = dhbatch("build", "m.yaml", cwd=tmp_path, CI="true", FAKE_DELAY="0.02")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines and all(re.match(rf"{STAMP} ", line) for line in lines), out.stderr
    text = [line.split(" ", 1)[1] for line in lines]
    assert "voice: 2 steps to run" in text and "animate: 5 steps to run" in text
    assert "mux: 5/5 done in" in " ".join(text)
    videos = [i for i, t in enumerate(text) if t.startswith("video ")]
    assert len(videos) == 5
    assert "video ceo-hello: built build/m/ceo-hello.mp4 (ran prompt, image, voice, animate, mux)" in text
    assert videos[0] < next(i for i, t in enumerate(text) if t.startswith("mux: 5/5 done")), text
    quiet = dhbatch("build", "m.yaml", "-q", cwd=tmp_path, CI="true")
    assert quiet.stderr == "" and quiet.stdout == ""


def test_cli_verbose_log_lines_have_timestamp_and_process_id(tmp_path: Path) -> None:
    write_project(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_CLI), "build", "m.yaml", "-v", "--device", "cpu"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate()
    logged = [line for line in err.splitlines() if " INFO " in line or " WARNING " in line]
    assert logged, err
    for line in logged:
        assert re.match(rf"{STAMP} {proc.pid} (INFO|WARNING) (batch|renderer)[.\w]*: ", line), line


def test_cli_only_takes_shell_patterns(tmp_path: Path) -> None:
    write_project(tmp_path)
    chosen = as_json(dhbatch("plan", "m.yaml", "--only", "cto-*", "ceo-bye", "--json", cwd=tmp_path), "plan")
    assert [v["id"] for v in chosen["videos"]] == ["cto-recorded", "cto-hello", "cto-bye", "ceo-bye"]
    one = as_json(dhbatch("plan", "m.yaml", "--only", "?eo-h*", "--json", cwd=tmp_path), "plan")
    assert [v["id"] for v in one["videos"]] == ["ceo-hello"]
    none = dhbatch("build", "m.yaml", "--only", "grace-*", "ceo-bye", cwd=tmp_path)
    assert none.returncode == 2 and "--only grace-*: no video id matches" in none.stderr
    assert "known ids: ceo-bye, ceo-hello" in none.stderr and not (tmp_path / "build" / "m").exists()


def test_cli_plan_of_an_up_to_date_manifest_is_one_line_per_video(tmp_path: Path) -> None:
    write_project(tmp_path)
    build(tmp_path, make_registry())  # in-process: the CLI then finds everything cached
    out = dhbatch("plan", "m.yaml", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.splitlines() == [
        "cto-recorded (puppet): up to date",
        "ceo-hello (puppet): up to date",
        "ceo-bye (puppet): up to date",
        "cto-hello (puppet): up to date",
        "cto-bye (puppet): up to date",
        "5 videos, all cached",
    ]
    steps = dhbatch("plan", "m.yaml", "-v", cwd=tmp_path).stdout.splitlines()
    assert steps[1].split()[:2] == ["audio", "cached"] and len(steps) == 5 + 19 + 1  # videos, steps, totals


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="loads Stable Diffusion in a subprocess: RUN_SLOW=1")
def test_cli_portrait_that_fails_the_face_check_is_kept_and_shown(tmp_path: Path) -> None:
    """The real image stage on a tiny random-weight Stable Diffusion draws noise: the face check fails, and what was
    drawn is kept in the cache as the failed step's artifact and shown in the report beside the error."""
    import wave

    from PIL import Image

    from tests._sd_util import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "checkpoints" / "tiny-sd")
    with wave.open(str(tmp_path / "voice.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x10" * 8000)
    (tmp_path / "m.yaml").write_text(
        "version: 1\n"
        "defaults:\n"
        "  llm: {engine: none}\n"
        "  image: {model: tiny-sd, num_inference_steps: 2, size: 256}\n"
        "  video: {renderer: puppet}\n"
        "characters:\n  ceo: {description: a confident CEO, seed: 3}\n"
        "scripts:\n  rec: {audio: voice.wav}\n"
        "videos:\n  - {id: ceo-rec, character: ceo, script: rec}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "batch.cli", "build", "m.yaml", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    data = as_json(out, "build")
    image = next(s for s in data["videos"][0]["steps"] if s["stage"] == "image")
    assert image["status"] == "failed" and "no face in the generated portrait" in image["error"]
    with Image.open(image["artifact"]) as drawn:
        assert drawn.size == (256, 256)
    html = (tmp_path / "build" / "m" / "report.html").read_text()
    assert f'<img src="{os.path.relpath(image["artifact"], tmp_path / "build" / "m")}"' in html
