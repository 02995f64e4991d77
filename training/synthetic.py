"""A synthetic data set in the Oxford-IIIT Pets layout, for tests, demos and benchmarks.

Each image is one soft-edged shape (ellipse, polygon or rounded box) with its own colour
and texture on a textured background; its trimap marks the shape 1, the background 2 and
a band along the edge 3, like the Oxford trimaps.

Two kinds of image, two domains for the same task: ``shapes`` (a saturated subject on a
greyish background) and ``muted`` (the reverse: a dark, greyish subject on a saturated,
bright background). A model trained on one kind alone learns "the colourful part is the
object" or its opposite, so it fails on the other kind: the situation of a project whose
images are unlike the base model's (see ``benchmarks/learning_curve.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

IMAGES_SUBDIR = Path("images")
TRIMAPS_SUBDIR = Path("annotations") / "trimaps"
Kind = Literal["shapes", "muted"]
KINDS: tuple[str, ...] = ("shapes", "muted")


def _texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray, strength: float) -> np.ndarray:
    """Low-frequency colour noise plus stripes around ``base`` (RGB floats in 0..255)."""
    cells = int(rng.integers(3, 9))
    noise = rng.normal(0.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(noise[..., c], mode="F").resize((width, height), Image.Resampling.BICUBIC))
         for c in range(3)],
        axis=-1,
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 20) * max(height, width) / 100
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)[..., None]
    return base + strength * (0.6 * smooth + 0.4 * stripes * rng.uniform(0.2, 1.0))


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    """A random strongly coloured RGB base: one channel high, one low, one anywhere."""
    channels = rng.permutation(3)
    colour = np.empty(3)
    colour[channels] = rng.uniform(190, 255), rng.uniform(0, 60), rng.uniform(0, 255)
    return colour


def _shape_mask(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.2, 0.4) * width, rng.uniform(0.2, 0.4) * height
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    elif kind == 1:
        corners = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = rng.uniform(0.6, 1.0, corners)
        draw.polygon([(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    else:
        draw.rounded_rectangle((cx - rx, cy - ry, cx + rx, cy + ry), radius=min(rx, ry) * 0.4, fill=255)
    return mask


def synthetic_pair(rng: np.random.Generator, size: int, kind: Kind = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (longest side ``size``, aspect 3:4..4:3) and its trimap (values 1/2/3)."""
    aspect = rng.uniform(0.75, 1.0)
    width, height = (size, round(size * aspect)) if rng.random() < 0.5 else (round(size * aspect), size)
    mask = _shape_mask(rng, width, height)
    band = max(1, round(size / 64))  # boundary half-width in pixels
    grown = mask.filter(ImageFilter.MaxFilter(2 * band + 1))
    shrunk = mask.filter(ImageFilter.MinFilter(2 * band + 1))
    trimap = np.full((height, width), 2, dtype=np.uint8)
    trimap[np.asarray(shrunk) > 127] = 1
    trimap[(np.asarray(grown) > 127) & (np.asarray(shrunk) <= 127)] = 3

    if kind == "shapes":
        # A greyish background and a saturated subject: learnable in a few epochs, yet both textured.
        background = _texture(rng, height, width, rng.uniform(70, 180) + rng.uniform(-15, 15, 3), rng.uniform(15, 40))
        foreground = _texture(rng, height, width, _saturated_colour(rng), strength=rng.uniform(10, 30))
    elif kind == "muted":
        # The reverse: a bright saturated background and a dark greyish subject.
        background = _texture(rng, height, width, _saturated_colour(rng), strength=rng.uniform(10, 30))
        foreground = _texture(rng, height, width, rng.uniform(20, 90) + rng.uniform(-10, 10, 3), rng.uniform(10, 25))
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(band)), dtype=np.float32)[..., None] / 255.0
    image = alpha * foreground + (1 - alpha) * background + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), trimap


def write_synthetic(out_dir: str | Path, count: int, size: int = 128, seed: int = 0,
                    kind: Kind = "shapes") -> list[str]:
    """Write ``count`` pairs as ``images/shape_NNNNN.jpg`` and ``annotations/trimaps/shape_NNNNN.png``
    (``muted_NNNNN`` for the ``muted`` kind).

    Deterministic for a given ``seed`` and ``kind``; returns the stems written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if count < 1:
        raise ValueError(f"count must be at least 1 (got {count})")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels (got {size})")
    root = Path(out_dir)
    (root / IMAGES_SUBDIR).mkdir(parents=True, exist_ok=True)
    (root / TRIMAPS_SUBDIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = []
    for index in range(count):
        image, trimap = synthetic_pair(rng, size, kind)
        stem = f"{'shape' if kind == 'shapes' else kind}_{index:05d}"
        Image.fromarray(image).save(root / IMAGES_SUBDIR / f"{stem}.jpg", quality=90)
        Image.fromarray(trimap, mode="L").save(root / TRIMAPS_SUBDIR / f"{stem}.png")
        stems.append(stem)
    log.info("wrote %d synthetic pairs to %s", count, root)
    return stems
