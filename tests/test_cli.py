"""The CLI: plan's explanations and exit codes, --json, gc, usage errors — always a message, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests._fake_stages import make_registry
from tests._project import build, plan, write_project

ROOT = Path(__file__).resolve().parents[1]


def dhbatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_cli_plan_explains_and_exit_code_says_stale(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    first = dhbatch("plan", str(m))
    assert first.returncode == 1, first.stderr
    assert "ceo-hello (puppet): stale" in first.stdout and "prompt   run" in first.stdout and "new" in first.stdout
    build(tmp_path, make_registry())
    second = dhbatch("plan", str(m))
    assert second.returncode == 0 and "all cached" in second.stdout
    write_project(tmp_path, hello="Something else.")
    third = dhbatch("plan", str(m), "--json")
    data = json.loads(third.stdout)
    assert third.returncode == 1 and data["stale"] is True
    stale = {(v["id"], s["stage"]): s["reason"] for v in data["videos"] for s in v["steps"] if not s["cached"]}
    assert stale[("ceo-hello", "voice")] == "script text changed"
    assert len(stale) == 6


def test_cli_gc_shows_then_deletes_unreachable_entries(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    build(tmp_path, make_registry())
    write_project(tmp_path, hello="A new hello.")
    build(tmp_path, make_registry())
    shown = dhbatch("gc", str(m))
    assert shown.returncode == 0 and "5 cache entries unreachable" in shown.stdout and "--yes" in shown.stdout
    p, _ = plan(tmp_path)
    assert not p.stale
    done = dhbatch("gc", str(m), "--yes")
    assert "5 cache entries removed" in done.stdout
    p, _ = plan(tmp_path)
    assert not p.stale  # everything the manifest reaches is still there
    assert "0 cache entries" in dhbatch("gc", str(m)).stdout


def test_cli_gc_forgets_deleted_files_and_outdated_checks(tmp_path: Path) -> None:
    """The hash memo does not keep lines for what gc deleted, nor the checks cache results of an older check."""
    from batch.checks import CHECK_VERSIONS
    from tests._fake_cli import dhbatch_fake

    m = write_project(tmp_path)
    assert dhbatch_fake("build", str(m), "--device", "cpu").returncode == 0  # the CLI keeps the memo
    write_project(tmp_path, hello="A new hello.")
    assert dhbatch_fake("build", str(m), "--device", "cpu").returncode == 0
    cache = tmp_path / "build" / "cache"
    old = cache / "checks" / "portrait-v0"
    old.mkdir(parents=True)
    (old / f"{'0' * 64}.json").write_text("{}")
    current = cache / "checks" / f"portrait-v{CHECK_VERSIONS['portrait']}"
    current.mkdir(parents=True, exist_ok=True)
    (current / f"{'1' * 64}.json").write_text("{}")
    before = json.loads((cache / "hashes.json").read_text())
    assert dhbatch("gc", str(m), "--yes").returncode == 0
    after = json.loads((cache / "hashes.json").read_text())
    dropped = set(before) - set(after)
    assert dropped and all(not (cache / name).exists() for name in dropped)
    assert all((cache / name).exists() for name in after)  # what is still there is still remembered
    assert not old.exists() and (current / f"{'1' * 64}.json").exists()
    p, _ = plan(tmp_path)
    assert not p.stale


def test_cli_usage_errors_are_clean(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    bad_only = dhbatch("plan", str(m), "--only", "nope")
    assert (
        bad_only.returncode == 2
        and "--only nope: no video id matches" in bad_only.stderr
        and "Traceback" not in bad_only.stderr
    )
    bad_force = dhbatch("plan", str(m), "--force", "paint")
    assert bad_force.returncode == 2 and "not a stage" in bad_force.stderr
    missing = dhbatch("build", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "no such manifest file" in missing.stderr


def test_cli_validate_summarises(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    out = dhbatch("validate", "m.yaml", cwd=tmp_path)
    # The project's portrait and recording are placeholder bytes, and no Stable Diffusion weights are installed.
    assert out.returncode == 2, out.stderr
    assert "m.yaml:9:3: characters.ceo: Stable Diffusion weights missing" in out.stderr
    assert "m.yaml:12:3: characters.cto.image: cannot decode the image face.png" in out.stderr
    assert "m.yaml:19:3: scripts.recorded.audio: cannot decode audio voice.wav" in out.stderr
    m.write_text(m.read_text().replace("description: a confident CEO in her fifties", "image: face.png"))
    shutil.copy(ROOT / "manifests" / "portraits" / "grace_hopper.jpg", tmp_path / "face.png")
    shutil.copy(ROOT / "manifests" / "audio" / "greeting.wav", tmp_path / "voice.wav")
    out = dhbatch("validate", str(m))
    assert out.returncode == 0 and "2 characters, 3 scripts, 5 videos" in out.stdout, out.stderr


def test_cli_build_rejects_unavailable_device_cleanly(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    bad = dhbatch("build", str(m), "--device", "tpu")
    assert bad.returncode == 2 and "--device 'tpu' is not a device" in bad.stderr
    no_cuda = dhbatch("build", str(m), "--device", "cuda:0")
    assert no_cuda.returncode == 2 and "CUDA is not available" in no_cuda.stderr and "Traceback" not in no_cuda.stderr
    no_mps = dhbatch("build", str(m), "--device", "mps")
    assert no_mps.returncode == 2 and "MPS is not available" in no_mps.stderr, no_mps.stderr


def test_cli_unwritable_build_folder_is_a_message(tmp_path: Path) -> None:
    m = write_project(tmp_path)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    out = dhbatch("build", str(m), "--build-dir", str(blocker / "build"))
    assert out.returncode == 3 and "error: Not a directory" in out.stderr and "Traceback" not in out.stderr


def test_cli_validate_renders_every_template_like_plan(tmp_path: Path) -> None:
    """What would stop `plan` stops `validate` too (a pull-request check), each problem located where it belongs:
    prompt templates at the character that uses them, with the variables they can use; script texts at the text;
    a template's runtime error or runaway expression is a message, not a traceback."""
    m = write_project(tmp_path, hello="{{ 1/0 }} and {{ 'x' * 10**10 }}")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "style.j2").write_text("{{ description }} in {{ company }} style")
    m.write_text(
        m.read_text()
        .replace("    seed: 3", "    seed: 3\n    overrides: {llm: {template: style.j2}}")
        .replace('"Goodbye from {{ company }}."', '"Goodbye from {{ compnay }}."')
    )
    outside = tmp_path.parent / f"{tmp_path.name}-outside.j2"
    outside.write_text("secret")
    (tmp_path / "prompts" / "leak.j2").symlink_to(outside)
    expected = [
        "m.yaml:9:3: characters.ceo: prompt template style.j2: line 1: 'company' is undefined — a prompt template "
        "sees description, engine and character (id, name, description); fix the template, or choose another with "
        "llm.template",
        "m.yaml:17:5: scripts.hello.text: line 1: ZeroDivisionError: division by zero — fix the expression",
        "m.yaml:19:5: scripts.bye.text: line 1: 'compnay' is undefined — define it under `vars:`",
    ]
    for command in ("validate", "plan"):
        out = dhbatch(command, "m.yaml", cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert [line.strip() for line in out.stderr.splitlines()[1:]] == expected, out.stderr
    m.write_text(m.read_text().replace("style.j2", "leak.j2"))
    out = dhbatch("validate", "m.yaml", cwd=tmp_path)
    assert "characters.ceo: prompt template" in out.stderr and "links outside" in out.stderr
    assert "secret" not in out.stderr
    write_project(tmp_path, hello="{{ 'x' * 10**10 }}")
    out = dhbatch("validate", "m.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "longer than 1000000 items" in out.stderr


def test_cli_options_do_not_swallow_the_manifest(tmp_path: Path) -> None:
    """`--force m.yaml` forces all; ids after `--only` end at the manifest file; `-q` may follow the command; an id
    given twice is planned once."""
    write_project(tmp_path)
    forced = dhbatch("plan", "--force", "m.yaml", cwd=tmp_path)
    assert forced.returncode == 1 and "forced (--force)" in forced.stdout, forced.stderr
    only = dhbatch("plan", "--only", "ceo-hello", "ceo-hello", "m.yaml", "--json", "-q", cwd=tmp_path)
    assert only.returncode == 1, only.stderr
    assert [v["id"] for v in json.loads(only.stdout)["videos"]] == ["ceo-hello"]
    checked = dhbatch("validate", "m.yaml", "--verbose", cwd=tmp_path)
    assert checked.returncode == 2 and "problems would fail the build" in checked.stderr  # placeholder inputs
    stage = dhbatch("plan", "--force", "voice", "m.yaml", cwd=tmp_path)
    assert stage.returncode == 1 and "Traceback" not in stage.stderr


def test_cli_two_manifests_with_one_name_do_not_share_outputs(tmp_path: Path) -> None:
    """a/m.yaml and b/m.yaml would both write build/m/: the second is refused with what to do, instead of
    overwriting the first one's videos and state. The same holds for manifests outside any project and for two
    projects sharing one --build-dir; a manifest whose former owner is gone (moved, deleted) takes the folder over."""
    from batch.cache import Cache
    from batch.manifest import load_manifest
    from batch.plan import plan_manifest
    from batch.report import write_state

    def built(manifest: Path, build_dir: Path) -> None:
        cache = Cache(build_dir / "cache")
        plan = plan_manifest(load_manifest(manifest), cache, build_dir=build_dir, checkpoints=tmp_path / "none")
        write_state(plan, cache.is_cached)

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    for folder in ("a", "b"):
        write_project(repo / folder)
    built(repo / "a" / "m.yaml", repo / "build")  # the default for both: the project root holds .git
    second = dhbatch("plan", "b/m.yaml", cwd=repo)
    assert (
        second.returncode == 2 and "holds the videos of a/m.yaml, and b/m.yaml has the same file name" in second.stderr
    )
    assert "--build-dir" in second.stderr and "Traceback" not in second.stderr

    outside = tmp_path / "no-repo"  # nothing above marks a project: absolute identities
    for folder in ("a", "b"):
        write_project(outside / folder)
    built(outside / "a" / "m.yaml", outside / "a" / "build")
    clash = dhbatch("plan", str(outside / "b" / "m.yaml"), "--build-dir", str(outside / "a" / "build"), cwd=repo)
    assert clash.returncode == 2 and "has the same file name" in clash.stderr, clash.stderr

    other = tmp_path / "other-repo"  # another project sharing a build folder: its manifest's relative name means
    (other / ".git").mkdir(parents=True)  # nothing here, but its recorded path still exists
    write_project(other / "c")
    shared = tmp_path / "shared-build"
    built(other / "c" / "m.yaml", shared)
    taken = dhbatch("plan", "a/m.yaml", "--build-dir", str(shared), cwd=repo)
    assert taken.returncode == 2 and "has the same file name" in taken.stderr, taken.stderr
    shutil.rmtree(other)  # that project is gone: its folder passes on
    assert dhbatch("plan", "a/m.yaml", "--build-dir", str(shared), cwd=repo).returncode == 1

    own = dhbatch("plan", "b/m.yaml", "--build-dir", "build-b", cwd=repo)
    assert own.returncode == 1, own.stderr
    again = dhbatch("plan", "a/m.yaml", cwd=repo)
    assert again.returncode == 1, again.stderr  # its own folder: planned as before


def test_cli_report_covers_the_manifest_after_only_and_removed_videos_go(tmp_path: Path) -> None:
    """`build --only` rewrites the report with this run's videos and the others' last entries; a video taken out of
    the manifest has its published MP4 removed by the next build (nothing else in the folder is touched)."""
    from batch.report import prune_removed, write_report

    m = write_project(tmp_path)
    build(tmp_path, make_registry())
    out = tmp_path / "build" / "m"
    (out / "notes.txt").write_text("mine")
    p, cache = plan(tmp_path)
    from batch.run import Runner

    only = Runner(
        plan_only := type(p)(p.manifest, p.build_dir, tuple(v for v in p.videos if v.video.id == "ceo-bye")),
        cache,
        checkpoints=tmp_path / "checkpoints",
        device="cpu",
        progress=False,
        stages=make_registry(),
    ).run()
    write_report(plan_only, only)
    report = json.loads((out / "report.json").read_text())
    assert [v["id"] for v in report["videos"]] == [v.video.id for v in p.videos] and report["only"] == ["ceo-bye"]
    assert [v.get("earlier_run", False) for v in report["videos"]].count(True) == 4
    assert report["summary"] == {"built": 4, "cached": 1, "failed": 0, "skipped": 0}
    html = (out / "report.html").read_text()
    assert "this run: --only ceo-bye" in html

    m.write_text(m.read_text().replace("  scripts: [hello, bye]", "  scripts: [hello]"))
    p, _ = plan(tmp_path)
    assert p.removed == ("ceo-bye", "cto-bye") and p.stale  # plan says so (exit 1), so a CI job builds and prunes
    assert "the build removes ceo-bye.mp4" in dhbatch("plan", "m.yaml", cwd=tmp_path).stdout
    assert prune_removed(p) == ["ceo-bye", "cto-bye"]
    assert sorted(f.name for f in out.glob("*.mp4")) == ["ceo-hello.mp4", "cto-hello.mp4", "cto-recorded.mp4"]
    assert (out / "notes.txt").read_text() == "mine" and prune_removed(p) == []


def test_cli_gc_keeps_other_manifests_entries_and_waits_for_builds(tmp_path: Path) -> None:
    """Two manifests share build/cache: gc of one keeps what the other last built (and says so); gc of both may
    collect both; gc --yes refuses while a build uses the cache."""
    from batch.cache import Cache

    (tmp_path / ".git").mkdir()
    write_project(tmp_path)
    build(tmp_path, make_registry())
    other = tmp_path / "other.yaml"
    other.write_text((tmp_path / "m.yaml").read_text().replace("Goodbye from", "Farewell from"))
    from batch.manifest import load_manifest
    from batch.plan import plan_manifest
    from batch.report import write_state
    from batch.run import Runner

    cache = Cache(tmp_path / "build" / "cache")
    p = plan_manifest(load_manifest(other), cache, build_dir=tmp_path / "build", checkpoints=tmp_path / "checkpoints")
    Runner(p, cache, checkpoints=tmp_path / "checkpoints", device="cpu", progress=False, stages=make_registry()).run()
    write_state(p, cache.is_cached)

    alone = dhbatch("gc", "m.yaml", cwd=tmp_path)
    assert alone.returncode == 0 and "0 cache entries unreachable" in alone.stdout, alone.stdout
    kept = re.search(r"kept (\d+) entries last built for build/other/state.json \(another manifest\)", alone.stdout)
    assert kept and int(kept[1]) >= 3, alone.stdout  # its own voice, animate and mux steps at least
    with cache.in_use():  # a build running
        held = dhbatch("gc", "m.yaml", "--yes", cwd=tmp_path)
    assert held.returncode == 2 and "a build is using the cache" in held.stderr
    other.write_text(other.read_text().replace("Farewell", "Bye"))  # its old entries become garbage
    both = dhbatch("gc", "m.yaml", "other.yaml", "--yes", cwd=tmp_path)
    assert both.returncode == 0 and f"{kept[1]} cache entries removed" in both.stdout, both.stdout
    p = plan_manifest(load_manifest(other), cache, build_dir=tmp_path / "build", checkpoints=tmp_path / "checkpoints")
    Runner(p, cache, checkpoints=tmp_path / "checkpoints", device="cpu", progress=False, stages=make_registry()).run()
    write_state(p, cache.is_cached)
    other.unlink()  # its last-built entries belong to nobody now
    gone = dhbatch("gc", "m.yaml", "--yes", cwd=tmp_path)
    assert gone.returncode == 0 and "other.yaml, which no longer exists" in gone.stdout, gone.stdout
    assert "no longer exists" not in dhbatch("gc", "m.yaml", cwd=tmp_path).stdout  # collected: not said again
