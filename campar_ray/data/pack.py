"""Packed manifests: the encoded image bytes stored in the manifest itself.

A cluster reading 100,000 small files from an object store spends its time on requests;
reading a few large Parquet files does not. Packing copies each image's encoded bytes (no
re-encoding, so pixels are unchanged) into a ``binary`` column next to ``image``, which keeps
naming the row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from campar_ray.data.images import load_image_bytes
from campar_ray.data.manifest import BINARY_COLUMN


def pack_table(table: pa.Table, root: str, threads: int = 4) -> pa.Table:
    """``table`` with a ``binary`` column holding the bytes of each row's image file.

    ``root`` is the folder relative image paths resolve against. A missing image raises
    ``FileNotFoundError`` naming it.
    """
    images = table.column("image").to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        data = list(pool.map(lambda image: load_image_bytes(image, root), images))
    column = pa.array(data, pa.large_binary())
    if BINARY_COLUMN in table.column_names:
        return table.set_column(table.schema.get_field_index(BINARY_COLUMN), BINARY_COLUMN, column)
    return table.append_column(BINARY_COLUMN, column)
