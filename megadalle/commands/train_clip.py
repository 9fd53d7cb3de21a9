"""`megadalle train-clip`: train the contrastive reranker on the image shards."""

from __future__ import annotations

import argparse

from megadalle.commands.training_options import add_launch_arguments, apply_launch_arguments
from megadalle.config import Config
from megadalle.errors import CommandError
from megadalle.training.clip_trainer import ClipTrainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="override clip_train.steps")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.steps is not None:
        cfg = cfg.replace(**{"clip_train.steps": args.steps})
    cfg = apply_launch_arguments(args, cfg)
    if cfg.clip.open_clip_checkpoint:
        raise CommandError("clip.open_clip_checkpoint is set: that reranker is used as is; train-clip trains "
                           "megadalle's own reranker, so unset clip.open_clip_model/open_clip_checkpoint")
    from megadalle.distributed.engine import close_distributed

    trainer = ClipTrainer(cfg, deepspeed_config=args.deepspeed_config)
    try:
        summary = trainer.train()
        if trainer.is_main:
            print(summary.describe())
    finally:
        close_distributed()
    return 0
