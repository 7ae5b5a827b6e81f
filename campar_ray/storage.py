"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``).

Everything the pipeline reads or writes goes through these helpers, so a run directory on a
laptop and one in a bucket take the same code path. ``pyarrow.fs`` resolves the filesystem;
credentials come the standard way (environment, profile) and ``AWS_ENDPOINT_URL`` selects an
S3-compatible store.
"""

from __future__ import annotations

import errno
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A path the pipeline cannot write to; the one-line message names the path and the cause."""


# Substrings of pyarrow / AWS SDK errors -> the cause a user can act on.
_CAUSES = (
    (("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '"), "the bucket does not exist"),
    (
        (
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "EXPIRED_TOKEN",
            "ExpiredToken",
            "INVALID_CLIENT_TOKEN_ID",
        ),
        "the credentials were rejected (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
        "AWS_PROFILE)",
    ),
    (("ACCESS_DENIED", "AccessDenied", "Permission denied"), "permission denied"),
    (
        ("NETWORK_CONNECTION", "Could not resolve", "Couldn't connect"),
        "the store is unreachable (check AWS_ENDPOINT_URL and the network)",
    ),
    (("Read-only file system",), "read-only file system"),
    (("Not a directory",), "a parent of the path is a file, not a folder"),
)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and the OS separator for local paths."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path or URI."""
    if is_uri(path) or path.startswith("file://"):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str) -> bool:
    filesystem, inner = resolve(path)
    return filesystem.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    filesystem, inner = resolve(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically on local disks (temp file + rename), directly on object stores."""
    filesystem, inner = resolve(path)
    filesystem.create_dir(posixpath.dirname(inner), recursive=True)
    if isinstance(filesystem, pafs.LocalFileSystem):
        tmp = f"{inner}.tmp"
        with filesystem.open_output_stream(tmp) as stream:
            stream.write(data)
        filesystem.move(tmp, inner)
        return
    with filesystem.open_output_stream(inner) as stream:
        stream.write(data)


def makedirs(path: str) -> None:
    filesystem, inner = resolve(path)
    filesystem.create_dir(inner, recursive=True)


def check_writable(path: str) -> None:
    """Fail now, not hours into a run, when ``path`` (a folder or URI prefix) cannot be written.

    Writes and deletes a small probe object under ``path`` (a local folder is created as it
    would be anyway). Raises :class:`StorageError` naming the path and the cause: a missing
    bucket, rejected credentials, denied permission, an unreachable store or a read-only disk.
    """
    try:
        filesystem, inner = resolve(path)
        probe = posixpath.join(inner, f".campar-write-probe-{uuid.uuid4().hex}")
        if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders
            filesystem.create_dir(inner, recursive=True)
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"probe")
        filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot write to {path}: {_cause(error)}") from None


def _cause(error: Exception) -> str:
    """The actionable reason in a storage error, else its first line."""
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return "read-only file system"
    message = str(error)
    for needles, cause in _CAUSES:
        if any(needle in message for needle in needles):
            return cause
    return message.splitlines()[0] if message else type(error).__name__
