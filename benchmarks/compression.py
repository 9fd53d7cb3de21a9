"""Gradient compression between machines, off vs on, measured in one run.

Launches `--world` gloo processes on this host as machines of `--gpus-per-node` ranks, trains the
same transformer from the same initial weights on the same data twice through DeepSpeed (ZeRO-0):
once with the hierarchical exchange uncompressed, once with PowerSGD across machines. Prints side
by side: inter-machine bytes per step (counted by megadalle.distributed.comm on every collective),
the compression rate measured and predicted by the paper's formula generalised to L GPUs per
machine, step time and the loss curve; writes everything to JSON.

    python benchmarks/compression.py [--steps 120 --warmup 30 --shard-ranks 0 4]

`--shard-ranks 0 4`: the default (the paper's 896 scaled to d_model, split over the L GPUs of a
machine: 29 -> 15 per shard at d_model 128 with L = 2) and 4 per shard (the paper's per-GPU
split of 8, r/8, kept with 2 GPUs per machine: fewer bytes, a slower start); the uncompressed run
is trained once and shared.

Writes benchmarks/results/compression.json for the bare run (tiny widths, 2 machines x 2 ranks,
--shard-ranks 0 4); another preset, topology or set of shard ranks adds its value to the name
(compression_small_4x2_shard0.json; see benchmarks/_results.py).

    python benchmarks/compression.py --scheme paper [--steps 120 --warmup 30]

runs the paper's scheme instead (distributed.scheme=paper: ZeRO-3 inside each machine) through the
real trainer (tests/trainer_toy.py under the deepspeed launcher, 2 machines x 2 ranks, the tiny
transformer on learnable tokens), beside plain ZeRO-3 over all ranks: uncompressed, PowerSGD with
fp32 state, and PowerSGD with 16-bit state. Per run: inter-machine bytes split into the weight
matrices and the rest, intra-machine bytes (DeepSpeed's comms logger: ZeRO's all-gathers and
reduce-scatters), tokens/s, the loss, and each rank's resident state (DeepSpeed's tensors and the
error buffers). Writes benchmarks/results/compression_paper.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import listed, out_path, unless  # noqa: E402
from megadalle.config import load_config  # noqa: E402
from megadalle.distributed.powersgd import (  # noqa: E402
    PAPER_GPUS_PER_NODE, default_rank, predicted_compression_rate)
from megadalle.transformer.model import DALLETransformer  # noqa: E402


DEFAULT_SHARD_RANKS = [0, 4]


class TransformerLoss(nn.Module):
    """The preset's DALL-E transformer; forward returns the training loss."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.model = DALLETransformer(cfg)

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.model.loss(text, codes)["loss"]


def make_batch(cfg, rank: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams from a fixed Markov chain (4 likely successors per token: learnable), split
    into text (B, text_len) without padding and image codes (B, image_len); different on every
    rank and step."""
    V = cfg.text_vocab_size
    nxt = torch.randint(1, V, (V, 4), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(100_003 * step + rank)
    toks = torch.empty(batch, cfg.text_len + cfg.image_len, dtype=torch.long)
    toks[:, 0] = torch.randint(1, V, (batch,), generator=g)
    for t in range(1, toks.shape[1]):
        toks[:, t] = nxt[toks[:, t - 1], torch.randint(4, (batch,), generator=g)]
    return toks[:, :cfg.text_len], toks[:, cfg.text_len:] % cfg.image_vocab_size


def run_mode(args, groups, rank: int, compress: bool) -> dict:
    import deepspeed
    import torch.distributed as dist

    from megadalle.distributed.comm import Comm
    from megadalle.distributed.powersgd import DeepSpeedExchange, PowerSGDExchange

    cfg = load_config(args.preset)
    t = cfg.transformer
    torch.manual_seed(0)
    model = TransformerLoss(t)
    ds_cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, args.beta2], "weight_decay": 0.0,
                                                        "torch_adam": True}},
              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                      dist_init_required=False)
    comm = Comm(groups)
    rank_r = cfg.distributed.powersgd.rank or default_rank(t.dim)
    exchange = PowerSGDExchange(engine.module, comm, rank=rank_r, compress=compress, rank_per_shard=args.shard_rank,
                                uncompressed=list(cfg.distributed.powersgd.uncompressed))
    hook = DeepSpeedExchange(engine, exchange)
    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = engine(*make_batch(t, rank, step, args.batch))
        engine.backward(loss)
        for group in engine.optimizer.param_groups:  # linear warm-up, as the paper's schedule starts
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if hook.after_backward(engine):
            engine.step()
        times.append(time.perf_counter() - t0)
        mean = torch.tensor([loss.item()])
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    lay = exchange.layout
    return {"losses": losses, "step_time_s": sum(times[1:]) / max(1, len(times) - 1),
            "inter_bytes_per_step": comm.bytes("inter") / args.steps,
            "inter_powersgd_bytes_per_step": comm.bytes("inter", "powersgd") / args.steps,
            "inter_dense_bytes_per_step": comm.bytes("inter", "dense") / args.steps,
            "intra_bytes_per_step": comm.bytes("intra") / args.steps,
            "rank": rank_r, "rank_per_shard": exchange.rank_per_shard, "d_model": t.dim,
            "compressed_params": sum(m.param.numel() for m in lay.matrices),
            "plain_params": sum(p.numel() for _, p in lay.plain)}


def worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.world),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megadalle.distributed.engine import init_distributed
    from megadalle.distributed.groups import build_groups

    init_distributed(load_config(args.preset, overrides={"distributed.timeout_s": 300}).distributed)
    groups = build_groups(args.gpus_per_node)
    args.shard_rank = 0
    off = run_mode(args, groups, rank, compress=False)
    results = []
    for sr in args.shard_ranks:
        args.shard_rank = sr
        on = run_mode(args, groups, rank, compress=True)
        if rank == 0:
            results.append(report(args, groups.machines, off, on))
    if rank == 0:
        shards = listed(args.shard_ranks, DEFAULT_SHARD_RANKS)
        out = out_path(args.out, "compression", unless(args.preset, "tiny"),
                       unless(f"{args.world // args.gpus_per_node}x{args.gpus_per_node}", "2x2"),
                       f"shard{shards}" if shards else None)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=1))
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def report(args, machines: int, off: dict, on: dict) -> dict:
    L, d, s, r = args.gpus_per_node, on["d_model"], on["rank_per_shard"], on["rank"]
    matrices_off = off["inter_bytes_per_step"] - on["inter_dense_bytes_per_step"]
    result = {
        "machine": "2-core CPU, no GPU", "world": args.world, "gpus_per_node": L, "machines": machines,
        "preset": args.preset, "steps": args.steps, "d_model": d, "rank": r, "rank_per_shard": s,
        "compressed_params": on["compressed_params"], "plain_params": on["plain_params"],
        "off": off, "on": on,
        "rate_matrices_measured": 1 - on["inter_powersgd_bytes_per_step"] / matrices_off,
        "rate_matrices_predicted": predicted_compression_rate(s, d, L),
        "rate_all_measured": 1 - on["inter_bytes_per_step"] / off["inter_bytes_per_step"],
        "paper_formula_8_gpus": 1 - 5 * r / (PAPER_GPUS_PER_NODE * d),
        "final_loss_gap": (sum(on["losses"][-5:]) - sum(off["losses"][-5:])) / sum(off["losses"][-5:]),
    }
    print(f"\n{machines} machines x {L} ranks (gloo, one host), {args.preset} widths: d_model {d}, "
          f"rank {r} ({s} per shard), {args.steps} steps; 2-core CPU, no GPU")
    print(f"{'':34}{'off':>14}{'on':>14}{'on/off':>9}")
    for key, label in [("inter_bytes_per_step", "inter-machine bytes / step"),
                       ("intra_bytes_per_step", "intra-machine bytes / step"), ("step_time_s", "step time (s)")]:
        print(f"{label:34}{off[key]:>14,.4g}{on[key]:>14,.4g}{on[key] / off[key]:>9.3f}")
    print(f"{'final loss (mean of last 5)':34}{sum(off['losses'][-5:]) / 5:>14.4f}{sum(on['losses'][-5:]) / 5:>14.4f}"
          f"{result['final_loss_gap'] + 1:>9.3f}")
    print(f"compression rate on weight matrices: measured {result['rate_matrices_measured']:.3f}, "
          f"predicted 1-(L/2+1)s/d = {result['rate_matrices_predicted']:.3f} "
          f"(paper's 1-5r/(8d) with 8 GPUs/machine: {result['paper_formula_8_gpus']:.3f})")
    print(f"compression rate on all inter-machine bytes (embeddings, gains, biases stay fp32): "
          f"{result['rate_all_measured']:.3f}")
    every = max(1, args.steps // 10)
    print("loss curve (every %d steps)" % every)
    print("  off: " + " ".join(f"{x:.3f}" for x in off["losses"][::every]))
    print("  on:  " + " ".join(f"{x:.3f}" for x in on["losses"][::every]))
    return result


PAPER_RUNS = {"zero3": "plain ZeRO-3 (its ZeRO traffic spans all 4 ranks, both machines)",
              "paper": "paper scheme, uncompressed",
              "paper_psgd": "paper + PowerSGD, fp32 state", "paper_psgd16": "paper + PowerSGD, 16-bit state"}


def paper_scheme(args) -> None:
    """The paper's scheme beside plain ZeRO-3, through the real trainer (module docstring)."""
    import statistics
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    run_dir = Path(tempfile.mkdtemp(prefix="compression-paper-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "4", "--master_port", str(port),
           str(root / "tests" / "trainer_toy.py"), "--model", "transformer", "--pattern", "--comms",
           "--run_dir", str(run_dir), "--runs", ",".join(PAPER_RUNS), f"train.steps={args.steps}",
           f"train.optimizer.lr={args.lr}", "train.schedule.kind=cosine", f"train.schedule.warmup_steps={args.warmup}"]
    print("running", " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
    sys.path.insert(0, str(root / "tests"))
    from trainer_toy import losses

    runs = {}
    for name in PAPER_RUNS:
        d = json.loads((run_dir / name / "scheme-rank0.json").read_text())
        steps = d["steps"]
        loss = losses(run_dir / name, "transformer")
        speed = [r["tokens_per_s"] for r in _records(run_dir / name) if "tokens_per_s" in r][2:]
        intra = sum(d["comms"][op]["bytes"] for op in ("all_gather_into_tensor", "reduce_scatter_tensor")) / steps
        matrices = d.get("powersgd_matrix_bytes", 0.0)
        rest = d.get("powersgd_dense_bytes", d.get("replica_average_bytes", 0.0) / steps)
        runs[name] = {"label": PAPER_RUNS[name], "inter_matrix_bytes": matrices, "inter_rest_bytes": rest,
                      "inter_matrix_bytes_uncompressed": 4 * d.get("matrix_numel", 0.0),
                      "intra_bytes": intra, "tokens_per_s": statistics.median(speed) if speed else None,
                      "final_loss": sum(loss[k] for k in sorted(loss)[-5:]) / 5, "state_bytes": d["state_bytes"]}
    base = runs["zero3"]
    print(f"\n2 machines x 2 ranks (gloo, one host), tiny transformer, {args.steps} steps; 2-core CPU, no GPU")
    print(f"{'':66}{'inter matrices':>15}{'inter rest':>12}{'intra':>12}{'tok/s ratio':>12}{'loss':>8}{'state B/rank':>14}")
    for name, r in runs.items():
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if r["tokens_per_s"] and base["tokens_per_s"] else float("nan")
        print(f"{r['label']:66}{r['inter_matrix_bytes']:>15,.0f}{r['inter_rest_bytes']:>12,.0f}{r['intra_bytes']:>12,.0f}"
              f"{ratio:>12.3f}{r['final_loss']:>8.4f}{sum(r['state_bytes'].values()):>14,}")
    psgd = runs["paper_psgd"]
    print(f"weight matrices between machines: {psgd['inter_matrix_bytes'] / psgd['inter_matrix_bytes_uncompressed']:.1%} "
          f"of uncompressed; loss vs plain ZeRO-3 {psgd['final_loss'] / base['final_loss'] - 1:+.2%}; 16-bit state "
          f"vs fp32 {runs['paper_psgd16']['final_loss'] / psgd['final_loss'] - 1:+.2%}")
    out = out_path(args.out, "compression", "paper")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/compression.py", *sys.argv[1:]]),
                               "machine": "2-core CPU, no GPU", "steps": args.steps, "runs": runs}, indent=1))
    print(f"wrote {out}")


def _records(run: Path) -> list[dict]:
    from megadalle.training.metrics import read_jsonl

    return list(read_jsonl(run / "transformer" / "metrics.jsonl"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", choices=["zero0", "paper"], default="zero0",
                   help="zero0: the ZeRO-0/1 exchange off vs on; paper: distributed.scheme=paper (module docstring)")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=2)
    p.add_argument("--preset", default="tiny", help="config preset giving the transformer widths")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta2", type=float, default=0.96, help="the paper's transformer beta2")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--shard-ranks", type=int, nargs="+", default=DEFAULT_SHARD_RANKS,
                   help="PowerSGD rank per shard of each compressed run; 0: the default, ceil(rank / L)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/compression[_<config>].json")
    args = p.parse_args()
    if args.scheme == "paper":
        return paper_scheme(args)
    if args.world % args.gpus_per_node:
        p.error(f"--gpus-per-node {args.gpus_per_node} must divide --world {args.world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
