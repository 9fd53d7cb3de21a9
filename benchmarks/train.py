"""Stage-2 training throughput and memory side by side: ZeRO 0/1/2/3, activation checkpointing,
and the cost of per-resblock fp16 gradient scaling against plain fp16.

Each configuration is one real 2-rank launch (`deepspeed --num_gpus 2`, gloo on CPU) of the
tiny preset transformer on synthetic tokens, so that peak memory is per configuration. Every rank
reports:

    tokens/s         stream tokens (text + image) of the global batch per second of wall time,
                     over the steps after warm-up; also per second of this process's CPU time
                     (on a shared machine the wall time depends on the other users)
    peak RSS         the process's peak resident memory (CPU) or peak CUDA memory (GPU)
    params/grads/optimizer bytes held by this rank, measured on the live engine:
                     parameters (ZeRO-3: this rank's partition), gradients (after the last
                     backward of a step: full `.grad`s at ZeRO 0/1, this rank's partition at 2/3),
                     optimizer state (Adam moments plus the fp32 master partition where DeepSpeed
                     keeps one)

    python benchmarks/train.py [--precision bf16] [--steps 12 --warmup 3 --micro 8]

Writes benchmarks/results/train_<precision>.json (train_fp32.json, train_bf16.json), one file per
configuration: a preset other than tiny, a rank count other than 2, a subset of --configs or a GPU
add their value to the name (train_small_bf16_cuda.json); see benchmarks/_results.py.

On a GPU machine, `--ranks` processes use one GPU each; run it with `--preset small --precision
bf16` (or `1.3b`) and it prints MFU, model FLOPs counting only the attention pairs the masks
keep, against the device peak (known for A100/H100/H200/V100/A10/L4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import listed, out_path, unless  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "zero0": {"distributed.zero_stage": 0},
    "zero1": {"distributed.zero_stage": 1},
    "zero2": {"distributed.zero_stage": 2},
    "zero3": {"distributed.zero_stage": 3},
    "zero0_actckpt": {"distributed.zero_stage": 0, "distributed.activation_checkpointing": True},
}


def _tensors(obj: Any) -> list:
    import torch

    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _storage_bytes(tensors: list, seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not counted yet (DeepSpeed keeps many
    tensors as views into flat buffers; a buffer counts once, whole)."""
    total = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def held_bytes(engine: Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds right now."""
    seen: set[int] = set()
    module_params = list(engine.module.parameters())
    ids = {id(p) for p in module_params}
    # ZeRO-3 leaves an empty placeholder in p and this rank's shard in p.ds_tensor.
    params = _storage_bytes([p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module_params], seen)
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO wrappers hold the torch optimizer inside
    # Master copies: whatever the torch optimizer steps that is not a model parameter.
    masters = [p for g in base.param_groups for p in g["params"] if id(p) not in ids]
    state = _storage_bytes(_tensors(list(base.state.values())) + masters, seen)
    grad_tensors = [p.grad for p in module_params + masters if p.grad is not None]
    for attr in ("averaged_gradients", "grad_partitions_flat_buffer"):
        grad_tensors += _tensors(getattr(opt, attr, None))
    grads = _storage_bytes(grad_tensors, seen)
    return {"params": params, "grads": grads, "optimizer": state}


def worker(args: argparse.Namespace) -> None:
    from megadalle.config import load_config
    from megadalle.distributed import engine as dist
    from megadalle.training.transformer_trainer import TransformerTrainer

    overrides = {"logging.run_dir": args.run_dir, "logging.progress": False, "logging.tensorboard": False,
                 "precision.mode": args.precision, "train.synthetic_data": True,
                 "train.steps": args.steps, "train.micro_batch_size": args.micro, "train.log_every": 10**6,
                 "train.ema_decay": 0.0, "checkpoint.every_steps": 10**6, "checkpoint.resume": "none",
                 **CONFIGS[args.name]}
    cfg = load_config(args.preset, None, overrides)
    trainer = TransformerTrainer(cfg)
    trainer.setup()
    batches = trainer._batches()
    measured: dict[str, int] = {}

    class Probe:
        """Gradient hook used only to look at what the rank holds after the last backward."""

        def after_backward(self, model: Any) -> bool:
            measured.update(held_bytes(trainer.engine))
            return True

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, d: dict) -> None:
            pass

    t0 = c0 = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
        trainer.gradient_hook = Probe() if step == args.steps - 1 else None
        trainer.train_step(batches)
    dist.barrier()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after_step = held_bytes(trainer.engine)
    n = args.steps - args.warmup
    tokens = n * trainer.global_batch * cfg.transformer.seq_len
    flops = None
    from megadalle.training.transformer_trainer import transformer_flops_per_sample

    peak = dist.device_peak_flops(dist.param_dtype(trainer.engine))
    if peak:
        flops = transformer_flops_per_sample(cfg.transformer) * trainer.tcfg.micro_batch_size * n
    out = {"rank": trainer.rank, "world": trainer.world, "tokens_per_s": tokens / wall,
           "tokens_per_cpu_s": tokens / trainer.world / cpu, "wall_s": wall,
           "peak_memory_bytes": dist.peak_memory_bytes(),
           "params_bytes": measured.get("params", after_step["params"]),
           "grads_bytes": measured.get("grads", 0),
           "optimizer_bytes": max(measured.get("optimizer", 0), after_step["optimizer"]),
           "mfu": (flops / wall / peak) if flops and peak else None,
           "parameters": sum(p.numel() for p in trainer.model.parameters()) if trainer.cfg.distributed.zero_stage < 3
           else None}
    Path(args.part).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.part}.rank{trainer.rank}.json").write_text(json.dumps(out))
    dist.close_distributed()


def fp16_overhead(preset: str, steps: int, batch: int) -> dict[str, float]:
    """Per-resblock fp16 scaling vs plain fp16 with one global loss scale, same model and batch,
    in this process (DeepSpeed refuses fp16 on CPU, so plain fp16 uses torch's GradScaler)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from resblock_scaling import run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = run("fp16", preset, steps, batch, device)
    per_block = run("fp16_per_resblock", preset, steps, batch, device)
    return {"plain_fp16_tokens_per_s": plain["tokens_per_s"],
            "per_resblock_tokens_per_s": per_block["tokens_per_s"],
            "ratio": per_block["tokens_per_s"] / plain["tokens_per_s"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    part = tmp / name
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks),
                "--master_port", str(_free_port())]
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", "--name", name, "--part", str(part),
           "--run_dir", str(tmp / f"run_{name}"), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--micro", str(args.micro), "--preset", args.preset, "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [json.loads(Path(f"{part}.rank{r}.json").read_text()) for r in range(args.ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (fp16 needs a GPU)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/train_<precision>.json (see benchmarks/_results.py)")
    p.add_argument("--fp16-overhead-steps", type=int, default=6,
                   help="steps of the per-resblock vs plain fp16 comparison (0 skips it)")
    # worker mode (launched by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default="zero0", help=argparse.SUPPRESS)
    p.add_argument("--part", default="", help=argparse.SUPPRESS)
    p.add_argument("--run_dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    import torch

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = out_path(args.out, "train", unless(args.preset, "tiny"), args.precision,
                   f"{args.ranks}ranks" if args.ranks != 2 else None, listed(configs, CONFIGS),
                   unless(device, "cpu"))
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            print(f"running {name} on {args.ranks} ranks ...", flush=True)
            results[name] = launch(name, args, Path(tmp))
    mib = 2**20
    base = results.get("zero0")
    base_state = (sum(base[0][k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")) if base else None)
    print(f"\n{args.preset} preset, {args.precision}, {args.ranks} ranks, micro batch {args.micro}, "
          f"{args.steps - args.warmup} timed steps; {platform.processor() or platform.machine()}")
    head = (f"{'config':15s} {'tok/s':>8s} {'tok/cpu-s':>9s} {'peak MiB/rank':>14s} {'params MiB':>10s} "
            f"{'grads MiB':>9s} {'optim MiB':>9s} {'p+g+o MiB':>9s} {'vs zero0':>8s}")
    print(head)
    print("-" * len(head))
    for name, ranks in results.items():
        r0 = ranks[0]
        state = r0["params_bytes"] + r0["grads_bytes"] + r0["optimizer_bytes"]
        peak = "/".join(f"{r['peak_memory_bytes'] / mib:.0f}" for r in ranks)
        ratio = f"{state / base_state:.2f}" if base_state else "-"
        print(f"{name:15s} {r0['tokens_per_s']:8.0f} {r0['tokens_per_cpu_s']:9.0f} {peak:>14s} "
              f"{r0['params_bytes'] / mib:10.2f} {r0['grads_bytes'] / mib:9.2f} {r0['optimizer_bytes'] / mib:9.2f} "
              f"{state / mib:9.2f} {ratio:>8s}")
    # The ratios the README quotes, from rank 0's figures above (computed here so the JSON holds them).
    summary: dict[str, float] = {}
    if base_state:
        for name, ranks in results.items():
            r0 = ranks[0]
            summary[f"{name}_vs_zero0_state"] = (r0["params_bytes"] + r0["grads_bytes"] + r0["optimizer_bytes"]) / base_state
    if "zero0" in results and "zero0_actckpt" in results:
        on, off = results["zero0_actckpt"][0], results["zero0"][0]
        summary.update(actckpt_tokens_per_s_ratio=on["tokens_per_s"] / off["tokens_per_s"],
                       actckpt_tokens_per_cpu_s_ratio=on["tokens_per_cpu_s"] / off["tokens_per_cpu_s"],
                       actckpt_peak_memory_ratio=on["peak_memory_bytes"] / off["peak_memory_bytes"])
        print(f"\nactivation checkpointing (ZeRO-0): tokens/s on/off = {on['tokens_per_s'] / off['tokens_per_s']:.2f} "
              f"(per CPU-second {on['tokens_per_cpu_s'] / off['tokens_per_cpu_s']:.2f}); peak memory on/off = "
              f"{on['peak_memory_bytes'] / off['peak_memory_bytes']:.2f}")
    overhead = None
    if args.fp16_overhead_steps:
        overhead = fp16_overhead(args.preset, args.fp16_overhead_steps, args.micro)
        print(f"\nper-resblock fp16 scaling vs plain fp16 (one process, same model and batch): tokens/s "
              f"{overhead['per_resblock_tokens_per_s']:.0f} vs {overhead['plain_fp16_tokens_per_s']:.0f} "
              f"= {overhead['ratio']:.2f}x")
    if any(r[0].get("mfu") for r in results.values()):
        for name, ranks in results.items():
            print(f"MFU {name}: {ranks[0]['mfu']:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"processor": platform.processor(), "cpus": os.cpu_count(),
                                           "device": device},
                               "command": " ".join(["python", "benchmarks/train.py", *sys.argv[1:]]),
                               "settings": {k: getattr(args, k) for k in ("steps", "warmup", "micro", "ranks",
                                                                          "preset", "precision",
                                                                          "fp16_overhead_steps")},
                               "results": results, "summary": summary,
                               "fp16_per_resblock_vs_fp16": overhead}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
