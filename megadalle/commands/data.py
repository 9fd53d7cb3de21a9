"""`megadalle data`: build the shapes shards, or check a shard set / image folder for bad input.

    megadalle data shapes --out DIR --n N [--split train|val|heldout]   one split into DIR
    megadalle data shapes [--preset tiny]                                every split of the run:
                                                                         <run_dir>/data/shapes/<split>
    megadalle data check SOURCE [--tokens] [--json FILE]                 per-shard report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megadalle.errors import CommandError
from megadalle.config import Config
from megadalle.data.shapes import SPLITS
from megadalle.data.shapes_shards import (ensure_shapes_shards, shapes_image_size, split_count,
                                          write_shapes_shards)
from megadalle.data.shards import ShardError, existing_shards


def common_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--preset / --config after the action too (`megadalle data shapes --preset tiny`).

    SUPPRESS keeps an absent option from overwriting the value given before the action.
    """
    from megadalle.config import PRESETS

    p.add_argument("--preset", default=argparse.SUPPRESS, choices=list(PRESETS), help="named configuration")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help="YAML config")
    return p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = common_options(sub.add_parser("shapes", help="write the synthetic shapes data set as tar shards"))
    p.add_argument("--out", default=None, help="output directory for one split (default: every split "
                                               "under <logging.run_dir>/data/shapes/)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: data.shapes.n_<split>)")
    p.add_argument("--split", default="train", choices=list(SPLITS),
                   help="train, val (seen shape/colour combinations) or heldout (unseen ones)")
    p.add_argument("--start", type=int, default=0, help="index of the first scene (to extend a set)")
    c = common_options(sub.add_parser(
        "check", help="read every sample of a shard set or image folder and report bad input"))
    c.add_argument("source", help="directory or glob of .tar shards, or an image folder")
    c.add_argument("--tokens", action="store_true", help="token shards ({key}.codes.npy) instead of images")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the per-shard counts as JSON")


def _size_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 1e6


def _shapes(args: argparse.Namespace, cfg: Config) -> int:
    sc = cfg.data.shapes
    size = shapes_image_size(cfg)
    t0 = time.perf_counter()
    if args.out is None:
        if args.n is not None or args.start:
            raise CommandError("--n and --start need --out (without --out every split of the run is built "
                               "with the data.shapes.n_* settings)")
        run_dir = Path(cfg.logging.run_dir)
        dirs = ensure_shapes_shards(cfg, run_dir, progress=True)
        for split, d in dirs.items():
            shards = existing_shards(d)
            print(f"{split:8s} {split_count(sc, split):7d} images in {len(shards)} shard(s), "
                  f"{_size_mb(shards):.1f} MB: {d}")
        print(f"shapes data ({size}x{size} px) ready under {run_dir / 'data' / 'shapes'} "
              f"in {time.perf_counter() - t0:.1f}s")
        return 0
    n = split_count(sc, args.split) if args.n is None else args.n
    if n < 1:
        raise CommandError(f"--n must be >= 1, got {n}")
    if args.start < 0:
        raise CommandError("--start must be >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a directory")
    if existing_shards(out):
        raise CommandError(f"--out {out} already holds shards; choose an empty directory (or delete them)")
    try:
        manifest = write_shapes_shards(out, args.split, n, sc, size, progress=True, start=args.start)
    except ShardError as e:
        raise CommandError(str(e)) from None
    shards = [out / s for s in manifest["shards"]]
    print(f"wrote {n} {args.split} images ({size}x{size} px, {manifest['two_object_scenes']} with two objects) "
          f"in {len(shards)} shard(s), {_size_mb(shards):.1f} MB, to {out} in {time.perf_counter() - t0:.1f}s")
    print(f"held-out (shape, colour) combinations: {manifest['heldout_combos']}")
    return 0


def _check(args: argparse.Namespace, cfg: Config) -> int:
    from tqdm import tqdm

    from megadalle.data.loader import format_stats, image_loader, token_loader

    d = cfg.data
    try:
        if args.tokens:
            loader = token_loader(args.source, 64, shuffle_buffer=0, endless=False, rank=0, world_size=1)
        else:
            loader = image_loader(args.source, 64, image_size=d.image_size, augment="none", shuffle_buffer=0,
                                  endless=False, rank=0, world_size=1, min_image_side=d.min_image_side,
                                  max_aspect_ratio=d.max_aspect_ratio, max_image_pixels=d.max_image_pixels)
    except (ShardError, OSError) as e:
        raise CommandError(str(e)) from None
    n = 0
    for batch in tqdm(loader, desc="check", unit="batch", mininterval=1.0):
        n += len(batch["key"])
    stats = loader.stats()
    print(format_stats(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1, sort_keys=True))
        print(f"per-shard counts written to {args.json}")
    print(f"{n} usable samples in {args.source}")
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    return _shapes(args, cfg) if args.action == "shapes" else _check(args, cfg)
