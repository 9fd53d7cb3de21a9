"""`megadalle launch hostfile|env`: launch helpers for SLURM job scripts (slurm/common.sh).

    scontrol show hostnames | megadalle launch hostfile --slots 8 --expect-nodes 2 --out hostfile
    megadalle launch env          # the DistEnv this process's launcher variables describe
"""

from __future__ import annotations

import argparse
import os
import sys

from megadalle.config import Config
from megadalle.distributed.launch import LaunchError, build_hostfile, discover, expand_hostlist, parse_hostnames


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostfile", help="write a deepspeed hostfile from `scontrol show hostnames` on stdin")
    h.add_argument("--slots", type=int, required=True, help="GPUs (processes) per node")
    h.add_argument("--nodelist", default=None,
                   help="expand this SLURM host list instead of reading stdin (when scontrol is unavailable)")
    h.add_argument("--expect-nodes", type=int, default=0, help="fail unless exactly this many hosts are given")
    h.add_argument("--out", default="-", help="file to write (default: stdout)")
    sub.add_parser("env", help="print the DistEnv discovered from this process's environment")


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        if args.cmd == "env":
            # One write: the ranks of a job often share one unbuffered stdout.
            sys.stdout.write(f"{discover()}\n")
            sys.stdout.flush()
            return 0
        hosts = parse_hostnames("\n".join(expand_hostlist(args.nodelist)) if args.nodelist else sys.stdin.read())
        if args.expect_nodes and len(hosts) != args.expect_nodes:
            raise LaunchError(f"{len(hosts)} host(s) given but --expect-nodes={args.expect_nodes}: the job's node "
                              f"count and the script's NODES disagree")
        text = build_hostfile(hosts, args.slots)
    except LaunchError as e:
        print(f"megadalle launch: error: {e}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(text)
    else:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return 0
