"""A communication smoke test for a new cluster or launcher: every rank discovers itself, joins
the process group, runs all-reduces under the watchdog and the graceful-stop handler, and
reports. `megadalle smoke` runs it (commands/smoke.py).

Exit codes follow megadalle.distributed.watchdog (75: stopped on a signal, 76: a peer failed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace


def smoke_test(steps: int = 10, sleep: float = 0.0, timeout: float = 60.0, backend: str = "auto", out: str = "",
               fail_rank: int = -1, fail_step: int = 3) -> int:
    """All-reduce `steps` times on every rank; rank `fail_rank` raises at `fail_step` (to test failures)."""
    import torch
    import torch.distributed as dist

    from megadalle.distributed.launch import init_process_group
    from megadalle.distributed.watchdog import TrainingGuard

    d = init_process_group(backend, timeout)
    out = Path(out) if out else None  # type: ignore[assignment]
    if out:
        out.mkdir(parents=True, exist_ok=True)
    guard = TrainingGuard(SimpleNamespace(timeout_s=timeout), d).start()
    device = torch.device("cuda", d.local_rank) if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    total, step = 0.0, 0
    for step in range(1, steps + 1):
        time.sleep(sleep)
        if d.rank == fail_rank and step == fail_step:
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

