"""`megadalle inspect CKPT`: what a checkpoint holds, without DeepSpeed or a process group."""

from __future__ import annotations

import argparse

from megadalle.config import Config
from megadalle.tools.inspect_checkpoint import describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder (step_*) or a checkpoints folder")
    parser.add_argument("--params", type=int, default=20, metavar="N", help="list the first N parameters")


def run(args: argparse.Namespace, cfg: Config) -> int:
    print(describe(args.ckpt, args.params))
    return 0
