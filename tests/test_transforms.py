"""The reference augmentation and the pipeline's per-batch functions, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from campar_ray.data.images import decode_image
from campar_ray.data.ray_pipeline import decode_batch
from campar_ray.data.transforms import (
    Shift,
    resize,
    shift_into,
)
from campar_ray.model.inputs import IMAGENET_MEAN, IMAGENET_STD, normalize


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


def _padded_crop(image: np.ndarray, pad: int, top: int, left: int) -> np.ndarray:
    """The reference: ``Pad(pad)`` then the crop whose corner is ``(top, left)``."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return padded[top : top + height, left : left + width]


def test_shift_into_is_pad_then_crop_at_every_offset():
    image, pad = _batch(1)[0], 3
    out = np.full_like(image, 7)
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            shift_into(out, image, top - pad, left - pad)
            assert np.array_equal(out, _padded_crop(image, pad, top, left))


def test_a_shift_applied_as_the_pipeline_does_is_pad_crop_then_flip():
    """Mirroring while decoding, then ``shift_into`` by ``offset()``, gives the reference's
    pad + crop + flip for both values of ``flip``."""
    image, pad = _batch(1, 9, 7)[0], 2
    for shift in Shift.draw(60, pad, np.random.default_rng(4)):
        source = image[:, ::-1] if shift.flip else image
        out = np.zeros_like(image)
        shift_into(out, source, *shift.offset())
        crop = _padded_crop(image, pad, shift.dy + pad, shift.dx + pad)
        assert np.array_equal(out, crop[:, ::-1] if shift.flip else crop)


def test_shift_draws_cover_every_offset_and_flip_about_half():
    shifts = Shift.draw(2000, 2, np.random.default_rng(2))
    assert {(s.dy, s.dx) for s in shifts} == {(y, x) for y in range(-2, 3) for x in range(-2, 3)}
    assert 800 < sum(s.flip for s in shifts) < 1200
    assert Shift.draw(5, 1, np.random.default_rng(9)) == Shift.draw(5, 1, np.random.default_rng(9))


def test_pad_zero_only_flips_and_negative_pad_is_refused():
    assert all((s.dy, s.dx) == (0, 0) for s in Shift.draw(50, 0, np.random.default_rng()))
    with pytest.raises(ValueError, match="pad"):
        Shift.draw(1, -1, np.random.default_rng())


def test_mirroring_before_resizing_equals_mirroring_after(tmp_path):
    """The decoder mirrors the source image before resizing it (cheaper); PIL's bilinear
    filter is symmetric, so the pixels equal mirroring the resized image."""
    for seed, shape in enumerate([(47, 105), (300, 120), (256, 192), (31, 13)]):
        pixels = _batch(1, *shape, seed=seed)[0]
        path = tmp_path / f"{seed}.png"
        Image.fromarray(pixels).save(path)
        data = path.read_bytes()
        plain = decode_image(data, size=(256, 192))
        assert np.array_equal(decode_image(data, size=(256, 192), mirror=True), plain[:, ::-1])
        assert np.array_equal(plain, resize(pixels, (256, 192)))


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
    augmented = decode_batch(batch, root=str(tmp_path), size=(16, 8), pad=2)
    assert augmented["valid"].tolist() == [True, False, False]
    assert np.all(augmented["image"][1:] == 0)
    assert set(np.unique(augmented["image"][0])) <= {0, 200}  # shifted: zero fill at most
    assert np.all(augmented["image"][0][2:-2, 2:-2] == 200)  # a shift of at most 2 pixels
