"""`make checkpoints`: download, resume, verification and the planner's light helpers, against a real local server."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _http_util import closed_port_url, file_server

from renderer import checkpoints as ck

REPO = Path(__file__).resolve().parents[1]


def _entry(path: str, data: bytes | None, *, remote: str | None = None, known: bool = True) -> ck.Checkpoint:
    """A table entry for `data`, served at `remote`; `known=False` leaves size and digest unpublished."""
    return ck.Checkpoint(
        path=path,
        group="gfpgan",
        source="https://example.invalid",
        remote=remote or f"/files/{path}",
        size=len(data) if known and data is not None else None,
        sha256=hashlib.sha256(data).hexdigest() if known and data is not None else None,
        license="MIT",
    )


def _blob(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 7) % 251 for i in range(n))


def test_checkpoints_fresh_download_is_verified_and_moved_into_place(tmp_path: Path) -> None:
    a, b = _blob(300_000, 1), _blob(5_000, 2)
    entries = [_entry("gfpgan/a.pth", a), _entry("b.safetensors", b)]
    with file_server({"/files/gfpgan/a.pth": a, "/files/b.safetensors": b}) as server:
        outcomes = ck.download(entries, tmp_path, base_url=server.base_url, progress=False)
    assert [o.status for o in outcomes] == ["downloaded", "downloaded"]
    assert (tmp_path / "gfpgan/a.pth").read_bytes() == a
    assert (tmp_path / "b.safetensors").read_bytes() == b
    assert not list(tmp_path.rglob("*.part"))
    assert [r.path for r in server.requests] == ["/files/gfpgan/a.pth", "/files/b.safetensors"]
    assert all("range" not in r.headers for r in server.requests)


def test_checkpoints_resume_requests_only_the_missing_half(tmp_path: Path) -> None:
    data = _blob(200_001, 3)
    half = len(data) // 2
    entry = _entry("gfpgan/big.pth", data)
    (tmp_path / "gfpgan").mkdir()
    (tmp_path / "gfpgan/big.pth.part").write_bytes(data[:half])
    with file_server({"/files/gfpgan/big.pth": data}) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "downloaded"
    assert outcome.fetched_bytes == len(data) - half
    assert [r.headers.get("range") for r in server.requests] == [f"bytes={half}-"]
    assert (tmp_path / "gfpgan/big.pth").read_bytes() == data
    assert not (tmp_path / "gfpgan/big.pth.part").exists()


def test_checkpoints_resume_starts_over_when_server_ignores_range(tmp_path: Path) -> None:
    data = _blob(50_000, 4)
    entry = _entry("x.pth", data)
    (tmp_path / "x.pth.part").write_bytes(data[:10_000])
    with file_server({"/files/x.pth": data}, ranges=False) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "downloaded"
    assert outcome.fetched_bytes == len(data)
    assert (tmp_path / "x.pth").read_bytes() == data


def test_checkpoints_corrupt_download_is_rejected_and_deleted(tmp_path: Path) -> None:
    good, bad = _blob(40_000, 5), _blob(40_000, 6)  # same size, other bytes: only the digest can tell
    entry = _entry("gfpgan/c.pth", good)
    with file_server({"/files/gfpgan/c.pth": bad}) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "failed"
    assert "sha256" in outcome.message and "deleted" in outcome.message
    assert hashlib.sha256(bad).hexdigest() in outcome.message
    assert not (tmp_path / "gfpgan/c.pth").exists()
    assert not (tmp_path / "gfpgan/c.pth.part").exists()


def test_checkpoints_cli_exits_nonzero_on_a_wrong_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The real GFPGAN table entries, served by a "mirror" that returns a few bytes instead of the weights.
    served = {c.remote: b"not the weights" for c in ck.select(["gfpgan"])}
    with file_server(served) as server:
        code = ck.main(["--dest", str(tmp_path), "--only", "gfpgan", "--base-url", server.base_url, "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "GFPGANv1.4.pth" in err and "failed its check" in err and "348632874" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".verified.json"]


def test_checkpoints_present_verified_file_is_skipped_without_a_request(tmp_path: Path) -> None:
    data = _blob(20_000, 7)
    entry = _entry("gfpgan/d.pth", data)
    (tmp_path / "gfpgan").mkdir()
    (tmp_path / "gfpgan/d.pth").write_bytes(data)
    with file_server({"/files/gfpgan/d.pth": data}) as server:
        first = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
        second = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert [o.status for o in first + second] == ["present", "present"]
    assert server.requests == []


def test_checkpoints_present_corrupt_file_is_replaced(tmp_path: Path) -> None:
    data = _blob(20_000, 8)
    entry = _entry("e.pth", data)
    (tmp_path / "e.pth").write_bytes(b"truncated")
    with file_server({"/files/e.pth": data}) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "downloaded" and "corrupt" in outcome.message
    assert (tmp_path / "e.pth").read_bytes() == data


def test_checkpoints_unpublished_digest_is_checked_against_content_length(tmp_path: Path) -> None:
    data = b'{"_class_name": "StableDiffusionPipeline"}'
    entry = _entry("sd/model_index.json", data, known=False)
    with file_server({"/files/sd/model_index.json": data}) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "downloaded"
    assert (tmp_path / "sd/model_index.json").read_bytes() == data


def test_checkpoints_missing_file_on_server_is_reported(tmp_path: Path) -> None:
    entry = _entry("gone.pth", b"x" * 10)
    with file_server({}) as server:
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "failed" and "HTTP 404" in outcome.message


def test_checkpoints_server_down_gives_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    host = url.removeprefix("http://")
    [outcome] = ck.download([_entry("f.pth", b"abc")], tmp_path, base_url=url, progress=False, timeout=5)
    assert outcome.status == "unreachable"
    assert outcome.message == f"cannot reach {host} (Connection refused)"


def test_checkpoints_offline_says_once_that_the_host_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No network: one message for the server (not one per file, no "publishes no digest" per file), at once."""
    url = closed_port_url()
    code = ck.main(["--dest", str(tmp_path), "--only", "sd", "--base-url", url, "--timeout", "5", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.splitlines()
    n = len(ck.sd_files())
    assert err[0].startswith(f"cannot reach {url.removeprefix('http://')} (Connection refused): {n} file(s) not "
                             "downloaded (stable-diffusion-2-1-base/model_index.json, ")  # fmt: skip
    assert err[1] == "  hint: check the network connection (or give a mirror with --base-url) and run again"
    assert err[2:] == [f"{n} of {n} checkpoint file(s) not ready in {tmp_path}"]
    assert "publishes no digest" not in captured.out + captured.err
    assert not (tmp_path / "stable-diffusion-2-1-base" / "model_index.json").exists()


def test_checkpoints_check_says_which_files_it_could_not_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pinned = next(c for c in ck.CHECKPOINTS if c.group == "sd" and c.sha256 is not None)
    for entry in ck.select(["sd"]):
        (tmp_path / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry.path).write_bytes(b"{}")  # placed by hand: no digest recorded from the server
    assert ck.main(["--dest", str(tmp_path), "--only", "sd", "--check"]) == 1
    out = capsys.readouterr()
    assert f"failed     {pinned.path}" in out.err  # a pinned digest: checked, and wrong
    unverified = [c.path for c in ck.select(["sd"]) if c.sha256 is None]
    line = next(x for x in out.out.splitlines() if x.startswith("could not verify"))
    assert line == (
        f"could not verify {len(unverified)} file(s) (present, nothing to check them against): {', '.join(unverified)}"
    )
    assert re.search(
        r"^unverified +stable-diffusion-2-1-base/model_index.json +no digest to check it against", out.out, re.M
    )


def test_checkpoints_check_mode_uses_no_network(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = ck.main(["--dest", str(tmp_path), "--only", "gfpgan", "--check"])
    assert code == 1
    assert "missing" in capsys.readouterr().out


def test_checkpoints_table_is_consistent_and_documented() -> None:
    paths = [c.path for c in ck.CHECKPOINTS]
    assert len(paths) == len(set(paths))
    readme = (REPO / "checkpoints" / "README.md").read_text(encoding="utf-8")
    for c in ck.CHECKPOINTS:
        assert c.url().startswith("https://")
        assert (c.sha256 is None) or (c.size is not None), c.path
        assert f"`{c.path}`" in readme, f"{c.path} is not listed in checkpoints/README.md"
        if c.sha256:
            assert c.sha256 in readme, f"the digest of {c.path} differs in checkpoints/README.md"
    for name in ck.gfpgan_files() + ck.sd_files():
        assert name in paths
    for size in ck.SADTALKER_SIZES:
        for mode in ck.SADTALKER_PREPROCESS:
            assert set(ck.sadtalker_files(size, mode)) <= set(paths)


def test_checkpoints_table_rejects_paths_outside_the_folder() -> None:
    with pytest.raises(ValueError, match="inside checkpoints"):
        _entry("../escape.pth", b"x")
    with pytest.raises(ValueError, match="inside checkpoints"):
        _entry("/etc/passwd", b"x")


def test_sadtalker_files_pick_the_mapping_net_by_preprocess() -> None:
    assert ck.sadtalker_files(256, "crop") == ["SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar"]
    assert ck.sadtalker_files(512, "full") == ["SadTalker_V0.0.2_512.safetensors", "mapping_00109-model.pth.tar"]
    assert ck.sadtalker_files(256, "extfull")[1] == "mapping_00109-model.pth.tar"
    assert ck.sadtalker_files(256, "resize")[1] == "mapping_00229-model.pth.tar"
    with pytest.raises(ValueError, match="size"):
        ck.sadtalker_files(384, "crop")
    with pytest.raises(ValueError, match="preprocess"):
        ck.sadtalker_files(256, "zoom")


def test_missing_reports_files_not_present(tmp_path: Path) -> None:
    names = ck.gfpgan_files()
    assert ck.missing(tmp_path, names) == names
    (tmp_path / "gfpgan").mkdir()
    (tmp_path / "gfpgan/GFPGANv1.4.pth.part").write_bytes(b"half")  # a partial download never counts
    (tmp_path / "gfpgan/detection_Resnet50_Final.pth").mkdir()  # nor does a folder of that name
    (tmp_path / "gfpgan/parsing_parsenet.pth").write_bytes(b"weights")
    assert ck.missing(tmp_path, names) == ["gfpgan/GFPGANv1.4.pth", "gfpgan/detection_Resnet50_Final.pth"]


def test_checkpoints_import_stays_light() -> None:
    code = "import sys, renderer.checkpoints; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0


def _hf_entry(path: str) -> ck.Checkpoint:
    """A Hugging Face file without a pinned size or digest (like the Stable Diffusion text encoder)."""
    return ck.Checkpoint(path, "sd", ck.HUGGING_FACE, f"/repo/resolve/main/{path}", None, None, "openrail++")


def _git_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("kind", ["lfs", "git"])
def test_checkpoints_unpinned_hugging_face_file_is_checked_against_the_published_digest(
    tmp_path: Path, kind: str
) -> None:
    """No digest in the table: the one the server publishes (X-Linked-Etag for LFS files, the ETag Git object id
    for the others) checks the download, a wrong file is deleted, and the digest is kept so a later --check and
    a later run notice a file changed on disk."""
    good, bad = _blob(30_000, 8), _blob(30_000, 9)
    entry = _hf_entry("sd/text_encoder/model.bin" if kind == "lfs" else "sd/config.json")
    url = entry.remote
    header = (
        {"X-Linked-Etag": f'"{hashlib.sha256(good).hexdigest()}"'} if kind == "lfs" else {"ETag": f'"{_git_id(good)}"'}
    )

    with file_server({url: bad}, headers={url: header}) as server:
        [wrong] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert wrong.status == "failed" and "published by the server" in wrong.message, wrong
    assert not (tmp_path / entry.path).exists() and not list(tmp_path.rglob("*.part"))

    with file_server({url: good}, headers={url: header}) as server:
        [right] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
        heads = ["HEAD"] if kind == "lfs" else ["HEAD", "HEAD"]  # a Git file's digest comes after a 307 on the host
        assert [r.path.split()[0] for r in server.requests] == [*heads, url]
    assert right.status == "downloaded" and (tmp_path / entry.path).read_bytes() == good
    assert [o.status for o in ck.check([entry], tmp_path)] == ["present"]

    target = tmp_path / entry.path
    target.write_bytes(bad)  # changed on disk, same size
    assert [o.status for o in ck.check([entry], tmp_path)] == ["failed"]


def test_checkpoints_server_without_digest_falls_back_to_content_length(tmp_path: Path) -> None:
    data = _blob(10_000, 10)
    entry = _hf_entry("sd/plain.json")
    with file_server({entry.remote: data}) as server:  # a plain mirror: no ETag
        [outcome] = ck.download([entry], tmp_path, base_url=server.base_url, progress=False)
    assert outcome.status == "downloaded" and (tmp_path / entry.path).read_bytes() == data
