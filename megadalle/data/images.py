"""Image files: tensors to PNG, grids of samples, and reading an image prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

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


def labelled_grid(rows: list[torch.Tensor], labels: list[str], pad: int = 2, line: float = 0.5,
                  label_width: int = 0) -> torch.Tensor:
    """One row per label: the label in a white strip on the left (wrapped, cut with "..." where it
    does not fit the row), then the row's images [k,3,H,W]; cells, rows and the strip are separated
    by `pad`-pixel lines of grey `line`, so that white backgrounds do not run together. Short rows
    end in white cells. -> float [3, rows*(H+pad)+pad, label_width + ncol*(W+pad)+pad] in [0,1].
    label_width 0: max(120, 2W). The font is PIL's built-in bitmap font (no file, same pixels
    everywhere)."""
    if not rows or len(rows) != len(labels):
        raise ValueError(f"labelled_grid needs one label per row, got {len(rows)} rows and {len(labels)} labels")
    _, c, h, w = rows[0].shape
    ncol = max(r.shape[0] for r in rows)
    cells = torch.cat([torch.cat([r.float(), torch.ones(ncol - r.shape[0], c, h, w)]) for r in rows])
    canvas = to_pil(make_grid(cells, ncol=ncol, pad=pad, pad_value=line))
    label_width = label_width or max(120, 2 * w)
    out = Image.new("RGB", (label_width + canvas.width, canvas.height), (round(line * 255),) * 3)
    out.paste(canvas, (label_width, 0))
    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    line_h = font.getbbox("Ag")[3] + 1
    for i, text in enumerate(labels):
        strip = Image.new("RGB", (label_width - pad, h), "white")  # drawing is clipped to the row
        draw = ImageDraw.Draw(strip)
        for j, ln in enumerate(_wrap(text, lambda t: draw.textlength(t, font=font), strip.width - 4,
                                     max(1, h // line_h))):
            draw.text((2, 1 + j * line_h), ln, fill="black", font=font)
        out.paste(strip, (pad, pad + i * (h + pad)))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float() / 255  # (3, H', W')


def _wrap(text: str, width_of: Callable[[str], float], width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` (words longer than a line are cut); past `max_lines` the last
    line ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        while width_of(word) > width and len(word) > 1:  # a word wider than a line: cut it
            n = next((k for k in range(len(word) - 1, 0, -1) if width_of(word[:k]) <= width), 1)
            lines.append(word[:n])
            word = word[n:]
        if lines and width_of(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and width_of(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


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
