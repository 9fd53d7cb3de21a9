"""`megadalle reconstruct IMG... --dvae DIR --out DIR`: a quick visual check of a dVAE.

Each image is centre-cropped, resized to the dVAE's size, encoded to tokens (argmax) and decoded;
`<out>/<name>.png` shows the original and the reconstruction side by side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megadalle.errors import CommandError


def _out_names(paths: list[Path]) -> list[str]:
    """One output name per input; inputs with the same file name get a numeric suffix."""
    names, seen = [], {}
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(f"{p.stem}.png" if n == 0 else f"{p.stem}-{n}.png")
    return names


@torch.no_grad()
def reconstruct_files(images: list[str | Path], dvae_dir: str | Path, out_dir: str | Path,
                      device: str = "cpu") -> list[tuple[Path, float]]:
    """Write side-by-side PNGs; returns (path, PSNR in dB) per image."""
    from megadalle.dvae.io import load_dvae
    from megadalle.dvae.loss import psnr
    from megadalle.data.images import load_image, make_grid, save_png

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CommandError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here; use --device cpu")
    model = load_dvae(dvae_dir, device=dev)
    paths = [Path(p) for p in images]
    # Read every input before writing anything: one bad file fails the command up front.
    pixels = [load_image(p, model.cfg.image_size) for p in paths]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder")
    results = []
    for x, name in zip(pixels, _out_names(paths)):
        x = x.unsqueeze(0).to(dev)  # (1, 3, H, W)
        rec = model.reconstruct(x)
        side_by_side = make_grid(torch.cat([x, rec]).cpu(), ncol=2)
        results.append((save_png(side_by_side, out / name), float(psnr(rec, x))))
    return results
