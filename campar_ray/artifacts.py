"""Reading the files a run leaves behind, safely: tensors, arrays and JSON, never pickles.

Checkpoints, bundles and CFAR artefacts travel between machines and buckets, so a file may
be truncated by a failed upload or replaced by someone else. ``torch.load`` runs with
``weights_only=True`` and ``np.load`` with ``allow_pickle=False``: a planted pickle payload
is refused instead of executed. Every failure becomes one :class:`ArtifactError` line that
names the file and says whether it is damaged or not a plain tensor/array file at all.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from campar_ray import storage
from campar_ray.bounded import BoundedError
from campar_ray.bounded import load_json as parse_json


class ArtifactError(ValueError):
    """A run artefact that cannot be loaded safely: corrupt, truncated or tampered with."""


def load_tensors(path: str, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` of ``path`` (file or URI) with weights-only unpickling."""
    data = _read(path)
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ArtifactError(
            f"refusing to load {path}: it holds more than tensors ({_reason(error)}); "
            "weights-only loading never runs code from a file"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ArtifactError(f"{path} is corrupt or truncated: {_reason(error)}") from None


def save_arrays(path: str, **arrays: np.ndarray) -> None:
    """Plain arrays as ``.npz`` (object arrays are refused by the reader, so never write one)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, with pickled (object) arrays refused."""
    data = _read(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ArtifactError(
                f"refusing to load {path}: it holds pickled objects, not plain arrays"
            ) from None
        raise ArtifactError(f"{path} is corrupt or truncated: {_reason(error)}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ArtifactError(f"{path} is corrupt or truncated: {_reason(error)}") from None


def load_json(path: str) -> Any:
    """A JSON artefact (metadata is never pickled)."""
    try:
        return parse_json(_read(path), path)
    except BoundedError as error:
        raise ArtifactError(f"{error}; the file is corrupt or not campar's") from None


def read_regular(path: str) -> bytes:
    """The bytes of ``path`` when it is a regular file reached without a symlink: what a
    copy out of a run directory may take (a bundle's weights, its stage-2 files).

    A run directory may come from someone else: a symlink planted in it (to ``~/.ssh``, a
    file or a folder) would otherwise be copied into a bundle that is then shared. On a
    local disk the file is opened with ``O_NOFOLLOW`` and checked to be regular, and its
    folder must not be a symlink either; object stores have no symlinks.
    """
    if storage.is_uri(path):
        return _read(path)
    local = path.removeprefix("file://")
    folder = os.path.dirname(os.path.abspath(local))
    try:
        if os.path.islink(folder):
            raise ArtifactError(f"{folder} is a symlink; {_REGULAR}")
        descriptor = os.open(local, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except OSError as error:
        if os.path.islink(local):
            raise ArtifactError(f"{path} is a symlink; {_REGULAR}") from None
        raise ArtifactError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ArtifactError(f"{path} is not a regular file; {_REGULAR}")
        return file.read()


_REGULAR = (
    "files are copied out of a run directory only as regular files, never through a "
    "symlink: replace it by the file itself"
)


def copy_files(source: str, target: str, names: Sequence[str]) -> None:
    """Copy the files ``names`` (and nothing else) of the folder ``source`` to ``target``, each
    read with :func:`read_regular`: a copy takes what the run layout names, never a listing."""
    for name in names:
        storage.write_bytes(storage.join(target, name), read_regular(storage.join(source, name)))


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None


def _reason(error: BaseException) -> str:
    """The informative sentence of a loader's message (torch's run to several paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:  # what the weights-only unpickler refused
            return line.rstrip(".")
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__
