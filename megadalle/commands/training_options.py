"""Arguments every training command (`train`, `train-dvae`, `train-clip`) takes, spelled the same."""

from __future__ import annotations

import argparse


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training command shares, spelled the same everywhere:
    `--deepspeed_config` (DeepSpeed's own spelling; `--deepspeed-config` too) and `--resume`."""
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="FILE",
                        help="hand-written DeepSpeed JSON merged over the generated one; keys that the typed "
                             "config also sets must agree, optimizer/scheduler sections are refused")
    parser.add_argument("--resume", default=None, metavar="latest|none|PATH",
                        help="shortcut for --checkpoint.resume")
