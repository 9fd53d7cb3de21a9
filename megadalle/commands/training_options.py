"""Arguments every training command (`train`, `train-dvae`, `train-clip`) takes, spelled the same."""

from __future__ import annotations

import argparse

from megadalle.config import Config


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training command shares, spelled the same everywhere:
    `--deepspeed_config` (DeepSpeed's own spelling; `--deepspeed-config` too), `--resume` and `--init-from`."""
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="FILE",
                        help="hand-written DeepSpeed JSON merged over the generated one; keys that the typed "
                             "config also sets must agree, optimizer/scheduler sections are refused")
    parser.add_argument("--resume", default=None, metavar="latest|none|PATH",
                        help="shortcut for --checkpoint.resume")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="fine-tune: start from the weights of DIR (a `megadalle export` folder, a run folder or "
                             "its stage folder) with a new optimizer, schedule and step count; a checkpoint in the "
                             "run folder is resumed instead (shortcut for --checkpoint.init_from)")


def apply_launch_arguments(args: argparse.Namespace, cfg: Config) -> Config:
    """`cfg` with the shortcuts --resume and --init-from applied."""
    if args.resume is not None:
        cfg = cfg.replace(**{"checkpoint.resume": args.resume})
    if args.init_from is not None:
        cfg = cfg.replace(**{"checkpoint.init_from": args.init_from})
    return cfg
