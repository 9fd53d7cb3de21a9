"""`megadalle train-dvae`: train the discrete VAE (stage 1); exports <run_dir>/dvae/."""

from __future__ import annotations

import argparse
import math

from megadalle.commands.training_options import add_launch_arguments, apply_launch_arguments
from megadalle.config import Config
from megadalle.distributed import engine as dist
from megadalle.training.dvae_trainer import DVAETrainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.add_argument("--check-images", type=int, default=200, metavar="N",
                        help="shapes data: held-out images for the reconstruction check at the end (0: skip)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    cfg = apply_launch_arguments(args, cfg)
    trainer = DVAETrainer(cfg, deepspeed_config=args.deepspeed_config, check_images=args.check_images)
    try:
        summary = trainer.train()
    finally:
        dist.close_distributed()
    if trainer.is_main:
        print(summary.describe())
    return 0 if math.isfinite(summary.last_loss) else 1
