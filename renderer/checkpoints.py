"""The weights the seed's models need, where they come from, and `make checkpoints`, which fetches them.

One table (`CHECKPOINTS`) names every file: its path under `checkpoints/`, its canonical URL, its size and sha256
where they are published, and its licence. `checkpoints/README.md` shows the same table for people.

The downloader resumes (a `<name>.part` file plus an HTTP Range request), checks size and sha256 before a file
takes its final name, deletes a download whose digest is wrong, and skips files that are already there and
verified. It uses only the standard library (and tqdm for the bar).

This module must stay light: the runner's planner imports `sadtalker_files`, `gfpgan_files` and `missing` to tell
which weights a renderer needs and whether they are present, and the planner never imports torch.

    python -m renderer.checkpoints --dest checkpoints [--only sadtalker|gfpgan|sd] [--optional] [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from renderer.base import BackendError

logger = logging.getLogger(__name__)

GITHUB = "https://github.com"
HUGGING_FACE = "https://huggingface.co"

#: Folder (under checkpoints/) of the Stable Diffusion 2.1 base pipeline; the `image.model` default names it.
SD_FOLDER = "stable-diffusion-2-1-base"
#: Folder (under checkpoints/) of GFPGAN and the facexlib networks it uses.
GFPGAN_FOLDER = "gfpgan"

GROUPS = ("sadtalker", "gfpgan", "sd")

_SADTALKER_RELEASE = "/OpenTalker/SadTalker/releases/download/v0.0.2-rc"
_SADTALKER_LEGACY = "/OpenTalker/SadTalker/releases/download/v0.0.2"
_GFPGAN_RELEASE = "/TencentARC/GFPGAN/releases/download/v1.3.0"
_FACEXLIB = "/xinntao/facexlib/releases/download"
_SD_REPO = "/stabilityai/stable-diffusion-2-1-base/resolve/main"

_SADTALKER_LICENSE = "Apache-2.0"
_GFPGAN_LICENSE = "Apache-2.0 (see notes)"
_FACEXLIB_LICENSE = "MIT"
_SD_LICENSE = "CreativeML Open RAIL++-M"

_CHUNK = 1 << 20
#: Where `make checkpoints` remembers (size, mtime) -> sha256 of verified files, so a rerun does not rehash GBs.
_STAMP_FILE = ".verified.json"
#: Key in the stamp file of the digests servers published for files the table has none for.
_PUBLISHED = "@published"


class DownloadError(BackendError):
    """A checkpoint could not be fetched or failed its check; `hint` says what to do."""


class HostUnreachable(DownloadError):
    """The server cannot be reached at all (no network, DNS failure, refused, timed out): said once per host, and
    the host's other files are not tried."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(
            f"cannot reach {host} ({reason})",
            "check the network connection (or give a mirror with --base-url) and run again",
        )
        self.host = host
        self.reason = reason


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def probe(url: str, timeout: float) -> None:
    """Raise HostUnreachable unless a TCP connection to `url`'s host opens within `timeout` seconds: one quick
    answer for a machine with no network, instead of a failed request (and a wait) per file."""
    import socket

    proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme)
    if proxy and not urllib.request.proxy_bypass(urllib.parse.urlsplit(url).hostname or ""):
        url = proxy if "://" in proxy else f"http://{proxy}"  # the requests go through the proxy: probe it
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return
    except socket.gaierror as exc:
        raise HostUnreachable(parts.netloc, f"name not resolved: {exc.strerror or exc}") from exc
    except TimeoutError as exc:
        raise HostUnreachable(parts.netloc, f"no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise HostUnreachable(parts.netloc, exc.strerror or str(exc)) from exc


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One weights file: where it lives under checkpoints/, where it comes from, and how to check it.

    `size` and `sha256` are None where no published value was found: the download is then checked against the
    digest a Hugging Face server sends with it (`published_digest`), else against the server's Content-Length only;
    `optional` files are fetched only with `--optional`.
    """

    path: str
    group: str
    source: str
    remote: str
    size: int | None
    sha256: str | None
    license: str
    optional: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        pure = PurePosixPath(self.path)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise ValueError(f"checkpoint path must be relative and stay inside checkpoints/: {self.path!r}")
        if self.group not in GROUPS:
            raise ValueError(f"unknown checkpoint group {self.group!r}, expected one of {GROUPS}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or not all(c in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"sha256 of {self.path} must be 64 lower-case hex digits")
        if not self.remote.startswith("/"):
            raise ValueError(f"remote of {self.path} must start with '/': {self.remote!r}")

    def url(self, base_url: str | None = None) -> str:
        """The file's URL; `base_url` replaces the host part (a mirror, or a test server)."""
        return (base_url or self.source).rstrip("/") + self.remote


def _sd(path: str, size: int | None = None, sha256: str | None = None, note: str = "") -> Checkpoint:
    return Checkpoint(
        path=f"{SD_FOLDER}/{path}",
        group="sd",
        source=HUGGING_FACE,
        remote=f"{_SD_REPO}/{path}",
        size=size,
        sha256=sha256,
        license=_SD_LICENSE,
        note=note or "small config file (kept in Git): checked against the Git object id Hugging Face sends",
    )


#: Every file `make checkpoints` knows. Sizes and digests come from the projects' release assets and Git LFS
#: pointers as published by third parties (see checkpoints/README.md for which ones); None means none was found.
CHECKPOINTS: tuple[Checkpoint, ...] = (
    # SadTalker V0.0.2 (SPEC §2.1/§2.2): one safetensors file per render size + the mapping net per preprocess mode.
    Checkpoint(
        "SadTalker_V0.0.2_256.safetensors",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_RELEASE}/SadTalker_V0.0.2_256.safetensors",
        725_066_984,
        "c211f5d6de003516bf1bbda9f47049a4c9c99133b1ab565c6961e5af16477bff",
        _SADTALKER_LICENSE,
    ),
    Checkpoint(
        "SadTalker_V0.0.2_512.safetensors",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_RELEASE}/SadTalker_V0.0.2_512.safetensors",
        725_066_984,
        "0e063f7ff5258240bdb0f7690783a7b1374e6a4a81ce8fa33456f4cd49694340",
        _SADTALKER_LICENSE,
        note="size and digest each from a single third-party listing",
    ),
    Checkpoint(
        "mapping_00109-model.pth.tar",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_RELEASE}/mapping_00109-model.pth.tar",
        155_779_231,
        "84a8642468a3fcfdd9ab6be955267043116c2bec2284686a5262f1eaf017f64c",
        _SADTALKER_LICENSE,
        note="mapping net for preprocess full/extfull (73 inputs)",
    ),
    Checkpoint(
        "mapping_00229-model.pth.tar",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_RELEASE}/mapping_00229-model.pth.tar",
        155_521_183,
        "62a1e06006cc963220f6477438518ed86e9788226c62ae382ddc42fbcefb83f1",
        _SADTALKER_LICENSE,
        note="mapping net for preprocess crop/extcrop/resize (70 inputs)",
    ),
    # Legacy pickles (SPEC §2.3): only for --old_version parity checks; the safetensors file replaces them.
    Checkpoint(
        "epoch_20.pth",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_LEGACY}/epoch_20.pth",
        288_860_037,
        "6d17a6b23457b521801baae583cb6a58f7238fe6721fc3d65d76407460e9149b",
        _SADTALKER_LICENSE,
        optional=True,
        note="legacy set; digest listed for the Hugging Face copy (vinthony/SadTalker)",
    ),
    Checkpoint(
        "auido2pose_00140-model.pth",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_LEGACY}/auido2pose_00140-model.pth",
        95_916_155,
        "4fba6701852dc57efbed25b1e4276e4ff752941860d69fc4429f08a02326ebce",
        _SADTALKER_LICENSE,
        optional=True,
        note="legacy set (name misspelt upstream); digest listed for the Hugging Face copy",
    ),
    Checkpoint(
        "auido2exp_00300-model.pth",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_LEGACY}/auido2exp_00300-model.pth",
        34_278_319,
        "b7608f0e6b477e50e03ca569ac5b04a841b9217f89d502862fc78fda4e46dec4",
        _SADTALKER_LICENSE,
        optional=True,
        note="legacy set (name misspelt upstream); digest listed for the Hugging Face copy",
    ),
    Checkpoint(
        "facevid2vid_00189-model.pth.tar",
        "sadtalker",
        GITHUB,
        f"{_SADTALKER_LEGACY}/facevid2vid_00189-model.pth.tar",
        2_112_619_148,
        "fbad01d46f0510276dc4521322dde6824a873a4222cd0740c85762e7067ea71d",
        _SADTALKER_LICENSE,
        optional=True,
        note="legacy set; digest listed for the Hugging Face copy",
    ),
    Checkpoint(
        f"{GFPGAN_FOLDER}/alignment_WFLW_4HG.pth",
        "sadtalker",
        GITHUB,
        f"{_FACEXLIB}/v0.1.0/alignment_WFLW_4HG.pth",
        193_670_248,
        "bbfd137307a4c7debd5c283b9b0ce539466cee417ac0a155e184d857f9f2899c",
        _FACEXLIB_LICENSE,
        optional=True,
        note="98-point landmarks of upstream SadTalker's preprocessing; this project finds landmarks with dlib",
    ),
    # GFPGAN v1.4 and the two facexlib networks its face helper uses (detection, parsing for the paste-back mask).
    Checkpoint(
        f"{GFPGAN_FOLDER}/GFPGANv1.4.pth",
        "gfpgan",
        GITHUB,
        f"{_GFPGAN_RELEASE}/GFPGANv1.4.pth",
        348_632_874,
        "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
        _GFPGAN_LICENSE,
    ),
    Checkpoint(
        f"{GFPGAN_FOLDER}/detection_Resnet50_Final.pth",
        "gfpgan",
        GITHUB,
        f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
        109_497_761,
        "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        _FACEXLIB_LICENSE,
        note="RetinaFace-ResNet50",
    ),
    Checkpoint(
        f"{GFPGAN_FOLDER}/parsing_parsenet.pth",
        "gfpgan",
        GITHUB,
        f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth",
        85_331_193,
        "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
        _FACEXLIB_LICENSE,
        note="ParseNet face parsing",
    ),
    # Stable Diffusion 2.1 base as a diffusers folder, fp16 weights (half the download; load with variant="fp16").
    _sd("model_index.json"),
    _sd("feature_extractor/preprocessor_config.json"),
    _sd("scheduler/scheduler_config.json"),
    _sd("text_encoder/config.json"),
    _sd(
        "text_encoder/model.fp16.safetensors",
        note="about 681 MB; no pinned digest found: checked against the sha256 Hugging Face sends (X-Linked-Etag)",
    ),
    _sd("tokenizer/merges.txt"),
    _sd("tokenizer/special_tokens_map.json"),
    _sd("tokenizer/tokenizer_config.json"),
    _sd("tokenizer/vocab.json"),
    _sd("unet/config.json"),
    _sd(
        "unet/diffusion_pytorch_model.fp16.safetensors",
        1_731_904_736,
        "28ec9cf3b239c0751c201b1f6fb46b551df5862731b30a37aa1360101cb3fbab",
        note="Git LFS pointer",
    ),
    _sd("vae/config.json"),
    _sd(
        "vae/diffusion_pytorch_model.fp16.safetensors",
        167_335_342,
        "3e4c08995484ee61270175e9e7a072b66a6e4eeb5f0c266667fe1f45b90daf9a",
        note="Git LFS pointer",
    ),
)

SADTALKER_PREPROCESS = ("crop", "extcrop", "resize", "full", "extfull")
SADTALKER_SIZES = (256, 512)


# ---------------------------------------------------------------------------------------------------------------
# Light helpers for the planner (no network, no hashing, no torch)


def sadtalker_files(size: int, preprocess: str) -> list[str]:
    """Checkpoint files (relative to checkpoints/) the SadTalker renderer loads for `size` and `preprocess`.

    SPEC §2.1: the safetensors file is chosen by size; the mapping net by whether the mode is a "full" one.
    """
    if size not in SADTALKER_SIZES:
        raise ValueError(f"SadTalker size must be one of {SADTALKER_SIZES}, got {size!r}")
    if preprocess not in SADTALKER_PREPROCESS:
        raise ValueError(f"SadTalker preprocess must be one of {SADTALKER_PREPROCESS}, got {preprocess!r}")
    mapping = "mapping_00109-model.pth.tar" if "full" in preprocess else "mapping_00229-model.pth.tar"
    return [f"SadTalker_V0.0.2_{size}.safetensors", mapping]


def gfpgan_files() -> list[str]:
    """Checkpoint files (relative to checkpoints/) the GFPGAN enhancer loads: restorer, detector, parser."""
    return [c.path for c in CHECKPOINTS if c.group == "gfpgan" and not c.optional]


def sd_files() -> list[str]:
    """Checkpoint files (relative to checkpoints/) of the Stable Diffusion 2.1 base folder."""
    return [c.path for c in CHECKPOINTS if c.group == "sd" and not c.optional]


def missing(root: Path, names: Iterable[str]) -> list[str]:
    """The names (relative to `root`) that are not present as files (a `.part` download never counts).

    Cheap on purpose (existence only: no sizes, no hashing), so the planner can call it for every video; custom
    weights under the same names are allowed. `--check` verifies sizes and digests.
    """
    return [name for name in names if not (Path(root) / name).is_file()]


def select(
    groups: Iterable[str] | None = None, optional: bool = False, table: Sequence[Checkpoint] = CHECKPOINTS
) -> list[Checkpoint]:
    """Entries of `table` in `groups` (all groups when None), leaving optional ones out unless asked for."""
    wanted = set(groups) if groups else set(GROUPS)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown checkpoint group(s) {sorted(unknown)}, expected some of {GROUPS}")
    return [c for c in table if c.group in wanted and (optional or not c.optional)]


# ---------------------------------------------------------------------------------------------------------------
# Downloading and verifying


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one checkpoint: `status` is "present", "downloaded", "missing" (check only), "unverified"
    (check only: present, with no published size or digest to check it against), "unreachable" (its server could
    not be reached; `message` says why, the same for every file of that server) or "failed"."""

    path: str
    status: str
    message: str = ""
    fetched_bytes: int = 0


def _target(dest: Path, entry: Checkpoint) -> Path:
    root = dest.resolve()
    target = (root / entry.path).resolve()
    if root not in target.parents:
        raise DownloadError(f"{entry.path} would be written outside {root}")
    return target


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Stamps:
    """Remembers (size, mtime_ns) -> sha256 of files already verified, in checkpoints/.verified.json."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / _STAMP_FILE
        try:
            self.data: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                raise ValueError("not an object")
        except FileNotFoundError:
            self.data = {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s (%s)", self.path, exc)
            self.data = {}

    def digest(self, rel: str, path: Path) -> str:
        st = path.stat()
        entry = self.data.get(rel)
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return str(entry.get("sha256"))
        value = sha256_of(path)
        self.data[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
        return value

    def forget(self, rel: str) -> None:
        self.data.pop(rel, None)

    def published(self, rel: str) -> tuple[str, str] | None:
        """The digest the server published for a file the table has none for (`published_digest`), if recorded."""
        value = self.data.get(_PUBLISHED, {}).get(rel)
        return (value[0], value[1]) if isinstance(value, list) and len(value) == 2 else None

    def set_published(self, rel: str, digest: tuple[str, str]) -> None:
        table = self.data.get(_PUBLISHED)
        if not isinstance(table, dict):
            table = self.data[_PUBLISHED] = {}
        table[rel] = list(digest)

    def save(self) -> None:
        if not self.path.parent.is_dir():
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; it holds nothing secret
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _verify(entry: Checkpoint, path: Path, stamps: _Stamps) -> str | None:
    """None when `path` matches the table's size and digest (or, where the table has none, the digest the server
    published for it when it was downloaded), else the reason it does not."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"size {size} bytes, expected {entry.size}"
    if entry.sha256 is not None:
        got = stamps.digest(entry.path, path)
        if got != entry.sha256:
            return f"sha256 {got}, expected {entry.sha256}"
        return None
    published = stamps.published(entry.path)
    if published is not None:
        kind, value = published
        got = stamps.digest(entry.path, path) if kind == "sha256" else git_blob_sha1(path)
        if got != value:
            return f"{kind} {got}, expected {value} (published by the server)"
    return None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of `repo_id` (no network), or None: where a model given by
    its hub id is loaded from, and what its cache key hashes."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, not cached, or a malformed id: the weights are missing
        return None


def git_blob_sha1(path: Path) -> str:
    """The Git object id of a file's bytes: what Hugging Face sends as the ETag of a file kept in Git (not LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the redirect's own headers are the ones wanted


def published_digest(url: str, timeout: float) -> tuple[str, str] | None:
    """("sha256", hex) or ("git-sha1", hex) as a Hugging Face server publishes it for `url`, from HEAD requests:
    X-Linked-Etag is the sha256 of a Git LFS file (sent with the redirect to the file's store, which is not
    followed); a file kept in Git is answered on the same host, possibly after redirects there (huggingface.co sends
    a relative 307 to /api/resolve-cache/...), with its Git object id as ETag and the X-Repo-Commit header. None when
    the server says neither (another kind of server, or no network): then only the size can be checked."""
    for _ in range(5):  # same-host redirects
        request = urllib.request.Request(
            url, method="HEAD", headers={"User-Agent": "digital-human-batch-checkpoints/1"}
        )
        try:
            with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as response:  # noqa: S310
                status, headers = response.status, response.headers
        except urllib.error.HTTPError as exc:
            status, headers = exc.code, exc.headers
        except (urllib.error.URLError, OSError):
            return None

        def tag(name: str, headers: Any = headers) -> str:
            return (headers.get(name) or "").removeprefix("W/").strip('"').lower()

        if re.fullmatch(r"[0-9a-f]{64}", linked := tag("X-Linked-Etag")):
            return "sha256", linked
        if 300 <= status < 400 and headers.get("Location"):
            target = urllib.parse.urljoin(url, headers["Location"])
            if urllib.parse.urlsplit(target).netloc != urllib.parse.urlsplit(url).netloc:
                return None  # off to another host without a digest
            url = target
            continue
        if status != 200 or not headers.get("X-Repo-Commit"):  # only a Hugging Face answer's ETag is a digest
            return None
        etag = tag("ETag")
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return "sha256", etag
        if re.fullmatch(r"[0-9a-f]{40}", etag):
            return "git-sha1", etag
        return None
    return None


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """GET `url` from byte `offset`; None when the server says the range is past the end (the part is whole)."""
    request = urllib.request.Request(url, headers={"User-Agent": "digital-human-batch-checkpoints/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https URLs from our table)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        raise DownloadError(
            f"{url}: HTTP {exc.code} {exc.reason}",
            "the file may have moved: check the URL in renderer/checkpoints.py or pass --base-url for a mirror",
        ) from exc
    except urllib.error.URLError as exc:
        raise DownloadError(
            f"cannot reach {url}: {exc.reason}", "check the network connection (or --base-url) and run again"
        ) from exc
    except (TimeoutError, OSError) as exc:
        raise DownloadError(f"cannot reach {url}: {exc}", "check the network connection and run again") from exc


def _stream(response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, progress: bool) -> int:
    """Append (or, when `offset` is 0, write) the response body to `part`; return the bytes received."""
    from tqdm import tqdm

    received = 0
    mode = "ab" if offset else "wb"
    with (
        open(part, mode) as fh,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            fh.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def fetch(
    entry: Checkpoint,
    dest: Path,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    stamps: _Stamps | None = None,
) -> Outcome:
    """Make sure `dest/entry.path` holds the verified file: skip it when present, else download (resuming).

    Raises DownloadError when the server cannot be reached, the transfer stops early (the `.part` file stays for
    the next run to resume), or the result fails its size/sha256 check (the bad download is deleted).
    """
    dest = Path(dest)
    stamps = stamps if stamps is not None else _Stamps(dest)
    target = _target(dest, entry)
    replaced = ""
    if target.is_file():
        problem = _verify(entry, target, stamps)
        if problem is None:
            return Outcome(entry.path, "present")
        logger.warning("%s is corrupt (%s); downloading it again", target, problem)
        target.unlink()
        stamps.forget(entry.path)
        replaced = f"replaced a corrupt copy ({problem}); "

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if entry.size is not None and offset > entry.size:
        part.unlink()
        offset = 0

    url = entry.url(base_url)
    if entry.sha256 is None and entry.source == HUGGING_FACE:
        published = published_digest(url, timeout)
        if published is not None:
            stamps.set_published(entry.path, published)
        else:
            logger.info("%s publishes no digest for %s; checking its size only", url, entry.path)
    received = 0
    if entry.size is None or offset < entry.size or offset == 0:
        response = _open(url, offset, timeout)
        if response is not None:
            with response:
                if offset and response.status != 206:
                    logger.info("%s ignored the Range request; starting %s over", url, entry.path)
                    offset = 0
                length = response.headers.get("Content-Length")
                expected_now = int(length) if length and length.isdigit() else None
                total = entry.size if entry.size is not None else (offset + expected_now if expected_now else None)
                try:
                    received = _stream(response, part, offset, total, progress)
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadError(
                        f"download of {entry.path} from {url} broke off: {exc}",
                        f"run again to resume from {part}",
                    ) from exc
                if expected_now is not None and received != expected_now:
                    raise DownloadError(
                        f"download of {entry.path} stopped after {received} of {expected_now} bytes",
                        f"run again to resume from {part}",
                    )

    # The transfer ended cleanly, so a size that differs now means the server's file is not the pinned one.
    problem = _verify(entry, part, stamps)
    if problem is not None:
        part.unlink()
        stamps.forget(entry.path)
        raise DownloadError(
            f"{entry.path} from {url} failed its check ({problem}); the bad download was deleted",
            "run `make checkpoints` again; if it fails the same way, the file at the URL is not the one pinned in "
            "renderer/checkpoints.py",
        )
    # A rename keeps size and mtime, so the digest just remembered for the .part file stays valid for the target.
    os.replace(part, target)
    return Outcome(entry.path, "downloaded", replaced.rstrip("; "), received)


def download(
    entries: Iterable[Checkpoint],
    dest: Path,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Outcome]:
    """Fetch every entry (see `fetch`); a failure is recorded in its Outcome and the others go on. Each server is
    probed once before its first download: one that cannot be reached gives every file of it the same "unreachable"
    outcome at once."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stamps = _Stamps(dest)
    outcomes = []
    reached: dict[str, HostUnreachable | None] = {}
    try:
        for entry in entries:
            url = entry.url(base_url)
            target = _target(dest, entry)
            needs_network = not (target.is_file() and _verify(entry, target, stamps) is None)
            try:
                if needs_network:
                    host = _host(url)
                    if host not in reached:
                        try:
                            probe(url, min(timeout, 10.0))
                            reached[host] = None
                        except HostUnreachable as exc:
                            reached[host] = exc
                    if reached[host] is not None:
                        raise reached[host]
                outcomes.append(
                    fetch(entry, dest, base_url=base_url, timeout=timeout, progress=progress, stamps=stamps)
                )
            except HostUnreachable as exc:
                outcomes.append(Outcome(entry.path, "unreachable", exc.message))
            except DownloadError as exc:
                outcomes.append(Outcome(entry.path, "failed", str(exc)))
    finally:
        stamps.save()
    return outcomes


def check(entries: Iterable[Checkpoint], dest: Path) -> list[Outcome]:
    """Verify what is on disk without any network: "present", "missing" or "failed" (wrong size or digest)."""
    dest = Path(dest)
    stamps = _Stamps(dest)
    outcomes = []
    for entry in entries:
        target = _target(dest, entry)
        if not target.is_file():
            outcomes.append(Outcome(entry.path, "missing"))
            continue
        problem = _verify(entry, target, stamps)
        if problem is not None:
            outcomes.append(Outcome(entry.path, "failed", problem))
        elif entry.sha256 is None and stamps.published(entry.path) is None:
            checked = "its size matches; " if entry.size is not None else ""
            outcomes.append(
                Outcome(
                    entry.path,
                    "unverified",
                    f"{checked}no digest to check it against (none pinned, none recorded from the server: "
                    "`make checkpoints` records it when it downloads the file)",
                )
            )
        else:
            outcomes.append(Outcome(entry.path, "present"))
    stamps.save()
    return outcomes


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """`make checkpoints`: download (or with --check, verify) the weights; exit 1 when any file failed."""
    parser = argparse.ArgumentParser(
        prog="python -m renderer.checkpoints", description="Download and verify the model weights into checkpoints/."
    )
    parser.add_argument("--dest", type=Path, default=Path("checkpoints"), help="weights folder (default: checkpoints)")
    parser.add_argument(
        "--only", action="append", choices=GROUPS, help="only this set (repeatable; default: every set)"
    )
    parser.add_argument("--optional", action="store_true", help="also the optional files (SadTalker legacy set)")
    parser.add_argument("--base-url", help="fetch from this host instead of github.com / huggingface.co (a mirror)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    parser.add_argument("--check", action="store_true", help="verify what is there, download nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entries = select(args.only, args.optional)
    if args.check:
        outcomes = check(entries, args.dest)
    else:
        outcomes = download(entries, args.dest, base_url=args.base_url, timeout=args.timeout, progress=not args.quiet)
    unreachable = [o for o in outcomes if o.status == "unreachable"]
    for message in dict.fromkeys(o.message for o in unreachable):  # once per server, not once per file
        files = [o.path for o in unreachable if o.message == message]
        print(f"{message}: {len(files)} file(s) not downloaded ({', '.join(files)})", file=sys.stderr)
        print("  hint: check the network connection (or give a mirror with --base-url) and run again", file=sys.stderr)
    width = max(len(o.path) for o in outcomes) if outcomes else 0
    for o in outcomes:
        if o.status != "unreachable":
            line = f"{o.status:<10} {o.path:<{width}}  {o.message}".rstrip()
            print(line, file=sys.stderr if o.status == "failed" else sys.stdout)
    unverified = [o.path for o in outcomes if o.status == "unverified"]
    if unverified:
        print(f"could not verify {len(unverified)} file(s) (present, nothing to check them against): "
              f"{', '.join(unverified)}")  # fmt: skip
    bad = [o for o in outcomes if o.status in ("failed", "missing", "unreachable")]
    if bad:
        print(f"{len(bad)} of {len(outcomes)} checkpoint file(s) not ready in {args.dest}", file=sys.stderr)
        return 1
    verified = len(outcomes) - len(unverified)
    print(f"{verified} of {len(outcomes)} checkpoint file(s) verified in {args.dest}" if unverified
          else f"all {len(outcomes)} checkpoint file(s) verified in {args.dest}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
