"""`megadalle plan`: memory per GPU and traffic per step of a model on a cluster (a dry run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megadalle.config import Config
from megadalle.distributed.plan import build_plan, format_plan, parse_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, help="machines")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per machine")
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 16GiB, 80GB")
    p.add_argument("--reserve", default="0.5GiB",
                   help="set aside per GPU for the CUDA context, kernel workspaces and fragmentation "
                        "(default 0.5GiB)")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per GPU per micro-step (default: "
                                                               "train.micro_batch_size)")
    p.add_argument("--shard-group", choices=["world", "node"], default="world",
                   help="ZeRO shards over all GPUs (DeepSpeed's default) or inside each machine")
    p.add_argument("--error-buffer-bytes", type=int, choices=[2, 4], default=2,
                   help="bytes per matrix parameter of the paper scheme's PowerSGD error buffer")
    p.add_argument("--json", default="", metavar="FILE", help="also write the numbers as JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    # The plan is the transformer's: in its own precision (train.precision) where it sets one.
    plan = build_plan(cfg.for_stage("train"), args.nodes, args.gpus_per_node, parse_bytes(args.gpu_memory),
                      parse_bytes(args.reserve), args.micro_batch, args.shard_group, args.error_buffer_bytes)
    print(format_plan(plan))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan, indent=2))
        print(f"wrote {out}")
    return 0
