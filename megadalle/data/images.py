"""Image files: tensors to PNG, grids of samples, and reading an image prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megadalle.errors import CommandError


def to_pil(image: torch.Tensor) -> Image.Image:
    """float [3,H,W] in [0,1] -> RGB PIL image."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3,H,W], got {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[N,3,H,W] -> one [3, rows*(H+pad)+pad, ncol*(W+pad)+pad] image, filled row by row."""
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file as float [3,size,size] in [0,1] (centre crop to square, then resize)."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise CommandError(f"{p} is not a readable image: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
