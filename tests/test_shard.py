"""Shards: every video in exactly one shard, the same on every machine, balanced by expected cost; shard reports
merged into one report and one state."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

from batch.manifest import load_manifest
from batch.shard import Shard, assign, expected_cost, parse_shard, shard_videos
from tests._fake_cli import dhbatch_fake as dhbatch
from tests._project import write_project


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"\0\0" * int(seconds * rate))


def write_big_manifest(root: Path, characters: int = 40, scripts: int = 25) -> Path:
    """characters × scripts videos whose scripts vary in length (and two recorded ones, of 4 s and 30 s)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "face.png").write_bytes(b"portrait")
    write_wav(root / "short.wav", 4.0)
    write_wav(root / "long.wav", 30.0)
    lines = ["version: 1", "defaults:", "  video: {renderer: puppet}", "characters:"]
    lines += [f"  c{c}: {{image: face.png, seed: {c}}}" for c in range(characters)]
    lines.append("scripts:")
    for s in range(scripts - 2):
        lines.append(f'  s{s}: {{text: "{"Words and more words. " * (1 + (s * 7) % 23)}"}}')
    lines += ["  rec-short: {audio: short.wav}", "  rec-long: {audio: long.wav}", "matrix:"]
    lines += ["  characters: all", "  scripts: all"]
    path = root / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shard_parse_rejects_what_is_not_i_of_n() -> None:
    assert parse_shard("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5" and Shard(2, 5).tag == "shard-2-of-5"
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        try:
            parse_shard(bad)
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            assert "expected I/N" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")


def test_shard_1000_videos_each_in_one_shard_and_balanced(tmp_path: Path) -> None:
    manifest = load_manifest(write_big_manifest(tmp_path))
    assert len(manifest.videos) == 1000
    costs = {v.id: expected_cost(manifest.scripts[v.script]) for v in manifest.videos}
    assert costs["c0-rec-long"] > costs["c0-rec-short"] > 4.0  # the WAV headers were read
    for count in (2, 3, 4, 7, 10):
        seen: list[str] = []
        loads, sizes = [], []
        for index in range(1, count + 1):
            mine = [v.id for v in shard_videos(manifest, manifest.videos, Shard(index, count))]
            seen += mine
            loads.append(sum(costs[i] for i in mine))
            sizes.append(len(mine))
        assert sorted(seen) == sorted(costs), f"{count} shards: a video in no shard or in two"
        assert max(loads) <= 1.1 * min(loads), f"{count} shards: expected costs {loads}"
        assert max(sizes) <= 1.1 * min(sizes), f"{count} shards: sizes {sizes}"


def test_shard_plan_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Three `plan --shard i/3` processes (each with its own string-hash seed) split the 1,000 videos exactly."""
    path = write_big_manifest(tmp_path)
    ids: list[str] = []
    for index in (1, 2, 3):
        out = dhbatch("plan", str(path), "--shard", f"{index}/3", "--json", PYTHONHASHSEED=str(index))
        data = json.loads(out.stdout)
        assert out.returncode == 1 and data["shard"] == f"{index}/3", out.stderr
        ids += [v["id"] for v in data["videos"]]
    assert sorted(ids) == sorted(v.id for v in load_manifest(path).videos)
    assert assign(load_manifest(path), 3) == assign(load_manifest(path), 3)
    bad = dhbatch("plan", str(path), "--shard", "4/3")
    assert bad.returncode == 2 and "expected I/N" in bad.stderr and "Traceback" not in bad.stderr


def test_shard_builds_merge_into_one_report_and_state(tmp_path: Path) -> None:
    """Two CI jobs build one shard each in their own folder; the merge job gathers build/m/ and merges the reports;
    `plan` without --shard then sees every video as built (with the cache too, as in one folder)."""
    project = write_project(tmp_path / "p")
    folders = []
    for index in (1, 2):
        build_dir = tmp_path / f"job{index}"
        out = dhbatch("build", str(project), "--shard", f"{index}/2", "--device", "cpu", "--build-dir", str(build_dir))
        assert out.returncode == 0, out.stderr
        assert (build_dir / "m" / f"report.shard-{index}-of-2.json").is_file()
        assert (build_dir / "m" / f"report.shard-{index}-of-2.html").is_file()
        folders.append(build_dir)
    gathered = tmp_path / "merge" / "m"
    for build_dir in folders:  # what downloading both jobs' artifacts into one folder does
        shutil.copytree(build_dir / "m", gathered, dirs_exist_ok=True)
    merged = dhbatch("report", "merge", str(gathered))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "merged 2/2 shards: 5 built" in merged.stdout
    report = json.loads((gathered / "report.json").read_text())
    ids = [v["id"] for v in report["videos"]]
    assert ids == [v.id for v in load_manifest(project).videos]  # manifest order
    assert {v["shard"] for v in report["videos"]} == {"1/2", "2/2"} and report["summary"]["built"] == 5
    assert "shard 2/2" in (gathered / "report.html").read_text()
    assert set(json.loads((gathered / "state.json").read_text())["videos"]) == set(ids)

    # A missing shard is said, and the exit status says the fleet is incomplete.
    (gathered / "report.shard-2-of-2.json").unlink()
    partial = dhbatch("report", "merge", str(gathered))
    assert partial.returncode == 1 and "missing shards: 2/2" in partial.stdout

    # Both shards into one build folder: plan without --shard sees them all up to date.
    for index in (1, 2):
        assert dhbatch("build", str(project), "--shard", f"{index}/2", "--device", "cpu").returncode == 0
    plan = dhbatch("plan", str(project))
    assert plan.returncode == 0 and "5 videos, all cached" in plan.stdout, plan.stdout
