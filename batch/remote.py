"""A remote step cache shared by CI jobs (Bazel's --remote_cache, DVC's remotes), over any fsspec URL.

The local cache (batch/cache.py) stays the only place the runner reads outputs from: a remote hit is downloaded into
it, checked against the record's sha256 of every output, and committed like a step that ran; each step committed
locally is uploaded. Layout under the URL:

    blobs/<sha256[:2]>/<sha256>              an output's bytes, named by their digest
    steps/<stage>/<key[:2]>/<key>.json       the step's record: its outputs' names, sizes and sha256

Blobs go up first and the record last, each object whole (an S3 PUT is atomic; on a file system a temporary name,
then a rename), so a job killed mid-upload leaves no record: a miss, never a false hit. Two jobs uploading one step
both succeed: each record names blobs that are complete, and the last record written stays. A record or blob that is
missing, truncated or wrong is a warning and a miss (the step is rebuilt and uploaded again), never a hit.

Remote trouble (no network, access denied, no bucket) is a RemoteError at the start of a build, which goes on with the
local cache alone unless the remote is required; later failures are warnings, counted in `errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from batch.cache import Cache
from batch.errors import DHBatchError
from batch.hashing import canonical_json, file_sha256
from batch.stages import STAGES

logger = logging.getLogger(__name__)

#: Key format of the remote layout (blobs/ and steps/); a change of layout starts a new folder under the URL.
LAYOUT = "v1"
#: Parallel transfers (downloads of hits, listing records).
TRANSFERS = 8
#: An unreferenced blob younger than this may belong to an upload in progress: gc leaves it.
UPLOAD_GRACE_S = 3600
#: botocore's defaults wait a minute per attempt on an unreachable endpoint; a CI job should learn it sooner.
S3_DEFAULTS: Mapping[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
}


_DIGEST = re.compile(r"[0-9a-f]{64}")


class RemoteError(DHBatchError):
    """The remote cache cannot be used (unreachable, access denied, no bucket, a bad URL or config)."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class RemoteSettings:
    url: str
    #: Download hits, never upload (untrusted jobs: pull requests from forks).
    read_only: bool = False
    #: Fail the build when the remote cannot be used (instead of building with the local cache alone).
    required: bool = False
    #: fsspec storage options (endpoint_url, profile, anon, client_kwargs...), from the project config.
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load_config(root: Path) -> tuple[dict[str, Any], str]:
    """The project's dhbatch settings and where they came from: dhbatch.toml, else [tool.dhbatch] in
    pyproject.toml, in the project root ({} when neither exists)."""
    for name, table in (("dhbatch.toml", ()), ("pyproject.toml", ("tool", "dhbatch"))):
        path = root / name
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RemoteError(f"{path}: cannot read the project config ({exc})", "fix the TOML syntax") from exc
        for part in table:
            data = data.get(part, {})
        if data or not table:
            return (data if isinstance(data, dict) else {}), f"{path}" + (f" [{'.'.join(table)}]" if table else "")
    return {}, ""


def remote_settings(
    root: Path, url: str | None = None, read_only: bool = False, required: bool = False, disabled: bool = False
) -> RemoteSettings | None:
    """The remote to use: the command line's, else the project config's `remote` (None: no remote)."""
    if disabled:
        return None
    config, where = load_config(root)
    url = url or config.get("remote")
    if not url:
        return None
    options = config.get("remote_options", {})
    checks = (
        (isinstance(url, str), "remote must be a URL string"),
        (isinstance(options, dict), "remote_options must be a table of fsspec options"),
        (isinstance(config.get("remote_read_only", False), bool), "remote_read_only must be true or false"),
        (isinstance(config.get("remote_required", False), bool), "remote_required must be true or false"),
    )
    for ok, message in checks:
        if not ok:
            raise RemoteError(f"{where}: {message}", 'e.g. remote = "s3://bucket/dhbatch"')
    return RemoteSettings(
        url=url,
        read_only=read_only or config.get("remote_read_only", False),
        required=required or config.get("remote_required", False),
        options=options,
    )


class RemoteCache:
    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self.url = settings.url
        self.read_only = settings.read_only
        self.required = settings.required
        #: What went wrong after the start (a failed upload or download), one line each.
        self.errors: list[str] = []
        self.hits = 0
        self.uploaded = 0
        self._lock = threading.Lock()
        self._uploads: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        try:
            import fsspec
        except ImportError as exc:  # the `remote` extra
            raise RemoteError("the remote cache needs fsspec", "pip install 'dhbatch[remote]'") from exc
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        options = dict(settings.options)
        if protocol in ("s3", "s3a"):
            options = {**S3_DEFAULTS, **options}
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as exc:
            hint = "pip install 'dhbatch[remote]' (s3fs)" if isinstance(exc, ImportError) else "check the URL"
            raise RemoteError(f"remote cache {self.url}: {exc}", hint) from exc
        self.root = f"{root.rstrip('/')}/{LAYOUT}"
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # -- paths ----------------------------------------------------------------------------------------------------
    def record_path(self, stage: str, key: str) -> str:
        return f"{self.root}/steps/{stage}/{key[:2]}/{key}.json"

    def blob_path(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    # -- reachability -----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise a RemoteError saying what is wrong when the remote cannot be used; create a file:// root."""
        try:
            if self._local and not self.read_only:
                self.fs.makedirs(self.root, exist_ok=True)
            if self.fs.exists(self.root):
                self.fs.ls(self.root, detail=False)
            else:
                self._check_bucket()
            if not self.read_only:
                probe = f"{self.root}/.probe.{uuid.uuid4().hex}"
                self.fs.pipe_file(probe, b"dhbatch")
                self.fs.rm_file(probe)
        except RemoteError:
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec back ends raise many types; all mean "cannot use it"
            raise self._error(exc) from exc

    def _check_bucket(self) -> None:
        """A root that does not exist yet is fine on object stores (prefixes appear on first write), but its bucket
        must exist."""
        if self._local:
            raise FileNotFoundError(self.root)
        bucket = self.root.split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")

    def _error(self, exc: BaseException) -> RemoteError:
        text = f"{exc.__class__.__name__}: {exc}"
        if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
            why, hint = "access denied", "check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket policy"
        elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
            why, hint = f"not found ({exc})", "create the bucket or folder, or fix the URL"
        else:
            why, hint = f"cannot reach it ({text})", "check the network and the endpoint (AWS_ENDPOINT_URL)"
        return RemoteError(f"remote cache {self.url}: {why}", hint)

    def _warn(self, message: str) -> None:
        logger.warning("remote cache %s: %s", self.url, message)
        with self._lock:
            self.errors.append(message)

    # -- download ---------------------------------------------------------------------------------------------------
    def fetch(self, cache: Cache, stage: str, key: str, held: bool = False) -> dict[str, Any] | None:
        """Download the step into the local cache if the remote has a sound entry; its local record, else None.
        `held`: the caller holds the key's local lock (Cache.locked)."""
        try:
            raw = self.fs.cat_file(self.record_path(stage, key))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a remote that fails mid-build: a miss and a warning
            self._warn(f"cannot read {stage} {key[:12]} ({exc.__class__.__name__}: {exc}); building it here")
            return None
        try:
            rec = json.loads(raw)
            sums, sizes = rec["sha256"], rec["outputs"]
            if rec["key"] != key or rec["stage"] != stage or set(sums) != set(sizes):
                raise ValueError("the record names another step")
            if not set(STAGES[stage].outputs) <= set(sums) <= {*STAGES[stage].outputs, *STAGES[stage].optional}:
                raise ValueError("its outputs are not the stage's")
            if not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in sums.values()):
                raise ValueError("a sha256 is not one")  # names a blob: never a path of its own making
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("remote cache entry %s %s is corrupt (%s): rebuilding it", stage, key[:12], exc)
            self._discard(self.record_path(stage, key))
            return None
        tmp = cache.new_tmp(key)
        try:
            for name, digest in sums.items():
                ok = self._download(self.blob_path(digest), tmp / name, digest, sizes[name], f"{stage} {key[:12]}")
                if ok is None:  # a transfer failed: the entry may be fine
                    return None
                if not ok:  # the entry is damaged: drop its record too, so the rebuilt step is uploaded again
                    self._discard(self.record_path(stage, key))
                    return None
            info = {k: v for k, v in rec.items() if k not in ("key", "stage", "outputs", "sha256", "uploaded")}
            spec = STAGES[stage]
            locks = contextlib.ExitStack() if held else cache.try_lock([key])
            if locks is None:  # another build here is making or fetching it: the runner looks again later
                return None
            with locks:
                cache.forget(key)
                if (local := cache.record(stage, key)) is not None:  # another process of this machine was quicker
                    return local
                local = cache.commit(stage, key, tmp, spec.outputs, spec.optional, info)
            with self._lock:
                self.hits += 1
            return local
        except OSError as exc:
            self._warn(f"cannot store {stage} {key[:12]} in the local cache ({exc}); building it here")
            return None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, path: str, dest: Path, digest: str, size: int, what: str) -> bool | None:
        """True: `dest` holds the blob, checked. False: the blob is missing or damaged. None: the transfer failed."""
        try:
            self.fs.get_file(path, str(dest))
        except FileNotFoundError:
            logger.warning("remote cache entry %s lacks %s (a blob is missing): rebuilding it", what, dest.name)
            return False
        except Exception as exc:  # noqa: BLE001
            self._warn(f"cannot download {what} {dest.name} ({exc.__class__.__name__}: {exc}); building it here")
            return None
        if dest.stat().st_size != size or file_sha256(dest) != digest:
            logger.warning(
                "remote cache entry %s: %s is damaged (size or sha256 differ): rebuilding it", what, dest.name
            )
            self._discard(path)
            return False
        return True

    def _discard(self, path: str) -> None:
        """Delete a damaged remote object (best effort), so that the rebuilt step's upload replaces it."""
        if self.read_only:
            return
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)

    def fetch_many(self, cache: Cache, steps: Iterable[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """{key: local record} of the steps the remote had (downloaded in parallel)."""
        steps = list(steps)
        if not steps:
            return {}
        with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="dhbatch-remote") as pool:
            recs = list(pool.map(lambda s: self.fetch(cache, *s), steps))
        return {key: rec for (_, key), rec in zip(steps, recs, strict=True) if rec is not None}

    # -- upload ---------------------------------------------------------------------------------------------------
    def upload(self, cache: Cache, stage: str, key: str, replace: bool = False) -> None:
        """`push` in the background (the build goes on); `wait_uploads` waits for every upload started."""
        if self.read_only:
            return
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(TRANSFERS, thread_name_prefix="dhbatch-upload")
        self._pending.append(self._uploads.submit(self.push, cache, stage, key, replace))

    def wait_uploads(self) -> None:
        if self._uploads is None:
            return
        wait(self._pending)
        self._pending.clear()
        self._uploads.shutdown()
        self._uploads = None

    def push(self, cache: Cache, stage: str, key: str, replace: bool = False) -> bool:
        """Upload a locally committed step: its blobs, then its record. False when the remote already had it (and
        `replace` is False), or on failure (a warning)."""
        if self.read_only:
            return False
        cache.seal(stage, key)  # a record from before checksums gets its sha256
        rec = cache.record(stage, key)  # checked: every output's size and sha256 (through the digest memo)
        if rec is None or not all(cache.intact(stage, key, name) for name in rec["outputs"]):
            return False
        sums = rec.get("sha256")
        if not isinstance(sums, dict) or set(sums) != set(rec["outputs"]):
            logger.warning("local cache entry %s %s has no checksums: not uploading it", stage, key[:12])
            return False
        record_path = self.record_path(stage, key)
        try:
            if not replace and self.fs.exists(record_path):
                return False
            for name, size in rec["outputs"].items():
                blob = self.blob_path(sums[name])
                if not (self.fs.exists(blob) and self.fs.size(blob) == size):
                    self._put(blob, local=str(cache.output(stage, key, name)))
            remote_rec = {**rec, "uploaded": time.time()}
            self._put_record(record_path, canonical_json(remote_rec).encode("utf-8"))
            with self._lock:
                self.uploaded += 1
            return True
        except Exception as exc:  # noqa: BLE001 - an upload failure never fails the step (unless required: the CLI)
            self._warn(f"cannot upload {stage} {key[:12]} ({exc.__class__.__name__}: {exc})")
            return False

    def _put(self, path: str, *, local: str | None = None, data: bytes | None = None) -> None:
        """Write an object from a local file or from bytes, whole or not at all: S3 PUTs are atomic; on a file system
        it is written under a temporary name, then renamed."""

        def write(target: str) -> None:
            if local is not None:
                self.fs.put_file(local, target)
            else:
                self.fs.pipe_file(target, data)

        if not self._local:
            write(path)
            return
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            write(tmp)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def _put_record(self, path: str, data: bytes) -> None:
        """The record goes last: once it is there, every blob it names is complete."""
        self._put(path, data=data)

    # -- listing and pruning ----------------------------------------------------------------------------------------
    def records(self, read: bool = True) -> dict[str, tuple[str, str, dict[str, Any] | None]]:
        """{key: (stage, record path, record or None if unreadable or not `read`)} of every step in the remote."""
        try:
            paths = [p for p in self.fs.find(f"{self.root}/steps") if p.endswith(".json")]
            raw = self.fs.cat(paths, on_error="return") if paths and read else {}
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from exc
        out = {}
        for path in paths:
            stage, key = path.rsplit("/", 3)[-3], path.rsplit("/", 1)[-1].removesuffix(".json")
            data = raw.get(path) if isinstance(raw, dict) else None
            try:
                rec = json.loads(data) if isinstance(data, bytes) else None
            except ValueError:
                rec = None
            out[key] = (stage, path, rec if isinstance(rec, dict) else None)
        return out

    def garbage(
        self, keep: set[str], older_than_s: float | None = None, now: float | None = None
    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, int]]]:
        """What `gc` would delete: the records not in `keep` (with `older_than_s`: only those uploaded longer ago),
        as (stage, key, path), and then the blobs no remaining record names, as (path, size). Blobs younger than
        UPLOAD_GRACE_S are left alone: their record may be on its way."""
        now = time.time() if now is None else now
        records = self.records()
        doomed, referenced = [], set()
        for key, (stage, path, rec) in sorted(records.items()):
            uploaded = rec.get("uploaded", 0) if rec else 0
            old_enough = older_than_s is None or now - float(uploaded or 0) > older_than_s
            if (key not in keep and old_enough) or rec is None:
                doomed.append((stage, key, path))
            else:
                referenced |= set((rec.get("sha256") or {}).values())
        blobs = []
        try:
            found = self.fs.find(f"{self.root}/blobs", detail=True)
        except FileNotFoundError:
            found = {}
        for path, info in sorted(found.items()):
            name = path.rsplit("/", 1)[-1]
            if name in referenced:
                continue
            mtime = _mtime(info)
            if mtime is not None and now - mtime < UPLOAD_GRACE_S:
                continue
            blobs.append((path, int(info.get("size") or 0)))
        return doomed, blobs

    def delete(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)


def _mtime(info: Mapping[str, Any]) -> float | None:
    """An object's modification time from fsspec's info (S3: LastModified; file systems: mtime)."""
    value = info.get("LastModified", info.get("mtime", info.get("created")))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)
