"""Content-addressed step cache under build/cache/: atomic entries, a record written last, a lock per key.

Layout: steps/<stage>/<key[:2]>/<key>/ holds a step's outputs and `step.json`; failed/<stage>/<key[:2]>/<key>/ what
a failed step made for people to look at (never an input, never a hit). An entry is a hit only when its record
parses, names its key, and every listed output exists with the recorded size and sha256: a half-written, corrupt or
damaged entry is a warning and a miss, never a hit. Digests are checked against a memo on (inode, size, mtime_ns), so
a file rewritten in place is read again while an untouched one costs a stat; `deep` reads every byte (bit rot keeps
the size and mtime).

Records made before checksums existed (no "sha256") are trusted by size once: a build computes their digests when it
first uses them and writes them into the record (`seal`), so upgrading does not rebuild a cache that may hold hours
of GPU work; an entry damaged before that cannot be told apart, as before.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from batch.hashing import FileHasher, canonical_json, file_sha256
from batch.locking import lock_file

logger = logging.getLogger(__name__)

RECORD = "step.json"
#: How the digest memo marks a record found sound (`Cache.is_cached`), followed by its outputs' name=sha256.
_SOUND = "sound:"


class Cache:
    """`deep`: check every output's bytes against its recorded sha256, whatever the memo says (`plan --verify`)."""

    def __init__(self, root: Path, *, deep: bool = False) -> None:
        self.root = root
        self.steps = root / "steps"
        self.failed = root / "failed"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        self.hasher = FileHasher(root / "hashes.json")
        self.deep = deep
        self._hits: dict[str, dict[str, Any]] = {}
        self._unchanged_keys: set[str] = set()  # hits by the memo (`is_cached`), their records not read
        #: Why an entry that exists is not a hit (key -> reason), for the plan's decisions.
        self.damaged: dict[str, str] = {}

    @contextlib.contextmanager
    def in_use(self, exclusive: bool = False) -> Iterator[bool]:
        """A build holds the cache shared for its whole run; `gc` asks for it alone (exclusive) and without waiting:
        yields False when a build holds it. The OS releases a killed process's hold (flock)."""
        import fcntl

        path = self.root / "users.lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # shared by every user of the cache
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)  # a read-only cache: flock works on a read-only descriptor too
            except OSError as exc:  # nothing to lock (a read-only cache without the file): nothing gc could delete
                logger.info("cannot open %s (%s); running without the cache's build/gc lock", path, exc)
                yield True
                return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
            except BlockingIOError:
                yield False
                return
            except OSError as exc:  # a file system without locks (NFS mounted nolock)
                logger.info("cannot lock %s (%s); running without the cache's build/gc lock", path, exc)
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def entry(self, stage: str, key: str) -> Path:
        return Path(f"{self.steps}/{stage}/{key[:2]}/{key}")  # one Path, not four joins: planning asks 10,000s

    def failed_entry(self, stage: str, key: str) -> Path:
        return self.failed / stage / key[:2] / key

    def keep_failed(self, stage: str, key: str, artifact: Path) -> Path:
        """Move what a failed step made (the portrait that failed the face check) to the step's failed/ folder,
        replacing what an earlier failure of the same step left there. Returns its new path."""
        dest = self.failed_entry(stage, key) / artifact.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(artifact, dest)
        return dest

    def output(self, stage: str, key: str, name: str) -> Path:
        return Path(f"{self.steps}/{stage}/{key[:2]}/{key}/{name}")

    def record(self, stage: str, key: str) -> dict[str, Any] | None:
        """The step's record if the entry is complete and sound, else None (corrupt or damaged entries warn)."""
        if key in self._hits:
            return self._hits[key]
        folder = self.entry(stage, key)
        try:
            raw = (folder / RECORD).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._miss(key, folder, f"record unreadable ({exc.strerror or exc})")
        try:
            rec = json.loads(raw)
            outputs, sums = rec["outputs"], rec.get("sha256")
            if rec["key"] != key:
                return self._miss(key, folder, f"its record names another key, {rec['key']}")
            for name, size in outputs.items():
                try:
                    found = (folder / name).stat().st_size
                except FileNotFoundError:
                    return self._miss(key, folder, f"{name} is missing")
                if found != size:
                    return self._miss(key, folder, f"{name} has {found} bytes, its record says {size}")
            for name in outputs if sums is not None else ():
                if self._digest(stage, key, name) != sums[name]:
                    return self._miss(key, folder, f"{name} does not match its sha256 (damaged)")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            return self._miss(key, folder, f"record corrupt ({exc.__class__.__name__})")
        self._hits[key] = rec
        self.damaged.pop(key, None)
        return rec

    def _miss(self, key: str, folder: Path, why: str) -> None:  # returns None: a miss
        if self.damaged.get(key) != why:  # once per entry, however many videos share it
            logger.warning("cache entry %s: %s: rebuilding it", folder, why)
        self.damaged[key] = why
        return None

    def _digest(self, stage: str, key: str, name: str) -> str:
        path = self.output(stage, key, name)
        return self.hasher.digest(path, name=path.relative_to(self.root).as_posix(), fresh=self.deep)

    def intact(self, stage: str, key: str, name: str) -> bool:
        """Whether a hit's output still holds the bytes its record names (checked again just before it is used as
        an input or published: cheap, through the digest memo)."""
        rec = self.record(stage, key)
        if rec is None:
            return False
        sums = rec.get("sha256")
        if sums is None or name not in rec["outputs"]:  # from before checksums; an optional output not made
            return True
        try:
            return self._digest(stage, key, name) == sums[name]
        except (OSError, KeyError, TypeError):
            return False

    def seal(self, stage: str, key: str) -> None:
        """Give a record made before checksums existed the sha256 of its outputs (trusted once, by size)."""
        rec = self.record(stage, key)
        if rec is None or "sha256" in rec:
            return
        try:
            sums = {name: self._digest(stage, key, name) for name in rec["outputs"]}
            rec = {**rec, "sha256": sums}
            write_atomic(self.entry(stage, key) / RECORD, canonical_json(rec).encode("utf-8"), self.tmp)
        except OSError as exc:  # a read-only cache: trusted by size again next time
            logger.info("cannot record checksums in %s (%s)", self.entry(stage, key), exc)
            return
        self._hits[key] = rec

    def is_cached(self, stage: str, key: str) -> bool:
        """Whether the entry is a hit. Planning asks this of every step: an entry found sound before whose record
        and outputs are unchanged since (the digest memo's inode, size and mtime) is a hit without reading its
        record again, the same trust `record` puts in the memo for the outputs' bytes."""
        if key in self._hits or key in self._unchanged_keys:
            return True
        if not self.deep and self._unchanged(stage, key):
            self._unchanged_keys.add(key)
            return True
        rec = self.record(stage, key)
        if rec is not None and isinstance(rec.get("sha256"), dict) and not self.deep:
            self._note_sound(stage, key, rec["sha256"])
        return rec is not None

    def _unchanged(self, stage: str, key: str) -> bool:
        folder = f"steps/{stage}/{key[:2]}/{key}/"
        memo = self.hasher.memo
        sound = memo.get(folder + RECORD)
        try:
            if sound is None or not sound[3].startswith(_SOUND):
                return False
            root = f"{self.root}/{folder}"
            st = os.stat(root + RECORD)
            if sound[0] != st.st_ino or sound[1] != st.st_size or sound[2] != st.st_mtime_ns:
                return False
            for part in sound[3][len(_SOUND) :].split(";"):
                name, _, digest = part.partition("=")
                seen = memo.get(folder + name)
                st = os.stat(root + name)
                if seen is None or seen[3] != digest or seen[:3] != [st.st_ino, st.st_size, st.st_mtime_ns]:
                    return False
        except (OSError, TypeError, ValueError, AttributeError, IndexError):
            return False
        return True

    def _note_sound(self, stage: str, key: str, sums: Mapping[str, str]) -> None:
        """Remember that this record, as it is on disk now, was found sound with these output digests."""
        path = self.entry(stage, key) / RECORD
        with contextlib.suppress(OSError):
            marker = _SOUND + ";".join(f"{name}={digest}" for name, digest in sorted(sums.items()))
            self.hasher.remember(path, marker, name=path.relative_to(self.root).as_posix())

    def forget(self, key: str) -> None:
        self._hits.pop(key, None)
        self._unchanged_keys.discard(key)

    # -- writing --------------------------------------------------------------------------------------------------
    def new_tmp(self, key: str) -> Path:
        """An empty private folder for a step to write into (named with our pid, so stale ones can be swept)."""
        folder = self.tmp / f"{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{_HOST}"
        folder.mkdir(parents=True)
        return folder

    def commit(
        self,
        stage: str,
        key: str,
        tmp: Path,
        outputs: tuple[str, ...],
        optional: tuple[str, ...],
        record: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Move a finished tmp folder into place, then write the record last (that marks the entry complete). The
        record names every output's size and sha256; the files, their folders and the record reach the disk before
        this returns."""
        names = []
        for name in outputs:
            p = tmp / name
            if not p.is_file() or p.stat().st_size == 0:
                raise FileNotFoundError(f"stage {stage} did not write {name}")
            names.append(name)
        names += [name for name in optional if (tmp / name).is_file()]
        sums = {}
        mode = 0o666 & ~umask()
        for p in tmp.iterdir():
            if p.is_file():  # each file read once: hashed, and synced to disk
                os.chmod(p, mode)  # stages write through mkstemp (0600): the cache is shared, as the umask says
                with open(p, "rb") as fh:
                    if p.name in names:
                        sums[p.name] = file_sha256(fh)
                    os.fsync(fh.fileno())
        sizes = {name: (tmp / name).stat().st_size for name in names}
        final = self.entry(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale, incomplete or damaged entry (no valid record): replace it
            stale = self.tmp / f"stale-{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{_HOST}"  # swept if we die
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for name, digest in sums.items():
            path = final / name
            self.hasher.remember(path, digest, name=path.relative_to(self.root).as_posix())
        rec = {**record, "key": key, "stage": stage, "outputs": sizes, "sha256": sums}
        write_atomic(final / RECORD, canonical_json(rec).encode("utf-8"), self.tmp)
        self._note_sound(stage, key, sums)  # so the next plan trusts it without reading it, and writes no memo
        self._hits[key] = rec
        self.damaged.pop(key, None)
        return rec

    @contextlib.contextmanager
    def locked(self, keys: list[str]) -> Iterator[None]:
        """Hold the lock of every key (sorted, so two processes never deadlock). The OS drops a dead process's
        locks (flock), so a killed run never blocks the next one; each lock file goes when its lock is released."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.callback(lock_file(self.locks / f"{key}.lock").release)
            yield

    def try_lock(self, keys: list[str]) -> contextlib.ExitStack | None:
        """The locks of every key without waiting, held until the returned stack is closed; None (holding nothing)
        when another process holds one of them. A driver that keeps several chunks in flight takes its locks this
        way, so two builds never wait on each other's locks while holding their own."""
        self.locks.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        try:
            for key in sorted(set(keys)):
                held = lock_file(self.locks / f"{key}.lock", wait=False)
                if held is None:
                    stack.close()
                    return None
                stack.callback(held.release)
        except BaseException:
            stack.close()
            raise
        return stack

    def sweep_tmp(self) -> int:
        """Remove the temporary folders and files (and those in the cache's own folder: the hash memo's) left by
        processes that no longer run."""
        removed = sweep_stale_tmp(self.root) + sweep_stale_tmp(self.tmp)
        if not self.tmp.is_dir():
            return removed
        for folder in self.tmp.iterdir():
            if not folder.is_dir():
                continue
            parts = folder.name.split(".", 3)
            pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
            if _abandoned(folder, pid, parts[3] if len(parts) == 4 else _HOST):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def entries(self, failed: bool = False) -> Iterator[tuple[str, str, Path]]:
        """Every (stage, key, folder) in the cache (with `failed`, in failed/)."""
        base = self.failed if failed else self.steps
        if not base.is_dir():
            return
        for stage_dir in sorted(base.iterdir()):
            for shard in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                for folder in sorted(p for p in shard.iterdir() if p.is_dir()):
                    yield stage_dir.name, folder.name, folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_sibling(path: Path, folder: Path | None = None) -> Path:
    """A temporary name for writing `path` atomically (in `folder`, default beside it: one file system for the
    os.replace). It names this process and host, so that the next run can sweep what a killed one left
    (`sweep_stale_tmp`)."""
    return (folder or path.parent) / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.{_HOST}.tmp"


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Temp file in the same folder (or `tmp_dir`, on the same file system), fsync, os.replace, fsync the folder:
    readers see the old file or the new one, never half, and the new one survives a power cut once this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path, tmp_dir)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_if_changed(path: Path, data: bytes) -> bool:
    """`write_atomic` unless the file already holds `data` (a build with nothing new writes nothing: it works in a
    read-only build folder). Returns whether it wrote."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(path, data)
    return True


@functools.lru_cache(maxsize=1)
def umask() -> int:
    """This process's umask (read without changing it where Linux says it; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (as databases do: the file's data, then its folder's entry). A file system
    that cannot sync a folder (some network ones) is left to its own guarantees."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_stale_tmp(folder: Path) -> int:
    """Remove the temporary files (`tmp_sibling`: `.NAME.PID.ID.HOST.tmp`) that runs killed mid-write left in
    `folder`: those of this host's processes that no longer run, and another host's after an hour untouched."""
    removed = 0
    for path in folder.glob(".*.tmp*") if folder.is_dir() else ():
        match = _TMP_NAME.match(path.name)
        if match and path.is_file() and _abandoned(path, int(match[1]), match[2]):
            with contextlib.suppress(OSError):  # a read-only folder: nothing of ours can be there
                path.unlink()
                removed += 1
    return removed


def _abandoned(path: Path, pid: int | None, host: str | None) -> bool:
    """Whether a temporary file or folder was left by a run that no longer runs: this host's dead run at once; a run
    of another (or an unknown) host, whose PID cannot be checked here (a cache shared over NFS), after an hour
    untouched."""
    if pid == os.getpid() or (pid is not None and _alive(pid)):
        return False
    if host == _HOST:
        return True
    try:
        return path.stat().st_mtime < time.time() - 3600
    except OSError:
        return False


#: This machine's name, in temporary folder names (`Cache.sweep_tmp`).
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"

#: `tmp_sibling`'s names; those without a host (written before hosts were named) wait an hour.
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{6}(?:\.([A-Za-z0-9_-]+))?\.tmp(?:\.png)?$")


def publish(src: Path, dest: Path) -> None:
    """Place a finished output at its public path atomically (a copy: editing it can never touch the cache). An
    identical file already there is left alone, so a build with nothing new keeps every output's modification time
    (a sync step after the build uploads only what changed)."""
    try:
        same = not dest.is_symlink() and dest.is_file() and dest.stat().st_size == src.stat().st_size
        if same and filecmp.cmp(src, dest, shallow=False):
            return
    except OSError:
        pass  # unreadable: replace it
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
