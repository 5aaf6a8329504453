"""One writer per cache: an exclusive ``flock`` held for the whole of an extraction.

Two writers on one cache lose data (a resume clears the shards the other is writing), so
``extract`` holds :func:`writer_lock` from before it looks at the cache until it ends.

The lock is taken on a sibling of the cache folder, ``<parent>/.<name>.invcache-lock``, not on
a file inside it: the folder may not exist yet, and ``--overwrite`` or a creation cut short
deletes and recreates it, which would take a lock inside along with it.

Only the ``flock`` state counts. The kernel drops it when its holder exits, however it exits
(SIGKILL included), so a lock file left behind never blocks a later run; its content (pid,
host, start time, command) is only there to name the holder in the refusal. The holder
deletes the file when it lets go. ``flock`` works on local filesystems and, on Linux, on NFS;
stores given by URL (``s3://…``) cannot be locked and are not: one writer per such cache is
the user's to ensure. Readers (``info``, ``verify``, training) never take the lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invcache.errors import UsageError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".invcache-lock"


def lock_path(location: str | os.PathLike) -> Path:
    """The lock file of the cache at ``location`` (a local path): ``<parent>/.<name>.invcache-lock``.

    Symlinks are resolved, so every spelling of one folder shares one lock.
    """
    path = Path(location).resolve()
    if not path.name:
        raise UsageError(f"{path} is the filesystem root: a cache needs a folder of its own")
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


@contextmanager
def writer_lock(location: str | os.PathLike) -> Iterator[None]:
    """Hold the cache at ``location`` for one writer during the block, else raise a one-line UsageError.

    The refusal names the holder (pid, host, start time, command). A URL (``"://"`` in it) is
    not locked.
    """
    location = os.fspath(location)
    if "://" in location:
        log.info(f"{location} is not a local path: it is not locked against a second writer")
        yield
        return
    path = lock_path(location)
    fd = _acquire(path, location)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        # Delete while still holding it (see _acquire), then unlock explicitly: a forked child
        # (a DataLoader worker) sharing the descriptor would otherwise keep the lock after close.
        if _still_at(fd, path):
            path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(path: Path, location: str) -> int:
    """A descriptor of ``path`` holding its exclusive flock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _about_the_lock_file(exc, location) from exc
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _about_the_lock_file(exc, location) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{location} is being written by another process ({_describe(path)}); "
                             "wait for it to finish or choose another --out") from None
        # A holder deletes the file before it unlocks, so the lock just won may be on a file no
        # longer at ``path`` while a third process locks the new one: only a lock on the file
        # that is still there counts.
        if _still_at(fd, path):
            return fd
        os.close(fd)


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` (not one deleted or replaced since)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)


def _about_the_lock_file(exc: OSError, location: str) -> OSError:
    """The same OS error, saying that it is the cache's lock file that could not be made there."""
    return OSError(exc.errno, f"{exc.strerror} (making the lock file of the cache {location})", exc.filename)


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv),
    }


def _describe(path: Path) -> str:
    """The holder as one line, from what it wrote into the lock file (it may not have written it yet)."""
    try:
        holder = json.loads(path.read_text())
        text = f"pid {holder['pid']} on {holder['host']} since {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its name yet"
    return " ".join(text.split())  # one line, whatever the command's arguments hold
