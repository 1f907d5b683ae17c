"""The remote cache against a real S3-compatible server (moto's server mode on 127.0.0.1) through s3fs: a fleet of
two shards in fresh folders, then a fresh folder that only downloads; a damaged object is rebuilt; a job killed
mid-upload leaves no entry that reads as complete; a missing bucket, refused credentials and no network are clear
warnings (the build goes on locally)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._fake_cli import dhbatch_fake as dhbatch
from tests._project import write_project
from tests._s3_server import free_port, moto_server
from tests.test_remote import built

s3fs = pytest.importorskip("s3fs", reason="the remote extra (s3fs) is not installed")

BUCKET = "dhbatch-ci"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with moto_server() as env:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"])
        fs.mkdir(BUCKET)
        yield env


def s3(env: dict[str, str]) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True
    )


def build(project: Path, build_dir: Path, env: dict[str, str], *args: str, log: Path) -> subprocess.CompletedProcess:
    return dhbatch(
        "build",
        str(project),
        "--device",
        "cpu",
        "--build-dir",
        str(build_dir),
        *args,
        **env,
        FAKE_LOG=str(log),
    )


def test_remote_s3_two_shards_then_a_fresh_folder_downloads_everything(tmp_path: Path, s3_env: dict) -> None:
    project = write_project(tmp_path / "p")
    url = f"s3://{BUCKET}/fleet"
    for index in (1, 2):  # two CI jobs, each in a fresh folder
        out = build(
            project, tmp_path / f"ci{index}", s3_env, "--shard", f"{index}/2", "--remote", url, log=tmp_path / "log"
        )
        assert out.returncode == 0, out.stderr
    steps = built(tmp_path / "log")
    assert len(steps) == len(set(steps)) == 15  # a step both shards need was built once
    records = s3(s3_env).glob(f"{BUCKET}/fleet/v1/steps/*/*/*.json")
    assert len(records) == 15

    third = build(project, tmp_path / "ci3", s3_env, "--remote", url, "--json", log=tmp_path / "log3")
    data = json.loads(third.stdout)
    assert third.returncode == 0 and built(tmp_path / "log3") == []
    assert data["remote"]["hits"] == 15 and data["summary"]["cached"] == 5
    assert sorted(p.name for p in (tmp_path / "ci3" / "m").glob("*.mp4")) == sorted(
        f"{v['id']}.mp4" for v in data["videos"]
    )


def test_remote_s3_damaged_object_is_rebuilt(tmp_path: Path, s3_env: dict) -> None:
    project = write_project(tmp_path / "p")
    url = f"s3://{BUCKET}/damaged"
    assert build(project, tmp_path / "ci1", s3_env, "--remote", url, log=tmp_path / "log1").returncode == 0
    fs = s3(s3_env)
    rec = next(json.loads(fs.cat_file(p)) for p in fs.glob(f"{BUCKET}/damaged/v1/steps/animate/*/*.json"))
    digest = rec["sha256"]["video.mp4"]
    blob = f"{BUCKET}/damaged/v1/blobs/{digest[:2]}/{digest}"
    fs.pipe_file(blob, fs.cat_file(blob)[:10])  # truncated

    out = build(project, tmp_path / "ci2", s3_env, "--remote", url, log=tmp_path / "log2")
    assert out.returncode == 0 and "is damaged" in out.stderr
    assert f"animate {rec['key']}" in built(tmp_path / "log2")
    assert len(fs.cat_file(blob)) == rec["outputs"]["video.mp4"]  # uploaded again, whole


def test_remote_s3_job_killed_mid_upload_leaves_no_false_hit(tmp_path: Path, s3_env: dict) -> None:
    project = write_project(tmp_path / "p")
    url = f"s3://{BUCKET}/killed"
    marker = tmp_path / "uploading"
    cmd = [sys.executable, str(Path(__file__).with_name("_fake_cli.py")), "build", str(project), "--device", "cpu"]
    env = {**os.environ, **s3_env, "FAKE_UPLOAD_PAUSE": str(marker)}
    job = subprocess.Popen(
        [*cmd, "--build-dir", str(tmp_path / "ci1"), "--remote", url, "-q"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():  # the first step's blob is up, its record not yet
            assert job.poll() is None and time.monotonic() < deadline, "the job never reached its first upload"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    fs = s3(s3_env)
    assert fs.glob(f"{BUCKET}/killed/v1/blobs/*/*") and not fs.glob(f"{BUCKET}/killed/v1/steps/*/*/*.json")

    out = build(project, tmp_path / "ci2", s3_env, "--remote", url, log=tmp_path / "log")
    assert out.returncode == 0 and "0 steps downloaded, 15 uploaded" in out.stdout
    assert len(built(tmp_path / "log")) == 15


def test_remote_s3_missing_bucket_is_a_clear_warning_or_error(tmp_path: Path, s3_env: dict) -> None:
    project = write_project(tmp_path / "p")
    url = "s3://no-such-bucket/cache"
    out = build(project, tmp_path / "ci1", s3_env, "--remote", url, log=tmp_path / "log")
    assert out.returncode == 0 and len(built(tmp_path / "log")) == 15
    assert f"remote cache {url}: not found" in out.stderr and "does not exist" in out.stderr
    required = build(project, tmp_path / "ci2", s3_env, "--remote", url, "--remote-required", log=tmp_path / "log2")
    assert required.returncode == 3 and "Traceback" not in required.stderr and "does not exist" in required.stderr


def test_remote_s3_access_denied_and_no_network_are_clear_and_the_build_goes_on(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p")
    url = f"s3://{BUCKET}/cache"
    with moto_server(auth=True) as denied:  # a server that refuses these credentials
        out = build(project, tmp_path / "ci1", denied, "--remote", url, log=tmp_path / "log1")
    assert out.returncode == 0 and len(built(tmp_path / "log1")) == 15, out.stderr
    assert f"remote cache {url}: access denied" in out.stderr and "check the credentials" in out.stderr
    nothing = {**denied, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # no server there: no network
    out = build(project, tmp_path / "ci2", nothing, "--remote", url, log=tmp_path / "log2")
    assert out.returncode == 0 and len(built(tmp_path / "log2")) == 15
    assert f"remote cache {url}: cannot reach it" in out.stderr and "Traceback" not in out.stderr
