"""Remote cache speed: a fresh CI-like build folder with a warm remote vs a cold build. Goal: at least 20x faster.

The demo manifest with its text scripts copied --copies times (each copy a different text, so every copy is real
work: 4 x copies + 1 videos), built by `dhbatch build` processes as a CI job would run them, each into a fresh
build folder:

    cold          no remote: every step renders
    cold+upload   an empty remote: every step renders and is uploaded (the first CI job of a fleet)
    warm remote   a fresh folder, the remote filled: every step is downloaded, checked and published
    local no-op   the same folder again: every step a local hit (the floor a remote hit is compared with)

and prints the ratio cold / warm remote, and the overhead of a remote hit per step: (warm remote - local no-op) /
steps. --remote-url picks the remote (default: a file:// folder); --s3 starts moto's S3 server on 127.0.0.1 and
uses it through s3fs, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_project(root: Path, copies: int) -> Path:
    """The demo manifest (portraits, recorded audio) with every text script copied `copies` times."""
    shutil.copytree(REPO / "manifests" / "portraits", root / "portraits")
    shutil.copytree(REPO / "manifests" / "audio", root / "audio")
    demo = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    scripts = {}
    for sid, script in demo["scripts"].items():
        if "text" not in script:
            scripts[sid] = script
            continue
        for i in range(1, copies + 1):
            scripts[f"{sid}-{i}"] = {**script, "text": script["text"] + (f" This is take {i}." if copies > 1 else "")}
    demo["scripts"] = scripts
    demo["matrix"]["scripts"] = [s for s in scripts if s != "recorded"]
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    return path


def build(manifest: Path, build_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "batch.cli", "build", str(manifest), "--build-dir", str(build_dir)]
    cmd += ["--checkpoints", str(REPO / "checkpoints"), "--device", "cpu", "--json", *args]
    t0 = time.perf_counter()
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"build failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return seconds, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=1, help="copies of the demo's text scripts (default 1)")
    parser.add_argument("--remote-url", help="remote cache URL (default: a fresh file:// folder)")
    parser.add_argument("--s3", action="store_true", help="use moto's S3 server on 127.0.0.1 through s3fs")
    parser.add_argument("--jobs", type=int, default=2, help="--jobs of every build (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_remote.") as tmp:
        root = Path(tmp)
        manifest = write_project(root / "project", args.copies)
        env: dict[str, str] = {}
        server = None
        if args.s3:
            from tests._s3_server import moto_server

            server = moto_server()
            env = server.__enter__()
            import s3fs

            s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir("bench")
        url = args.remote_url or ("s3://bench/cache" if args.s3 else f"file://{root / 'remote'}")
        jobs = ("--jobs", str(args.jobs))
        try:
            cold, data = build(manifest, root / "cold", *jobs, "--no-remote", env=env)
            cold_up, up = build(manifest, root / "ci1", *jobs, "--remote", url, env=env)
            warm, hit = build(manifest, root / "ci2", *jobs, "--remote", url, env=env)
            noop, _ = build(manifest, root / "ci2", *jobs, "--remote", url, env=env)
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    videos = len(data["videos"])
    steps = len({s["key"] for v in data["videos"] for s in v["steps"]})
    assert hit["remote"]["hits"] == steps and hit["summary"]["cached"] == videos, hit["remote"]
    print(f"demo x{args.copies}: {videos} videos, {steps} steps, remote {url.split('://')[0]}://, --jobs {args.jobs}")
    print(f"cold build (no remote):            {cold:7.2f} s")
    print(f"cold build + upload (first job):   {cold_up:7.2f} s  ({up['remote']['uploaded']} steps uploaded)")
    print(f"fresh folder, warm remote:         {warm:7.2f} s  ({hit['remote']['hits']} steps downloaded)")
    print(f"same folder again (local no-op):   {noop:7.2f} s")
    ratio = cold / warm
    print(f"warm remote vs cold: {ratio:.1f}x faster (goal >= 20x) — {'OK' if ratio >= 20 else 'BELOW GOAL'}")
    print(f"remote hit overhead: {(warm - noop) / steps * 1000:.1f} ms per step over a local hit")


if __name__ == "__main__":
    main()
