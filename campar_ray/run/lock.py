"""One writer per run directory: the lock ``train``, ``fit-cfar``, ``tune`` and ``bundle`` hold.

Two ``campar train`` processes on one run directory used to both finish, each registering
its own checkpoints and reporting a different best one. :func:`run_lock` takes an exclusive
``flock`` on the run's :data:`~.layout.LOCK_FILE` (local disks, and NFS, where Linux maps
``flock`` onto the server's locks) and writes who holds it there, so a second command stops at
once with one line naming the holder. The lock goes with the process: a killed command leaves
no stale lock, and a finished one leaves the run directory as it found it (the file is
removed, and so is a run directory the lock itself had to create).

Object stores offer no lock pyarrow can take: on a URI run directory the rule stands
unenforced (documented in the README): one command writes a run at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from campar_ray import storage
from campar_ray.run.layout import RunDir


class RunLockedError(ValueError):
    """Another command writes this run directory; the message names it."""


@contextlib.contextmanager
def run_lock(run_dir: str, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock as ``campar <command>`` for the ``with`` block, or raise
    :class:`RunLockedError` naming the command that holds it."""
    if storage.is_uri(run_dir):
        yield
        return
    folder = os.path.abspath(run_dir.removeprefix("file://"))
    created = not os.path.isdir(folder)
    path = RunDir(folder).lock
    try:
        os.makedirs(folder, exist_ok=True)
        untouched = os.stat(folder).st_mtime_ns
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        locked = os.stat(folder).st_mtime_ns
    except OSError:  # a folder this process cannot write: no writer of ours is there either,
        yield  # and a command that writes says why it cannot, in its own words
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(_held(run_dir, path)) from None
        if os.fstat(descriptor).st_ino != _inode(path):  # removed by its last holder meanwhile
            raise RunLockedError(_held(run_dir, path))
        holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())
        try:
            yield
        finally:
            _release(path, folder, untouched, locked)
            if created:
                with contextlib.suppress(OSError):  # not empty: the command wrote the run
                    os.rmdir(folder)
    finally:
        os.close(descriptor)


def _release(path: str, folder: str, untouched: int, locked: int) -> None:
    """Remove the lock file; when nothing else changed in the run directory's top folder
    meanwhile (a refused command), give that folder back its modification time too, so the
    command leaves the run directory exactly as it found it."""
    unchanged = os.stat(folder).st_mtime_ns == locked
    os.remove(path)
    if unchanged:
        os.utime(folder, ns=(os.stat(folder).st_atime_ns, untouched))


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _held(run_dir: str, path: str) -> str:
    """The refusal: who holds the lock (as its file says) and what to do."""
    try:
        with open(path) as file:
            holder = json.loads(file.read(4096))
        who = (
            f"`campar {holder['command']}` (pid {holder['pid']} on {holder['host']}, since "
            f"{holder['since']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        who = "another campar command"
    return (
        f"{run_dir} is being written by {who}; one command writes a run directory at a "
        f"time: wait for it to finish (or stop it), then re-run (lock: {path})"
    )
