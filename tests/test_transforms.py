"""The reference augmentation and the pipeline's per-batch functions, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from campar_ray.data.ray_pipeline import augment_batch, decode_batch
from campar_ray.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    normalize,
    pad_random_crop,
    random_hflip,
    resize,
)


def _batch(count: int = 6, height: int = 8, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (count, height, width, 3), dtype=np.uint8)


def test_resize_gives_requested_size_and_keeps_a_flat_colour():
    image = np.full((40, 30, 3), (10, 200, 90), dtype=np.uint8)
    out = resize(image, (16, 12))
    assert out.shape == (16, 12, 3) and out.dtype == np.uint8
    assert np.all(out == (10, 200, 90))


def test_resize_is_deterministic_and_identity_at_target_size():
    image = _batch(1, 33, 17)[0]
    assert np.array_equal(resize(image, (20, 10)), resize(image, (20, 10)))
    assert resize(image, (33, 17)) is image


def test_pad_random_crop_takes_a_window_of_the_zero_padded_image():
    images = _batch()
    pad = 3
    out = pad_random_crop(images, pad, np.random.default_rng(1))
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for image, crop in zip(padded, out, strict=True):
        windows = [
            (top, left)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if np.array_equal(image[top : top + 8, left : left + 5], crop)
        ]
        assert windows, "each crop must be one window of its padded image"


def test_pad_random_crop_offsets_differ_between_images_and_cover_the_range():
    images = np.repeat(_batch(1), 400, axis=0)
    out = pad_random_crop(images, 2, np.random.default_rng(2))
    distinct = {crop.tobytes() for crop in out}
    assert len(distinct) == 25  # every (top, left) offset in 0..4 x 0..4 occurs


def test_pad_zero_is_identity_and_negative_pad_is_refused():
    images = _batch()
    assert pad_random_crop(images, 0, np.random.default_rng()) is images
    with pytest.raises(ValueError, match="pad"):
        pad_random_crop(images, -1, np.random.default_rng())


def test_random_hflip_mirrors_exactly_the_chosen_images():
    images = _batch(200)
    out = random_hflip(images, np.random.default_rng(3))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.all(flipped ^ kept)
    assert 60 < flipped.sum() < 140
    assert np.array_equal(random_hflip(images, np.random.default_rng(), p=1.0), images[:, :, ::-1])


def test_augment_keeps_shape_and_dtype_and_is_seeded():
    images = _batch()
    first = augment(images, pad=2, rng=np.random.default_rng(5))
    again = augment(images, pad=2, rng=np.random.default_rng(5))
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)


def test_normalize_maps_the_imagenet_mean_to_zero_and_scales_by_std():
    mean_pixel = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    images = torch.from_numpy(np.broadcast_to(mean_pixel, (2, 4, 3, 3)).copy())
    x = normalize(images)
    assert x.shape == (2, 3, 4, 3) and x.dtype == torch.float32
    expected = (mean_pixel / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    white = normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    expected_white = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(white[0, :, 1, 1], torch.tensor(expected_white, dtype=torch.float32))


def test_normalize_layouts_hold_the_same_values():
    images = torch.from_numpy(_batch(2))
    plain = normalize(images)
    last = normalize(images, channels_last=True)
    assert plain.is_contiguous()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)
    assert torch.allclose(plain[1, 2, 3, 4], (images[1, 3, 4, 2] / 255 - 0.406) / 0.225)


def test_decode_batch_resizes_good_images_and_flags_corrupt_and_missing_ones(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((30, 14, 3), 200, dtype=np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    batch = {
        "row": np.array([7, 8, 9]),
        "image": np.array(["good.png", "bad.png", "missing.png"], dtype=object),
        "labels": np.array([[1, 0], [0, 1], [1, 1]], dtype=np.int8),
    }
    out = decode_batch(batch, root=str(tmp_path), size=(16, 8))
    assert out["image"].shape == (3, 16, 8, 3) and out["image"].dtype == np.uint8
    assert out["valid"].tolist() == [True, False, False]
    assert np.all(out["image"][0] == 200) and np.all(out["image"][1:] == 0)
    assert out["row"].tolist() == [7, 8, 9] and out["labels"].tolist() == [[1, 0], [0, 1], [1, 1]]
    augmented = augment_batch(out, pad=2)
    assert augmented["image"].shape == out["image"].shape
    assert augmented["valid"] is out["valid"]
