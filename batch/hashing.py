"""Content hashes: canonical-JSON step keys and file digests memoised on (inode, size, mtime_ns)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

#: Version of the key derivation itself; bump it when the fingerprint layout changes.
KEY_FORMAT = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def step_key(stage: str, fingerprint: dict[str, Any]) -> str:
    """sha256 over canonical JSON of the key format, the stage name and its fingerprint."""
    payload = {"format": KEY_FORMAT, "stage": stage, **fingerprint}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(file: Path | BinaryIO) -> str:
    """sha256 of a file's bytes (a path, or a file open for binary reading)."""
    if not isinstance(file, Path):
        return hashlib.file_digest(file, "sha256").hexdigest()
    with file.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class FileHasher:
    """sha256 of files, each read once: digests are remembered by (inode, size, mtime_ns) in a JSON memo."""

    def __init__(self, memo_path: Path | None) -> None:
        self.memo_path = memo_path
        self._lock = threading.Lock()
        self._dirty = False
        self._memo: dict[str, list] = {}
        if memo_path is not None and memo_path.is_file():
            try:
                loaded = json.loads(memo_path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self._memo = loaded
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable hash memo %s (%s)", memo_path, exc)

    def digest(self, path: Path, *, name: str | None = None, fresh: bool = False) -> str:
        """The file's sha256. `name`: its key in the memo (default: the resolved path; the cache uses paths relative
        to itself, so a moved cache keeps its memo). `fresh`: read the bytes even if the memo knows the file (a
        deep check: bit rot leaves size and mtime alone)."""
        st = path.stat()
        ident = [st.st_ino, st.st_size, st.st_mtime_ns]
        name = name if name is not None else str(path.resolve())
        with self._lock:
            hit = self._memo.get(name)
            if not fresh and hit is not None and hit[:3] == ident:
                return hit[3]
        digest = file_sha256(path)
        self.remember(path, digest, name=name, stat=st)
        return digest

    @property
    def memo(self) -> dict[str, list]:
        """The memo itself (name -> [inode, size, mtime_ns, digest]), for lookups in bulk; read-only by contract."""
        return self._memo

    def remember(self, path: Path, digest: str, *, name: str | None = None, stat: os.stat_result | None = None) -> None:
        """Note a digest computed elsewhere (the cache hashes each output as it commits it)."""
        st = stat or path.stat()
        with self._lock:
            self._memo[name if name is not None else str(path.resolve())] = [
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                digest,
            ]
            self._dirty = True

    def folder_digest(self, folder: Path, patterns: tuple[str, ...] = ("*",)) -> str:
        """One digest for a folder of weights: names and digests of its files, recursively."""
        files = sorted({p for pat in patterns for p in folder.rglob(pat) if p.is_file()})
        parts = [[str(p.relative_to(folder)), self.digest(p)] for p in files]
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest()

    def forget_missing(self, base: Path) -> int:
        """Drop the entries whose file is gone (names relative to `base`, or absolute): `gc` deletes outputs, and a
        memo that only grew would remember every file the cache ever held. Returns how many were dropped."""
        with self._lock:
            gone = [name for name in self._memo if not (base / name).exists()]
            for name in gone:
                del self._memo[name]
            self._dirty |= bool(gone)
        return len(gone)

    def save(self) -> None:
        """Write the memo atomically (a lost race just costs a re-hash later)."""
        if self.memo_path is None or not self._dirty:
            return
        from batch.cache import write_atomic  # the cache builds on this module

        with self._lock:
            data = canonical_json(self._memo).encode("utf-8")
        try:
            write_atomic(self.memo_path, data)
        except OSError as exc:  # a memo only: `plan` works in a read-only build folder, hashing again next time
            logger.info("cannot save the hash memo %s (%s); files will be hashed again", self.memo_path, exc)
            return
        self._dirty = False
