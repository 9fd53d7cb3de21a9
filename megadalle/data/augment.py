"""The paper's two augmentation recipes, plus a deterministic one.

- "stage1" (dVAE): random square crop, resize to a random side in [s, 1.5 s], random crop of
  side s, random horizontal flip.
- "stage2" (transformer): square crop near the centre, resize to a random side in
  [s, 1.125 s], random crop s, no flip (images may contain text).
- "none": centre square crop, resize to s. For the shapes data use "none": a flip turns
  "left of" into "right of" and a crop can move an object into another grid cell, so both would
  make captions false.

Randomness comes from a `numpy.random.Generator` the caller seeds per sample, so a resumed
loader augments each sample exactly as an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RECIPES = ("stage1", "stage2", "none")


def _resize(img: Image.Image, side: int) -> Image.Image:
    if img.size == (side, side):
        return img
    # BICUBIC upsampling; antialiased (reducing_gap) downsampling keeps thin structure.
    return img.resize((side, side), Image.Resampling.BICUBIC, reducing_gap=None)


def augment(img: Image.Image, size: int, recipe: str, rng: np.random.Generator) -> Image.Image:
    """Apply `recipe` to an RGB image and return an RGB image of `size` x `size`."""
    w, h = img.size
    side = min(w, h)
    if recipe == "none":
        x0, y0 = (w - side) // 2, (h - side) // 2
        return _resize(img.crop((x0, y0, x0 + side, y0 + side)), size)
    if recipe == "stage1":
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        scale = rng.uniform(1.0, 1.5)
    elif recipe == "stage2":
        # Within the middle half of the slack: "near the centre".
        def near_centre(slack: int) -> int:
            lo, hi = slack // 4, slack - slack // 4
            return int(rng.integers(lo, hi + 1))
        x0, y0 = near_centre(w - side), near_centre(h - side)
        scale = rng.uniform(1.0, 1.125)
    else:
        raise ValueError(f"unknown augmentation {recipe!r}; choose one of {', '.join(RECIPES)}")
    big = max(size, int(round(size * scale)))
    img = _resize(img.crop((x0, y0, x0 + side, y0 + side)), big)
    cx, cy = int(rng.integers(0, big - size + 1)), int(rng.integers(0, big - size + 1))
    img = img.crop((cx, cy, cx + size, cy + size))
    if recipe == "stage1" and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 array [3, H, W] in [0, 1].

    numpy rather than torch: it stays single-threaded inside DataLoader workers, where torch's
    intra-op thread pool would fight the other workers for the cores.
    """
    a = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return np.ascontiguousarray(a.transpose(2, 0, 1)) * np.float32(1 / 255)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    return torch.from_numpy(to_array(img))
