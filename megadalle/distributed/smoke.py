"""A communication smoke test for a new cluster or launcher: every rank discovers itself, joins
the process group, runs all-reduces under the watchdog and the graceful-stop handler, and
reports. Run it the way you run training, before a long job:

    srun --nodes=2 --ntasks-per-node=8 python -m megadalle.distributed.smoke --steps 20
    torchrun --nnodes 2 --nproc-per-node 8 ... -m megadalle.distributed.smoke
    mpirun -np 16 python -m megadalle.distributed.smoke

Exit codes follow megadalle.distributed.watchdog (75: stopped on a signal, 76: a peer failed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megadalle.distributed.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds of pretend compute per step")
    p.add_argument("--timeout", type=float, default=60.0, help="distributed.timeout_s for this run")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--out", default="", help="folder for one JSON report per rank (and per-step progress)")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank raises an error at --fail-step "
                                                             "(to see a failure end every rank with exit code 1)")
    p.add_argument("--fail-step", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megadalle.distributed.launch import init_process_group
    from megadalle.distributed.watchdog import TrainingGuard

    d = init_process_group(args.backend, args.timeout)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    guard = TrainingGuard(SimpleNamespace(timeout_s=args.timeout), d).start()
    device = torch.device("cuda", d.local_rank) if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    total, step = 0.0, 0
    for step in range(1, args.steps + 1):
        time.sleep(args.sleep)
        if d.rank == args.fail_rank and step == args.fail_step:
            raise RuntimeError(f"injected failure on rank {d.rank} at step {step} (--fail-rank)")
        x = torch.tensor([float(d.rank + 1)], device=device)
        if d.is_distributed:
            dist.all_reduce(x)
        total = float(x.item())
        if out:
            (out / f"progress-{d.rank}").write_text(str(step))
        if guard.should_stop():
            break
    # Every rank reaches this point after the same step; a trainer would save its checkpoint here.
    report = {**asdict(d), "steps": step, "allreduce_sum": total, "stopped": guard.stopped,
              "reason": guard.stop.reason}
    if out:
        (out / f"rank-{d.rank}.json").write_text(json.dumps(report))
    if d.is_main:
        print(f"smoke: {d.world_size} rank(s) on {d.num_nodes} node(s) via {d.launcher}, master "
              f"{d.master_addr}:{d.master_port}; all-reduce sum {total:g} (expected "
              f"{d.world_size * (d.world_size + 1) / 2:g}); {step} step(s)", flush=True)
    try:
        guard.finish()  # SystemExit(75) after a stop request
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
