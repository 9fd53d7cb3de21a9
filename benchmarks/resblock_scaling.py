"""Cost of per-resblock fp16 gradient scaling, side by side with plain fp16 and bf16.

Times forward+backward+optimizer steps of the same transformer under: fp32; bf16 autocast;
plain fp16 autocast with one global loss scale (torch's GradScaler); and fp16 with a scale per
resblock (megadalle.distributed.resblock_scaling). Prints tokens/s and the ratio to plain fp16,
and writes JSON. On CPU, fp16 matmuls are emulated and slow, so the meaningful figure is the
ratio of the two fp16 modes (the extra work of per-block scaling), not fp16 vs bf16.

    python benchmarks/resblock_scaling.py [--preset tiny] [--steps 10] [--batch 4]

Writes benchmarks/results/resblock_scaling.json for the tiny preset on CPU; another preset or a GPU
add their value to the name (resblock_scaling_small_cuda.json; see benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megadalle.config import PrecisionConfig, load_config
from megadalle.distributed.resblock_scaling import install
from megadalle.transformer.model import DALLETransformer


def run(mode: str, preset: str, steps: int, batch: int, device: str) -> dict[str, float]:
    cfg = load_config(preset)
    t = cfg.transformer
    torch.manual_seed(0)
    model = DALLETransformer(t).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, t.text_vocab_size, (batch, t.text_len), generator=g).to(device)
    codes = torch.randint(0, t.image_vocab_size, (batch, t.image_len), generator=g).to(device)
    scaler = install(model, PrecisionConfig(mode="fp16_per_resblock")) if mode == "fp16_per_resblock" else None
    amp_scaler = torch.amp.GradScaler(device) if mode == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    skipped = 0

    def step() -> None:
        nonlocal skipped
        opt.zero_grad(set_to_none=True)
        if dtype is not None:
            with torch.autocast(device, dtype=dtype):
                loss = model.loss(text, codes)["loss"]
        else:
            loss = model.loss(text, codes)["loss"]
        if amp_scaler is not None:
            amp_scaler.scale(loss).backward()
            amp_scaler.step(opt)
            amp_scaler.update()
            return
        loss.backward()
        if scaler is None or scaler.after_backward(model):
            opt.step()
        else:
            skipped += 1

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = steps * batch * t.seq_len
    return {"tokens_per_s": tokens / elapsed, "seconds_per_step": elapsed / steps, "skipped": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/resblock_scaling[_<config>].json")
    args = ap.parse_args()
    from _results import out_path, unless  # benchmarks/ is on sys.path when this runs as a script

    out = out_path(args.out, "resblock_scaling", unless(args.preset, "tiny"), unless(args.device, "cpu"))
    results = {m: run(m, args.preset, args.steps, args.batch, args.device)
                for m in ("fp32", "bf16", "fp16", "fp16_per_resblock")}
    base = results["fp16"]["tokens_per_s"]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"preset={args.preset} batch={args.batch} steps={args.steps} on {machine}")
    print(f"{'mode':<20}{'tokens/s':>12}{'vs plain fp16':>16}")
    for mode, r in results.items():
        print(f"{mode:<20}{r['tokens_per_s']:>12.1f}{r['tokens_per_s'] / base:>15.2f}x")
    overhead = 1 - results["fp16_per_resblock"]["tokens_per_s"] / base
    print(f"per-resblock scaling costs {overhead * 100:.1f}% of plain fp16 throughput")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "batch": args.batch, "steps": args.steps, "machine": machine,
                               "results": results, "overhead_vs_fp16": overhead}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
