"""Attention backends side by side: time per mask at the paper's stream and at the tiny preset.

For each layer type (row, column, conv, full) and each stream geometry, prints the mask's
densities and the time of forward and forward+backward for every backend that runs here:

    dense        SDPA with the boolean mask (the reference)
    flex         torch.compile(flex_attention) with the cached BlockMask (forward only on CPU:
                 this torch has no FlexAttention backward on CPU)
    blocksparse  megadalle.ops.block_sparse_attention, when that module exists

    python benchmarks/attention.py [--batch 1 --heads 2 --repeats 3]

Writes benchmarks/results/attention.json on CPU, attention_cuda.json on a GPU (see
benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import out_path, unless  # noqa: E402
from megadalle.config import ATTENTION_TYPES, load_config  # noqa: E402
from megadalle.transformer.attention import attention, block_sparse_available  # noqa: E402
from megadalle.transformer.masks import MaskGeometry, mask_set  # noqa: E402


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds. On a shared CPU machine the wall time depends on the
    other users; the CPU time of a single-threaded run does not."""
    fn()  # warm-up (and compilation for flex)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_geometry(name: str, geometry: MaskGeometry, head_dim: int, block_size: int, args, device) -> dict:
    S = geometry.seq_len
    backends = ["dense", "flex"] + (["blocksparse"] if block_sparse_available() else [])
    out = {"seq_len": S, "text_len": geometry.text_len, "grid": geometry.grid, "head_dim": head_dim,
           "batch": args.batch, "heads": args.heads, "block_size": block_size, "masks": {}}
    for kind in ATTENTION_TYPES:
        ms = mask_set(geometry, kind, S)
        row = {**ms.density(), "layout_block_density": ms.layout(block_size).block_density, "times_s": {},
               "cpu_times_s": {}}
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, S, head_dim, generator=g).to(device) for _ in range(3))
        for backend in backends:
            kw = {"block_size": block_size, "compile_flex": True}

            def fwd():
                with torch.no_grad():
                    attention(q, k, v, ms, backend, **kw)

            def fwd_bwd():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                attention(qq, kk, vv, ms, backend, **kw).sum().backward()

            t, c = {}, {}
            t["forward"], c["forward"] = _time(fwd, args.repeats)
            if backend == "flex" and device.type == "cpu":
                t["forward_backward"] = c["forward_backward"] = None  # no FlexAttention backward on CPU
            else:
                t["forward_backward"], c["forward_backward"] = _time(fwd_bwd, args.repeats)
            row["times_s"][backend], row["cpu_times_s"][backend] = t, c
            print(f"  {name:6s} {kind:7s} {backend:12s} fwd {t['forward'] * 1e3:9.2f} ms   fwd+bwd "
                  + (f"{t['forward_backward'] * 1e3:9.2f} ms" if t["forward_backward"] is not None else "      n/a")
                  + " (wall)", flush=True)
        out["masks"][kind] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/attention[_cuda].json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paper = load_config().transformer  # 256 text + 32x32 image, head dim 64
    tiny = load_config("tiny").transformer
    geometries = [("paper", MaskGeometry.from_config(paper), paper.head_dim, paper.block_size),
                  ("tiny", MaskGeometry.from_config(tiny), tiny.head_dim, tiny.block_size)]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))",
              "torch": torch.__version__, "geometries": {}}
    print(f"device: {result['device']}; batch {args.batch}, heads {args.heads}, median of {args.repeats}")
    for name, g, hd, bs in geometries:
        result["geometries"][name] = bench_geometry(name, g, hd, bs, args, device)

    backends = list(next(iter(result["geometries"].values()))["masks"]["row"]["times_s"])
    key = "cpu_times_s" if device.type == "cpu" else "times_s"
    print(f"\n{'process CPU time' if device.type == 'cpu' else 'wall time'}, median of {args.repeats}:")
    print("mask     stream  density(causal) image->image  blocks@bs"
          + "".join(f"{b + ' fwd':>17s}{b + ' fwd+bwd':>21s}" for b in backends))
    for name, geo in result["geometries"].items():
        for kind, row in geo["masks"].items():
            cells = ""
            for b in backends:
                t = row[key][b]
                fb = t["forward_backward"]
                cells += f"{t['forward'] * 1e3:14.2f} ms" + (f"{fb * 1e3:18.2f} ms" if fb is not None else f"{'n/a':>21s}")
            print(f"{kind:8s} {name:7s} {row['of_causal']:14.3f} {row['image_of_causal']:13.3f} "
                  f"{row['layout_block_density']:9.3f}{cells}")
    out = out_path(args.out, "attention", unless(device.type, "cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
