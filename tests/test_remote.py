"""The remote step cache over file:// (the fast suite; tests/test_remote_s3.py runs the same paths against S3):
fresh folders download instead of building, damaged remote objects are rebuilt, read-only and unreachable remotes,
the project config, push/pull and gc."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema

from batch.jsonout import schema
from tests._fake_cli import dhbatch_fake as dhbatch
from tests._project import write_project


def built(log: Path) -> list[str]:
    """`stage key` of every step the fake stages built (FAKE_LOG)."""
    return [" ".join(line.split()[:2]) for line in log.read_text().splitlines()] if log.is_file() else []


def build(project: Path, build_dir: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"FAKE_LOG": str(log)} if log else {}
    return dhbatch("build", str(project), "--device", "cpu", "--build-dir", str(build_dir), *args, **env)


def remote_records(remote: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in remote.glob("v1/steps/*/*/*.json")}


def test_remote_fresh_folder_downloads_every_step_and_publishes(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    first = build(project, tmp_path / "ci1", "--remote", url, log=tmp_path / "log1")
    assert first.returncode == 0, first.stderr
    assert "15 uploaded" in first.stdout and len(built(tmp_path / "log1")) == 15
    records = remote_records(remote)
    assert len(records) == 15 and all(set(r["sha256"]) == set(r["outputs"]) for r in records.values())

    fresh = build(project, tmp_path / "ci2", "--remote", url, "--json", log=tmp_path / "log2")
    data = json.loads(fresh.stdout)
    jsonschema.Draft202012Validator(schema("build")).validate(data)  # the remote's fields as documented
    assert fresh.returncode == 0 and built(tmp_path / "log2") == []  # nothing ran
    assert data["summary"]["cached"] == 5 and data["remote"]["hits"] == 15 and data["remote"]["uploaded"] == 0
    assert {s["reason"] for v in data["videos"] for s in v["steps"]} == {"from the remote cache"}
    for name in ("ceo-hello.mp4", "cto-recorded.mp4"):
        assert (tmp_path / "ci2" / "m" / name).read_bytes() == (tmp_path / "ci1" / "m" / name).read_bytes()
    plan = dhbatch("plan", str(project), "--build-dir", str(tmp_path / "ci2"))
    assert plan.returncode == 0 and "all cached" in plan.stdout


def test_remote_damaged_objects_are_rebuilt_never_hits(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    assert build(project, tmp_path / "ci1", "--remote", url).returncode == 0
    records = remote_records(remote)
    voice = next(r for r in records.values() if r["stage"] == "voice")
    blob = remote / "v1" / "blobs" / voice["sha256"]["speech.wav"][:2] / voice["sha256"]["speech.wav"]
    blob.write_bytes(b"X" * blob.stat().st_size)  # same size, wrong bytes
    mux = next(r for r in records.values() if r["stage"] == "mux")
    (remote / "v1" / "steps" / "mux" / mux["key"][:2] / f"{mux['key']}.json").write_text('{"key": "trunc')

    fresh = build(project, tmp_path / "ci2", "--remote", url, log=tmp_path / "log")
    assert fresh.returncode == 0, fresh.stderr
    assert "is damaged (size or sha256 differ): rebuilding it" in fresh.stderr and "is corrupt" in fresh.stderr
    rebuilt = built(tmp_path / "log")
    assert f"voice {voice['key']}" in rebuilt and f"mux {mux['key']}" in rebuilt
    assert len(rebuilt) < 15  # the rest came from the remote
    # The rebuilt steps were uploaded again: the next fresh folder gets everything from the remote.
    again = build(project, tmp_path / "ci3", "--remote", url, log=tmp_path / "log3")
    assert again.returncode == 0 and built(tmp_path / "log3") == []


def test_remote_shared_step_is_built_once_across_shards_and_the_merge_job_plans_up_to_date(tmp_path: Path) -> None:
    """Shards in their own folders: a step that videos of both shards need (a character's portrait, a voice) is
    built by the first and downloaded by the second. The merge job gathers their folders (no cache of its own):
    with the remote, `plan` sees every step and video done."""
    project = write_project(tmp_path / "p")
    url = f"file://{tmp_path / 'remote'}"
    for index in (1, 2):
        out = build(project, tmp_path / f"ci{index}", "--shard", f"{index}/2", "--remote", url, log=tmp_path / "log")
        assert out.returncode == 0, out.stderr
    steps = built(tmp_path / "log")
    assert len(steps) == len(set(steps)) == 15
    for index in (1, 2):
        shutil.copytree(tmp_path / f"ci{index}" / "m", tmp_path / "merge" / "m", dirs_exist_ok=True)
    assert dhbatch("report", "merge", str(tmp_path / "merge" / "m")).returncode == 0
    plan = dhbatch("plan", str(project), "--build-dir", str(tmp_path / "merge"), "--remote", url, "--json")
    data = json.loads(plan.stdout)
    assert plan.returncode == 0 and not data["stale"], plan.stdout
    assert {s["reason"] for v in data["videos"] for s in v["steps"]} == {"in the remote cache"}
    assert not list((tmp_path / "remote").rglob(".probe*"))  # plan only reads the remote
    assert dhbatch("plan", str(project), "--build-dir", str(tmp_path / "merge")).returncode == 1  # no cache here


def test_remote_read_only_downloads_but_never_uploads(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    out = build(project, tmp_path / "ci1", "--only", "ceo-hello", "--remote", url)
    assert out.returncode == 0 and len(remote_records(remote)) == 5
    ro = build(project, tmp_path / "ci2", "--remote", url, "--remote-read-only", log=tmp_path / "log")
    assert ro.returncode == 0 and "5 steps downloaded, 0 uploaded" in ro.stdout
    assert len(built(tmp_path / "log")) == 10 and len(remote_records(remote)) == 5


def test_remote_unreachable_warns_and_builds_locally_unless_required(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    url = f"file://{blocker}/cache"
    out = build(project, tmp_path / "ci1", "--remote", url)
    assert out.returncode == 0 and "5/5 videos ready" in out.stdout
    assert f"remote cache {url}" in out.stderr and "building with the local cache only" in out.stderr
    assert "Traceback" not in out.stderr
    required = build(project, tmp_path / "ci2", "--remote", url, "--remote-required")
    assert required.returncode == 3 and f"error: remote cache {url}" in required.stderr
    assert "Traceback" not in required.stderr and not (tmp_path / "ci2" / "m").exists()  # nothing was started


def test_remote_from_project_config_and_no_remote(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    (tmp_path / "p" / ".git").mkdir()  # the project root, where dhbatch.toml is read
    (tmp_path / "p" / "pyproject.toml").write_text(f'[tool.dhbatch]\nremote = "file://{remote}"\n')
    assert build(project, tmp_path / "ci1").returncode == 0 and len(remote_records(remote)) == 15
    ignored = build(project, tmp_path / "ci2", "--no-remote", log=tmp_path / "log")
    assert ignored.returncode == 0 and len(built(tmp_path / "log")) == 15
    (tmp_path / "p" / "dhbatch.toml").write_text("remote = [1, 2]\n")  # dhbatch.toml wins over pyproject.toml
    bad = build(project, tmp_path / "ci3")
    assert bad.returncode == 3 and "dhbatch.toml: remote must be a URL string" in bad.stderr


def test_remote_push_then_pull_fills_a_fresh_cache(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    url = f"file://{tmp_path / 'remote'}"
    assert build(project, tmp_path / "here").returncode == 0
    pushed = dhbatch("push", str(project), "--build-dir", str(tmp_path / "here"), "--remote", url)
    assert pushed.returncode == 0 and "pushed 15 steps" in pushed.stdout
    again = dhbatch("push", str(project), "--build-dir", str(tmp_path / "here"), "--remote", url)
    assert "pushed 0 steps" in again.stdout and "15 already there" in again.stdout
    pulled = dhbatch("pull", str(project), "--build-dir", str(tmp_path / "fresh"), "--remote", url)
    assert pulled.returncode == 0 and "pulled 15 steps" in pulled.stdout
    out = build(project, tmp_path / "fresh", log=tmp_path / "log")
    assert out.returncode == 0 and built(tmp_path / "log") == [] and "5/5 videos ready" in out.stdout
    no_remote = dhbatch("pull", str(project), "--build-dir", str(tmp_path / "x"))
    assert no_remote.returncode == 2 and "no remote cache given" in no_remote.stderr


def test_remote_gc_shows_then_prunes_unreachable_and_old_entries(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    assert build(project, tmp_path / "ci1", "--remote", url).returncode == 0
    write_project(tmp_path / "p", hello="A new hello.")  # ceo-hello and cto-hello: new voice, animate, mux steps
    assert build(project, tmp_path / "ci1", "--remote", url).returncode == 0
    assert len(remote_records(remote)) == 20
    shown = dhbatch("gc", str(project), "--remote", url)
    assert shown.returncode == 0 and "5 remote entries and 0 blobs unreachable" in shown.stdout
    assert len(remote_records(remote)) == 20  # only shown
    done = dhbatch("gc", str(project), "--remote", url, "--yes")
    assert "5 remote entries and 0 blobs removed" in done.stdout and len(remote_records(remote)) == 15
    # Blobs of removed entries go once they are past the upload grace period (an upload may be on its way).
    old = dhbatch("gc", str(project), "--remote", url, "--older-than", "0", "--yes")
    assert "15 remote entries" in old.stdout and remote_records(remote) == {}
    fresh = build(project, tmp_path / "ci2", "--remote", url, log=tmp_path / "log")
    assert fresh.returncode == 0 and len(built(tmp_path / "log")) == 15


def test_remote_two_jobs_building_the_same_steps_both_succeed(tmp_path: Path) -> None:
    """Two CI jobs in their own folders build the same steps at the same time: both succeed and the remote keeps
    one sound entry per step (a record whose blobs are all there, with their recorded sha256)."""
    project = write_project(tmp_path / "p")
    remote = tmp_path / "remote"
    cmd = [sys.executable, str(Path(__file__).with_name("_fake_cli.py")), "build", str(project), "--device", "cpu"]
    env = {**os.environ, "FAKE_DELAY": "0.05"}
    jobs = [
        subprocess.Popen([*cmd, "--build-dir", str(tmp_path / f"ci{i}"), "--remote", f"file://{remote}", "-q"], env=env)
        for i in (1, 2)
    ]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    records = remote_records(remote)
    assert len(records) == 15
    for rec in records.values():
        for name, digest in rec["sha256"].items():
            blob = remote / "v1" / "blobs" / digest[:2] / digest
            assert (
                hashlib.sha256(blob.read_bytes()).hexdigest() == digest and blob.stat().st_size == rec["outputs"][name]
            )
    assert not list(remote.rglob("*.tmp"))  # no temporary object left behind


def test_remote_record_naming_paths_is_refused(tmp_path: Path) -> None:
    """A remote record is data: output names that are not the stage's, or "digests" that are paths, make it a
    corrupt entry; nothing outside the cache is read, written or deleted."""
    from batch.cache import Cache
    from batch.remote import RemoteCache, RemoteSettings

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    remote = RemoteCache(RemoteSettings(f"file://{tmp_path / 'remote'}"))
    remote.check()
    cache = Cache(tmp_path / "cache")
    key = "a" * 64
    for outputs, sums in (
        ({"../../victim.txt": 7}, {"../../victim.txt": "b" * 64}),
        ({"speech.wav": 7}, {"speech.wav": f"../../../{victim}"}),
    ):
        rec = {"key": key, "stage": "audio", "outputs": outputs, "sha256": sums}
        record = Path(remote.record_path("audio", key))
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(rec))
        assert remote.fetch(cache, "audio", key) is None
        assert victim.read_text() == "keep me" and not record.exists()  # the bad record is dropped
    assert not cache.is_cached("audio", key)
