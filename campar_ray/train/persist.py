"""Copying a worker's checkpoint into the run directory without leaving half of one.

Ray Train V2 persists a reported checkpoint in the worker, inside ``ray.train.report``: it
copies the local folder into ``<storage>/<run>/checkpoint_<time>`` with ``pyarrow.fs.copy_files``
(``StorageContext.persist_current_checkpoint``), and only then does its controller register
it, rewriting ``checkpoint_manager_snapshot.json`` in place. On a full disk the copy fails
part-way and leaves a half-written folder behind; were the copy to succeed with too little
room left, the snapshot's rewrite (truncate, then write) could fail instead and lose the
record of every checkpoint, so that none could be resumed.

:func:`persist_checkpoint` is the worker's ``checkpoint_upload_fn``: on a local disk it first
checks that the checkpoint fits with :data:`ROOM_MARGIN` to spare, then lets Ray copy it,
deleting the folder if the copy fails anyway (another process filled the disk meanwhile).
Either way a local disk's failure raises :class:`~campar_ray.storage.WriteError`, a
``ValueError``: the worker treats it as an error a restart would meet again
(:func:`~campar_ray.train.worker.recurs`), so the run ends at once with that one line, with
the previous checkpoint still the latest registered one, the one a re-run resumes from. On
an object store the half-written folder is deleted too, but the error stays Ray's own: a
lost connection may pass, so Ray Train restarts the group (``train.max_failures``) as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray.train

from campar_ray import storage

ROOM_MARGIN = 8 * 1024 * 1024
"""Bytes a local disk must keep free beyond the checkpoint: room for the snapshot Ray
rewrites after registering it (a few KB a checkpoint) and the epoch's other small files."""


def persist_checkpoint(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's ``checkpoint_upload_fn``: persist ``checkpoint`` as folder ``name`` of the
    run's storage (see the module docstring), or raise a one-line ``WriteError``."""
    return persist_into(ray.train.get_context().get_storage(), checkpoint, name)


def persist_into(context: Any, checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """:func:`persist_checkpoint` into Ray's ``StorageContext`` ``context``."""
    filesystem = context.storage_filesystem
    target = context.build_checkpoint_path_from_name(name)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    if local:
        _check_room(target, _size(checkpoint.path))
    try:
        return context.persist_current_checkpoint(checkpoint, name)
    except (OSError, pa.ArrowException) as error:
        with contextlib.suppress(OSError, pa.ArrowException):
            filesystem.delete_dir(target)
        if not local:  # an object store's error may pass (the network): Ray Train retries
            raise
        raise storage.WriteError(
            f"cannot write checkpoint {target}: {storage.cause(error)}"
        ) from None


def _check_room(target: str, size: int) -> None:
    """Refuse a checkpoint of ``size`` bytes that the disk holding ``target`` has no room for."""
    free = shutil.disk_usage(os.path.dirname(target)).free
    if free < size + ROOM_MARGIN:
        raise storage.WriteError(
            f"cannot write checkpoint {target}: {free / 2**20:.1f} MB free on its disk, "
            f"{(size + ROOM_MARGIN) / 2**20:.1f} MB needed: {storage.FREE_SPACE}"
        )


def _size(folder: str) -> int:
    """Bytes of the files under a local ``folder`` (a worker's checkpoint before its copy)."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )
