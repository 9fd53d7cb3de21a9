"""`megadalle encode`: turn image shards into dVAE token shards for stage 2 (parallel over ranks,
resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megadalle.config import Config
from megadalle.run_layout import RunLayout
from megadalle.distributed.launch import discover
from megadalle.dvae.encode import encode_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="train", choices=("train", "val", "heldout"),
                        help="which split of data.source (or data.val_source) to encode")
    parser.add_argument("--input", default=None, metavar="SRC",
                        help="shard directory / glob / image folder (default: data.source for --split)")
    parser.add_argument("--out", default=None, metavar="DIR", help="default <logging.run_dir>/tokens/<split>")
    parser.add_argument("--dvae", default=None, metavar="DIR", help="default <logging.run_dir>/dvae")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace, cfg: Config) -> int:
    env = discover()
    layout = RunLayout(Path(cfg.logging.run_dir))  # the run's own tokens/, not data.token_source
    if args.input:
        source = args.input
    else:
        from megadalle.data.loader import resolve_image_source

        source = resolve_image_source(cfg, args.split)
    out = args.out or str(layout.tokens(args.split))
    dvae = args.dvae or str(layout.dvae)
    device = args.device
    if device == "cuda" and env.local_world_size > 1:
        device = f"cuda:{env.local_rank}"  # one GPU per rank on a node
    summary = encode_source(source, dvae, out, cfg.data, env.rank, env.world_size, args.batch_size,
                            device, progress=cfg.logging.progress)
    print(summary.describe())
    return 0
