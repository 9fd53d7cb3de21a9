"""`megadalle reconstruct`: encode and decode images with a dVAE; side-by-side PNGs."""

from __future__ import annotations

import argparse

from megadalle.config import Config
from megadalle.run_layout import RunLayout
from megadalle.dvae.reconstruct import reconstruct_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMG", help="image files (png, jpg, ...)")
    parser.add_argument("--dvae", default=None, metavar="DIR",
                        help="dVAE folder (dvae.safetensors + dvae.yaml); default <logging.run_dir>/dvae")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the side-by-side PNGs")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    dvae_dir = args.dvae or str(RunLayout.from_config(cfg).dvae)
    results = reconstruct_files(args.images, dvae_dir, args.out, args.device)
    for path, db in results:
        print(f"  {path}  (PSNR {db:.1f} dB)")
    mean = sum(db for _, db in results) / len(results)
    print(f"wrote {len(results)} side-by-side PNG(s) (original | reconstruction) to {args.out}; "
          f"mean PSNR {mean:.1f} dB")
    return 0
