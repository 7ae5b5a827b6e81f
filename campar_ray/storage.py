"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``).

Everything the pipeline reads or writes goes through these helpers, so a run directory on a
laptop and one in a bucket take the same code path. ``pyarrow.fs`` resolves the filesystem;
credentials come the standard way (environment, profile) and ``AWS_ENDPOINT_URL`` selects an
S3-compatible store.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs


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
