"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``).

Everything the pipeline reads or writes goes through these helpers, so a run directory on a
laptop and one in a bucket take the same code path. ``pyarrow.fs`` resolves the filesystem;
credentials come the standard way (environment, profile) and ``AWS_ENDPOINT_URL`` selects an
S3-compatible store.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A path the pipeline cannot write to; the one-line message names the path and the cause."""


class WriteError(StorageError, OSError):
    """A write that failed part-way (a full disk, a lost mount); what it had written is gone.
    Still an ``OSError`` for callers that fall back elsewhere on one."""


FREE_SPACE = "free some space, or write elsewhere, and re-run"
FULL = f"no space left on the device (or over quota): {FREE_SPACE}"
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
    (("No space left on device", "Disk quota exceeded", "File too large"), FULL),
    (("Not a directory",), "a parent of the path is a file, not a folder"),
)


CREDENTIALS_HINT = (
    "name the bucket alone (s3://bucket/path) and give credentials the standard way: "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or GOOGLE_APPLICATION_CREDENTIALS"
)
OPTIONS_HINT = (
    "name the object alone (s3://bucket/path) and choose an S3-compatible store with "
    "AWS_ENDPOINT_URL"
)
_BUCKET_SCHEMES = ("s3", "gs", "gcs")
"""Object stores whose authority is a bucket name, which never has a port."""


def has_credentials(uri: str) -> bool:
    """True when ``uri`` carries user info (``scheme://user:secret@host/...``).

    Such a URI ends up in ``config.yaml``, logs and error lines, so it is refused wherever one
    comes in, without repeating it. A secret holding ``/`` (common in AWS keys) ends the
    authority early (``s3://KEY:SE/CRET@bucket`` parses as host ``KEY``, port ``SE``), so a
    port that is no number, or any port on a bucket, counts as user info too.
    """
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return False
    if "@" in parts.netloc:
        return True
    try:
        port = parts.port
    except ValueError:
        return True
    return port is not None and parts.scheme.lower() in _BUCKET_SCHEMES


def has_options(path: str) -> bool:
    """True for a URI with a query (``s3://bucket/key?endpoint_override=host:port``).

    pyarrow reads a URI's query as filesystem options: ``endpoint_override`` and ``scheme``
    would send the request, signed with the user's credentials, to whatever host the URI
    names. Such a URI is refused wherever one comes in (a manifest row, ``run.dir``, a
    checkpoint's config); the endpoint comes from ``AWS_ENDPOINT_URL`` instead.
    """
    return (is_uri(path) or path.startswith("file://")) and "?" in path


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def is_shared(path: str, mounts: Sequence[str] = ()) -> bool:
    """True when every node of a cluster reads ``path`` as this machine does: an object-store
    URI, or a local path (relative ones resolved here, on the driver) under one of ``mounts``,
    the folders mounted at the same path on every node."""
    if is_uri(path):
        return True
    local = os.path.abspath(path.removeprefix("file://"))
    for mount in mounts:
        mount = os.path.normpath(mount)
        if local == mount or local.startswith(mount.rstrip(os.sep) + os.sep):
            return True
    return False


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and the OS separator for local paths."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path or URI.

    Every read and write goes through here, so a URI with credentials in it is refused here
    whichever flag, manifest row or config key it came from.
    """
    if has_credentials(path):
        raise StorageError(f"a storage URI must not carry credentials; {CREDENTIALS_HINT}")
    if has_options(path):
        raise StorageError(f"a storage URI must not carry options ('?...'); {OPTIONS_HINT}")
    if is_uri(path) or path.startswith("file://"):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str) -> bool:
    filesystem, inner = resolve(path)
    return filesystem.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    """The whole file; a plain ``open`` for local paths (the decoder reads one image per call,
    where pyarrow's filesystem and ``Path.resolve`` cost as much as a small PNG's decode)."""
    if not is_uri(path) and not path.startswith("file://"):
        with open(path, "rb") as file:
            return file.read()
    filesystem, inner = resolve(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def write_json(path: str, payload: Any) -> None:
    """Write a JSON document (indented, values JSON cannot hold written as text) with
    :func:`write_bytes`."""
    write_bytes(path, json.dumps(payload, indent=2, default=str).encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically on local disks (temp file + rename), directly on object stores.

    A write that fails (a full disk) leaves no temporary file behind and raises
    :class:`WriteError` naming ``path`` and the cause.
    """
    filesystem, inner = resolve(path)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    local = isinstance(filesystem, pafs.LocalFileSystem)
    try:
        filesystem.create_dir(posixpath.dirname(inner), recursive=True)
        with filesystem.open_output_stream(tmp if local else inner) as stream:
            stream.write(data)
        if local:
            filesystem.move(tmp, inner)
    except (OSError, pa.ArrowException) as error:
        if local and os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f"cannot write {path}: {cause(error)}") from None


@contextlib.contextmanager
def staged(out: str) -> Iterator[str]:
    """A folder to write ``out``'s files into, so that a failure leaves no partial ``out``.

    On a local disk the files go to a sibling folder that replaces ``out``'s files only once
    all are written (and is deleted on any failure); object stores have no rename, so there
    the files are written in place.
    """
    if is_uri(out):
        yield out
        return
    target = os.path.abspath(out.removeprefix("file://"))
    staging = f"{target}.partial-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        for folder, _, files in os.walk(staging):
            destination = os.path.join(target, os.path.relpath(folder, staging))
            os.makedirs(destination, exist_ok=True)
            for name in files:
                os.replace(os.path.join(folder, name), os.path.join(destination, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def makedirs(path: str) -> None:
    filesystem, inner = resolve(path)
    filesystem.create_dir(inner, recursive=True)


def check_writable(path: str, *, create: bool = True) -> None:
    """Fail now, not hours into a run, when ``path`` (a folder or URI prefix) cannot be written.

    Writes and deletes a small probe object under ``path`` (a local folder is created as it
    would be anyway; with ``create=False``, as ``campar doctor`` checks, the probe goes into the
    nearest folder that exists, and nothing is left behind). Raises :class:`StorageError`
    naming the path and the cause: a missing bucket, rejected credentials, denied permission,
    an unreachable store or a read-only disk.
    """
    try:
        filesystem, inner = resolve(path)
        probe = posixpath.join(inner, f".campar-write-probe-{uuid.uuid4().hex}")
        if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders
            if create:
                filesystem.create_dir(inner, recursive=True)
            else:
                inner = _existing_folder(inner)
                probe = posixpath.join(inner, posixpath.basename(probe))
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"probe")
        filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot write to {path}: {cause(error)}") from None


def _existing_folder(path: str) -> str:
    """``path``, or its nearest ancestor that exists (where creating it would start)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def cause(error: Exception) -> str:
    """The actionable reason in a storage error, else its first line."""
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return "read-only file system"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FULL
    message = str(error)
    for needles, cause in _CAUSES:
        if any(needle in message for needle in needles):
            return cause
    return message.splitlines()[0] if message else type(error).__name__
