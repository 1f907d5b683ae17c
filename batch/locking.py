"""Locks between dhbatch processes: flock(2), which the OS drops when a process dies (a killed run never blocks the
next one).

Lock files are removed when released, safely: the holder unlinks the file while it still holds the lock, and a
process that locked a file after it was unlinked (it had opened the old one) notices that the path no longer leads
to the file it holds and starts again with a fresh one. Two processes therefore never both hold "the" lock.

An output folder (build/<manifest>/) is locked through the folder itself (flock works on a directory's descriptor),
so no file is made for it: a build with nothing to do writes nothing, also in a read-only build folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class Held:
    """A lock held through an open descriptor; `release()` removes its file (if it has one) and lets go."""

    def __init__(self, fd: int, path: Path | None, made: Path | None = None) -> None:
        self.fd = fd
        self.path = path
        self.made = made  # a folder made to be locked: removed on release if still empty

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.path is not None:
                with contextlib.suppress(OSError):  # still held: nobody else can be using this file now
                    if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                        os.unlink(self.path)
            if self.made is not None:
                with contextlib.suppress(OSError):  # not empty: it is in use
                    self.made.rmdir()
        finally:
            os.close(self.fd)  # closing lets go of the lock
            self.fd = -1


def lock_file(path: Path, *, wait: bool = True) -> Held | None:
    """Hold the lock of `path` (made if missing, with the umask's mode); None when `wait` is False and another
    process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return Held(fd, path)
        os.close(fd)  # its holder removed it while we waited: lock the new one


def lock_folder(folder: Path, *, wait: bool = True, waiting_for: str = "") -> Held | None:
    """Hold the lock of a folder (its own descriptor: nothing is written). None when `wait` is False and another
    process holds it; when waiting, `waiting_for` is logged once first. A file system without locks (NFS mounted
    nolock) is logged and the build goes on unlocked, as it did before these locks."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
        if waiting_for:
            logger.warning("waiting for %s", waiting_for)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        logger.info("cannot lock %s (%s); going on without the output folder's lock", folder, exc)
    return Held(fd, None)


@contextlib.contextmanager
def holding(held: Held | None) -> Iterator[Held | None]:
    """Release `held` (if any) when the block ends."""
    try:
        yield held
    finally:
        if held is not None:
            held.release()
