"""A procedural pedestrian data set: small, fast, learnable, and shaped like the real ones.

Each synthetic person has fixed attributes and colours; each of their images redraws them with
a new pose, position, scale, background clutter, lighting and noise, so a model must find the
attribute in the body region that carries it instead of memorising pixels. Attributes are
visible (hair, hat, sunglasses, jacket with shirt and tie, sleeves, logo, stripes, trouser
colour, skirt, shorts, shoe colour, backpack, handbag, a carried box) and correlated the way
real ones are: skirts and long hair go with women, suit jackets with formal trousers and
dark shoes, backpacks and logos with casual clothes. Everything derives from the seed, so
the same seed writes the same bytes. The split is person-disjoint.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from campar_ray import storage
from campar_ray.data.manifest import ManifestInfo, manifest_table, write_manifest
from campar_ray.data.split import Ratios, split_by_identity

ATTRIBUTES = (
    "female", "long_hair", "hat", "sunglasses", "upper_formal", "upper_long_sleeve",
    "upper_logo", "upper_stripes", "upper_red", "lower_formal", "lower_jeans", "lower_shorts",
    "lower_skirt", "shoes_white", "backpack", "handbag", "carrying_other",
)  # fmt: skip
EVAL_ATTRIBUTES = tuple(name for name in ATTRIBUTES if name not in ("upper_red", "shoes_white"))
"""Colour attributes are kept but not evaluated, as in PETA's protocol."""

IMAGES_PER_PERSON = (3, 7)
SUPERSAMPLE = 2  # draw at twice the size, then downsample: anti-aliased edges

Colour = tuple[int, int, int]
DARK = ((25, 25, 30), (40, 40, 48), (55, 55, 62), (30, 32, 52))
CASUAL = ((60, 110, 190), (40, 150, 80), (150, 150, 150), (230, 230, 225), (230, 200, 60),
          (120, 70, 160), (240, 140, 40), (90, 180, 200), (20, 20, 20), (150, 110, 70))  # fmt: skip
REDS = ((200, 30, 35), (170, 20, 40), (230, 60, 60))
TROUSERS = ((30, 30, 30), (110, 110, 110), (190, 170, 120), (120, 90, 60), (90, 100, 60))
DENIM = ((70, 100, 160), (55, 85, 140), (95, 125, 180))
SKIN = ((240, 200, 170), (210, 160, 120), (160, 110, 80), (110, 75, 50))
HAIR = ((20, 15, 10), (90, 60, 30), (200, 170, 90), (130, 130, 130))
BRIGHT = ((240, 240, 240), (250, 220, 40), (240, 70, 70), (60, 200, 240), (80, 220, 100))


@dataclass(frozen=True)
class Person:
    """Everything about a synthetic person that stays fixed across their images."""

    labels: dict[str, bool]
    skin: Colour
    hair: Colour
    upper: Colour
    lower: Colour
    accent: Colour
    shoes: Colour
    bag: Colour
    hat: Colour
    box: Colour
    build: float
    """Shoulder width factor: women are drawn slightly narrower."""


def sample_person(rng: np.random.Generator) -> Person:
    """Draw correlated attributes, then colours consistent with them."""

    def p(prob: float) -> bool:
        return bool(rng.random() < prob)

    female = p(0.45)
    formal = p(0.15 if female else 0.3)
    lower_formal = formal and p(0.5 if female else 0.9)
    skirt = female and not lower_formal and p(0.45)
    jeans = not (skirt or lower_formal) and p(0.45)
    shorts = not (skirt or lower_formal or jeans) and p(0.5)
    logo = not formal and p(0.3)
    labels = {
        "female": female,
        "long_hair": p(0.75 if female else 0.07),
        "hat": p(0.08 if formal else 0.25),
        "sunglasses": p(0.2),
        "upper_formal": formal,
        "upper_long_sleeve": formal or p(0.25 if shorts else 0.6),
        "upper_logo": logo,
        "upper_stripes": not formal and not logo and p(0.25),
        "upper_red": not formal and p(0.28 if female else 0.15),
        "lower_formal": lower_formal,
        "lower_jeans": jeans,
        "lower_shorts": shorts,
        "lower_skirt": skirt,
        "shoes_white": p(0.03 if lower_formal else 0.45 if (jeans or shorts) else 0.25),
        "backpack": p(0.04 if formal else 0.35),
        "handbag": p(0.45 if female else 0.12),
        "carrying_other": p(0.15),
    }

    def pick(options: tuple[Colour, ...]) -> Colour:
        return options[int(rng.integers(len(options)))]

    upper = pick(DARK) if formal else pick(REDS) if labels["upper_red"] else pick(CASUAL)
    if lower_formal:
        lower = upper if formal else pick(DARK)
    else:
        lower = pick(DENIM) if jeans else pick(TROUSERS + CASUAL if skirt else TROUSERS)
    return Person(
        labels=labels,
        skin=pick(SKIN),
        hair=pick(HAIR),
        upper=upper,
        lower=lower,
        accent=pick(tuple(c for c in BRIGHT if c != upper)),
        shoes=pick(((235, 235, 235), (250, 250, 250)))
        if labels["shoes_white"]
        else pick((*DARK[:2], (90, 55, 30))),
        bag=pick(DARK + TROUSERS),
        hat=pick(CASUAL + REDS),
        box=pick(((200, 160, 100), (230, 230, 230), (240, 200, 40))),
        build=float(rng.uniform(0.82, 0.92) if female else rng.uniform(0.98, 1.1)),
    )


def render(person: Person, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One H x W x 3 uint8 image of ``person`` in a random pose, place and scene."""
    height, width = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    _background(draw, rng, width, height)
    ph = height * rng.uniform(0.74, 0.95)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    top = (height - ph) * rng.uniform(0.15, 0.85)
    _figure(draw, person, rng, cx, top, ph)
    if rng.random() < 0.15:  # a passer-by or a pole occludes part of the person
        x = rng.uniform(0, width)
        draw.rectangle(
            [x, rng.uniform(0, height), x + rng.uniform(0.05, 0.2) * width, height],
            fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
        )
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas = canvas.resize((size[1], size[0]), Image.Resampling.BOX)
    blur = rng.uniform(0, 0.7)
    if blur > 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels * rng.uniform(0.75, 1.2) + rng.uniform(-25, 25)
    pixels += rng.normal(0, rng.uniform(2, 9), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _background(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> None:
    """A floor/wall split plus random boxes and blobs: clutter the model has to ignore."""
    wall = rng.integers(60, 200, 3)
    floor = np.clip(wall + rng.integers(-50, 50, 3), 0, 255)
    horizon = rng.uniform(0.5, 0.8) * height
    draw.rectangle([0, 0, width, horizon], fill=tuple(int(v) for v in wall))
    draw.rectangle([0, horizon, width, height], fill=tuple(int(v) for v in floor))
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        box = [x0, y0, x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.05, 0.4) * height]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle(box, fill=fill)
        else:
            draw.ellipse(box, fill=fill)


def _figure(
    draw: ImageDraw.ImageDraw,
    person: Person,
    rng: np.random.Generator,
    cx: float,
    top: float,
    ph: float,
) -> None:
    """Draw the person back to front: bag behind, legs, torso, arms, head, carried things."""
    labels = person.labels

    def y(fraction: float) -> float:  # body heights are fractions of the person's height
        return top + fraction * ph

    half = 0.13 * ph * person.build  # half the shoulder width
    head_r = 0.065 * ph
    head_y = y(0.075) + rng.uniform(-0.01, 0.01) * ph
    hip_y, knee_y, foot_y = y(0.5), y(0.7), y(0.93)
    spread = rng.uniform(0.0, 0.08) * ph
    leg = 0.095 * ph
    if labels["backpack"]:  # the pack shows on both sides of the torso
        draw.rounded_rectangle(
            [cx - half * 1.5, y(0.12), cx + half * 1.5, y(0.46)], 0.03 * ph, fill=person.bag
        )
    if labels["long_hair"]:  # behind the head, then strands over the shoulders (below)
        draw.rectangle([cx - head_r * 1.3, head_y, cx + head_r * 1.3, y(0.3)], fill=person.hair)
    legs = [
        (cx - half * 0.55 - spread / 2, cx - half * 0.55 - spread / 2 + leg),
        (cx + half * 0.55 + spread / 2 - leg, cx + half * 0.55 + spread / 2),
    ]
    for x0, x1 in legs:
        draw.rectangle([x0, hip_y, x1, foot_y], fill=person.skin)
        if not labels["lower_skirt"]:
            bottom = y(0.64) if labels["lower_shorts"] else foot_y
            draw.rectangle([x0, hip_y, x1, bottom], fill=person.lower)
            if labels["lower_jeans"]:  # a light seam
                draw.line(
                    [((x0 + x1) / 2, hip_y), ((x0 + x1) / 2, bottom)], fill=(150, 175, 215), width=2
                )
        draw.rectangle([x0 - 0.01 * ph, foot_y, x1 + 0.02 * ph, y(0.975)], fill=person.shoes)
    draw.rectangle(
        [cx - half * 0.95, y(0.45), cx + half * 0.95, hip_y + 0.02 * ph], fill=person.lower
    )
    if labels["lower_skirt"]:
        draw.polygon(
            [
                (cx - half * 0.95, y(0.46)),
                (cx + half * 0.95, y(0.46)),
                (cx + half * 1.5, knee_y),
                (cx - half * 1.5, knee_y),
            ],
            fill=person.lower,
        )
    _torso(draw, person, cx, y, half, ph)
    _arms(draw, person, rng, cx, y, half, ph)
    if labels["long_hair"]:
        for side in (-1, 1):
            x = cx + side * head_r * 0.95
            draw.rectangle([x - head_r * 0.35, head_y, x + head_r * 0.35, y(0.3)], fill=person.hair)
    _head(draw, person, cx, head_y, head_r, ph)
    if labels["handbag"]:  # strap across the chest, bag at the hip
        side = 1 if rng.random() < 0.5 else -1
        draw.line(
            [(cx - side * half * 0.8, y(0.16)), (cx + side * half * 1.2, y(0.47))],
            fill=person.bag,
            width=3,
        )
        x = cx + side * half * 1.35
        draw.rectangle([x - 0.06 * ph, y(0.45), x + 0.06 * ph, y(0.56)], fill=person.bag)
    if labels["carrying_other"]:
        w = rng.uniform(0.13, 0.2) * ph
        draw.rectangle(
            [cx - w, y(0.38), cx + w, y(0.5)], fill=person.box, outline=(60, 40, 20), width=2
        )


def _torso(
    draw: ImageDraw.ImageDraw,
    person: Person,
    cx: float,
    y: Callable[[float], float],
    half: float,
    ph: float,
) -> None:
    labels = person.labels
    draw.polygon(
        [
            (cx - half, y(0.15)),
            (cx + half, y(0.15)),
            (cx + half * 0.92, y(0.48)),
            (cx - half * 0.92, y(0.48)),
        ],
        fill=person.upper,
    )
    if labels["upper_formal"]:  # white shirt V and a tie
        draw.polygon(
            [(cx - half * 0.45, y(0.15)), (cx + half * 0.45, y(0.15)), (cx, y(0.33))],
            fill=(245, 245, 245),
        )
        draw.polygon(
            [
                (cx - 0.012 * ph, y(0.16)),
                (cx + 0.012 * ph, y(0.16)),
                (cx + 0.02 * ph, y(0.3)),
                (cx, y(0.33)),
                (cx - 0.02 * ph, y(0.3)),
            ],
            fill=(150, 20, 30),
        )
    if labels["upper_stripes"]:
        for fraction in (0.2, 0.27, 0.34, 0.41):
            draw.rectangle(
                [cx - half * 0.95, y(fraction), cx + half * 0.95, y(fraction + 0.025)],
                fill=person.accent,
            )
    if labels["upper_logo"]:
        r = 0.055 * ph
        draw.regular_polygon((cx, y(0.27), r), 5, fill=person.accent)
    if labels["backpack"]:  # straps over the shoulders
        for x in (cx - half * 0.55, cx + half * 0.55):
            draw.line([(x, y(0.15)), (x, y(0.4))], fill=person.bag, width=max(2, int(0.02 * ph)))


def _arms(
    draw: ImageDraw.ImageDraw,
    person: Person,
    rng: np.random.Generator,
    cx: float,
    y: Callable[[float], float],
    half: float,
    ph: float,
) -> None:
    width = max(2, int(0.07 * ph))
    for side in (-1, 1):
        shoulder = (cx + side * (half + width * 0.3), y(0.17))
        swing = rng.uniform(-0.06, 0.12) * ph
        hand = (shoulder[0] + side * swing * 0.5, y(0.47))
        draw.line([shoulder, hand], fill=person.skin, width=width)
        sleeve_end = 1.0 if person.labels["upper_long_sleeve"] else 0.35
        elbow = (
            shoulder[0] + (hand[0] - shoulder[0]) * sleeve_end,
            shoulder[1] + (hand[1] - shoulder[1]) * sleeve_end,
        )
        draw.line([shoulder, elbow], fill=person.upper, width=width + 1)
        draw.ellipse(
            [
                hand[0] - width * 0.6,
                hand[1] - width * 0.6,
                hand[0] + width * 0.6,
                hand[1] + width * 0.6,
            ],
            fill=person.skin,
        )


def _head(
    draw: ImageDraw.ImageDraw, person: Person, cx: float, head_y: float, r: float, ph: float
) -> None:
    labels = person.labels
    draw.rectangle([cx - r * 0.4, head_y, cx + r * 0.4, head_y + r * 1.5], fill=person.skin)  # neck
    draw.ellipse([cx - r * 0.85, head_y - r, cx + r * 0.85, head_y + r], fill=person.skin)
    draw.chord(
        [cx - r * 0.9, head_y - r * 1.1, cx + r * 0.9, head_y + r * 0.6], 180, 360, fill=person.hair
    )
    if labels["sunglasses"]:
        draw.rectangle(
            [cx - r * 0.8, head_y - r * 0.2, cx + r * 0.8, head_y + r * 0.35], fill=(10, 10, 10)
        )
    if labels["hat"]:
        draw.rectangle(
            [cx - r * 1.0, head_y - r * 1.7, cx + r * 1.0, head_y - r * 0.35], fill=person.hat
        )
        draw.rectangle(
            [cx - r * 1.6, head_y - r * 0.55, cx + r * 1.6, head_y - r * 0.25], fill=person.hat
        )


def render_dataset(
    root: str, n: int, size: tuple[int, int], seed: int, ratios: Ratios = (0.6, 0.2, 0.2)
) -> tuple[pa.Table, ManifestInfo]:
    """Write ``n`` PNGs under ``<root>/images`` and return their manifest rows (paths relative
    to ``root``) and metadata."""
    if n < 1:
        raise ValueError(f"n={n}: the synthetic data set needs at least one image")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size={size}: give (height, width), each at least 16 pixels")
    counts = _images_per_person(n, seed)
    images, labels, identities = [], [], []
    for pid, count in enumerate(counts):
        person = sample_person(np.random.default_rng([seed, 0, pid]))
        for k in range(count):
            pixels = render(person, np.random.default_rng([seed, 1, pid, k]), size)
            name = f"images/p{pid:05d}_{k}.png"
            storage.write_bytes(storage.join(root, name), _png(pixels))
            images.append(name)
            labels.append([person.labels[a] for a in ATTRIBUTES])
            identities.append(f"p{pid:05d}")
    table = manifest_table(
        images=images,
        labels=np.asarray(labels, dtype=np.int8),
        splits=split_by_identity(identities, ratios, seed).tolist(),
        identities=identities,
        sources=["synthetic"] * len(images),
    )
    return table, ManifestInfo("synthetic", ATTRIBUTES, EVAL_ATTRIBUTES)


def generate_synthetic(
    out_dir: str, n: int = 600, size: tuple[int, int] = (128, 64), seed: int = 0
) -> str:
    """Write the synthetic data set to ``out_dir`` (``images/`` and ``manifest.parquet``).

    Returns the manifest's path. The same arguments always produce the same files.
    """
    table, info = render_dataset(out_dir, n, size, seed)
    path = storage.join(out_dir, "manifest.parquet")
    write_manifest(path, table, info)
    return path


def parse_size(value: str) -> tuple[int, int]:
    """``"128x64"`` or ``"128,64"`` -> (height, width)."""
    parts = value.replace("x", ",").split(",")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"size {value!r} must be HEIGHTxWIDTH, like 128x64") from None
    return height, width


def _images_per_person(n: int, seed: int) -> list[int]:
    """3 to 7 images per person; fewer for tiny sets, so every split still gets people."""
    high = min(IMAGES_PER_PERSON[1], max(1, n // 10))
    low = min(IMAGES_PER_PERSON[0], high)
    rng = np.random.default_rng([seed, 2])
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(int(rng.integers(low, high + 1)), n - sum(counts)))
    return counts


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
