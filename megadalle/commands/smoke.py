"""A communication smoke test for a new cluster or launcher: every rank discovers itself, joins
the process group, runs all-reduces under the watchdog and the graceful-stop handler, and
reports. Run it the way you run training, before a long job:

    srun --nodes=2 --ntasks-per-node=8 python -m megadalle smoke --steps 20
    torchrun --nnodes 2 --nproc-per-node 8 ... -m megadalle smoke
    mpirun -np 16 python -m megadalle smoke

Exit codes follow megadalle.distributed.watchdog (75: stopped on a signal, 76: a peer failed).
"""

from __future__ import annotations

import argparse

from megadalle.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds of pretend compute per step")
    p.add_argument("--timeout", type=float, default=60.0, help="distributed.timeout_s for this run")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--out", default="", help="folder for one JSON report per rank (and per-step progress)")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank raises an error at --fail-step "
                                                             "(to see a failure end every rank with exit code 1)")
    p.add_argument("--fail-step", type=int, default=3)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.distributed.smoke import smoke_test

    return smoke_test(args.steps, args.sleep, args.timeout, args.backend, args.out, args.fail_rank, args.fail_step)
