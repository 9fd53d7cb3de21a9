"""dVAE training throughput and peak memory: the tiny preset vs the paper's (full) dVAE.

Each preset runs in its own subprocess (so that peak memory is its own): a few AdamW training
steps of the dVAE objective (Gumbel-softmax, logit-Laplace, KL) on random images, after one
warm-up step. The full preset is measured at batch 1 (on CPU a forward/backward of the 98M
parameter model at 256 px already takes seconds). Prints both side by side and writes JSON.

    python benchmarks/dvae.py [--tiny-batch 32] [--steps 3] [--device cuda]

Writes benchmarks/results/dvae.json on CPU, dvae_<device>.json otherwise (see benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    # ru_maxrss is KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(preset: str, batch: int, steps: int, device: str) -> dict:
    import torch

    from megadalle.config import load_config
    from megadalle.dvae.model import DiscreteVAE, count_parameters

    cfg = load_config(preset if preset != "full" else None).dvae
    torch.manual_seed(0)
    dev = torch.device(device)
    base_rss = _rss_gb()
    model = DiscreteVAE(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev)

    def step() -> None:
        out = model.loss(x, temperature=1.0, kl_weight=cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()  # warm-up: allocator, optimizer state
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    result = {
        "preset": preset, "device": device, "threads": torch.get_num_threads(), "batch": batch, "steps": steps,
        "image_size": cfg.image_size, "grid": cfg.grid_size, "vocab_size": cfg.vocab_size,
        "encoder_params": count_parameters(model.encoder), "decoder_params": count_parameters(model.decoder),
        "seconds_per_step": seconds, "images_per_s": batch / seconds,
        "peak_rss_gb": _rss_gb(), "rss_growth_gb": _rss_gb() - base_rss,
    }
    if dev.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _child(preset: str, batch: int, steps: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--one", preset, "--batch", str(batch), "--steps", str(steps), "--device", device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark of {preset} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="default: benchmarks/results/dvae[_<device>].json")
    p.add_argument("--tiny-batch", type=int, default=0, help="0: the tiny preset's dvae_train.micro_batch_size")
    p.add_argument("--full-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per preset (after one warm-up)")
    p.add_argument("--full-steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.steps, a.device)))
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import out_path, unless
    from megadalle.config import load_config

    tiny_batch = a.tiny_batch or load_config("tiny").dvae_train.micro_batch_size
    tiny = _child("tiny", tiny_batch, a.steps, a.device)
    full = _child("full", a.full_batch, a.full_steps, a.device)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.device}"
    rows = [("image size -> grid, codes", lambda r: f"{r['image_size']} -> {r['grid']}x{r['grid']}, {r['vocab_size']}"),
            ("encoder / decoder params", lambda r: f"{r['encoder_params'] / 1e6:.2f}M / {r['decoder_params'] / 1e6:.2f}M"),
            ("batch", lambda r: str(r["batch"])),
            ("s per training step", lambda r: f"{r['seconds_per_step']:.3f}"),
            ("training images/s", lambda r: f"{r['images_per_s']:.2f}"),
            ("peak RSS (GB)", lambda r: f"{r['peak_rss_gb']:.2f}"),
            ("RSS growth in model+train (GB)", lambda r: f"{r['rss_growth_gb']:.2f}")]
    print(f"dVAE training step, {machine} ({tiny['threads']} torch threads)")
    print(f"{'':34}{'tiny':>24}{'full (paper)':>24}")
    for name, f in rows:
        print(f"{name:34}{f(tiny):>24}{f(full):>24}")
    print(f"full / tiny time per image: {tiny['images_per_s'] / full['images_per_s']:.0f}x")
    out = out_path(a.out, "dvae", unless(a.device, "cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "tiny": tiny, "full": full,
                               "full_over_tiny_seconds_per_image": tiny["images_per_s"] / full["images_per_s"]},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
