"""Attention backends side by side: time per mask at the paper's stream and at the tiny preset.

For each layer type (row, column, conv, full) and each stream geometry, prints the mask's
densities and the time of forward and forward+backward for every backend that runs here:

    dense           SDPA with the boolean mask (the reference)
    flex            torch.compile(flex_attention) with the MaskSet's cached BlockMask (the one the
                    model's flex backend uses: flex's 128 tile on GPU, --flex-block to change it;
                    forward only on CPU: this torch has no FlexAttention backward on CPU)
    blocksparse     megadalle.ops.block_sparse_attention (the csrc/ kernel), when that module exists
    causal          (only when asked for) SDPA with is_causal=True: dense causal attention with
                    PyTorch's fused kernels, the speed a sparse kernel has to beat; it computes the
                    causal mask, not the layer's
    blocksparse-tc  (only when asked for) the csrc/ kernel's tensor-core path
                    (block_sparse_attention.use_tensor_cores; the same as blocksparse on CPU)

    python benchmarks/attention.py [--batch 1 --heads 2 --repeats 3]
    python benchmarks/attention.py --batch 8 --heads 8 --dtype bfloat16 --geometries paper \
        --masks row,column,conv --backends blocksparse,flex,causal,dense      # the GPU check's run

A backend that fails records its error in the JSON ("errors") and the others still run.
Writes benchmarks/results/attention.json on CPU, attention_cuda.json on a GPU; options that change
what is measured (dtype, backends, masks, geometries) add their value to the name (see
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

from _results import listed, out_path, unless  # noqa: E402
from megadalle.config import ATTENTION_TYPES, load_config  # noqa: E402
from megadalle.transformer.attention import attention, block_sparse_available  # noqa: E402
from megadalle.transformer.masks import MaskGeometry, mask_set  # noqa: E402

DEFAULT_BACKENDS = ("dense", "flex", "blocksparse")
ALL_BACKENDS = DEFAULT_BACKENDS + ("causal", "blocksparse-tc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds. On a shared CPU machine the wall time depends on the
    other users; the CPU time of a single-threaded run does not."""
    fn()  # warm-up (and compilation for flex)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _run(backend: str, q, k, v, ms, block_size: int, flex_block: int, compile_flex: bool = True):
    """One call of `backend` on q/k/v (raster order) under the MaskSet `ms`."""
    if backend == "causal":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "flex" and flex_block:
        from megadalle.transformer.attention import _flex

        perm = ms.on("perm", q.device) if ms.perm is not None else None
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))
        out = _flex(q, k, v, ms.flex_block_mask(q.device, flex_block), q.shape[-1] ** -0.5, compile_flex)
        return out.index_select(2, ms.on("inv_perm", q.device)) if perm is not None else out
    if backend == "blocksparse-tc":
        from megadalle.ops import block_sparse_attention as bsa

        before = bsa.tensor_cores_enabled()
        bsa.use_tensor_cores(True)
        try:
            return attention(q, k, v, ms, "blocksparse", block_size=block_size)
        finally:
            bsa.use_tensor_cores(before)
    return attention(q, k, v, ms, backend, block_size=block_size, compile_flex=compile_flex)


def bench_geometry(name: str, geometry: MaskGeometry, head_dim: int, block_size: int, args, device) -> dict:
    S = geometry.seq_len
    backends = args.backend_list
    dtype = DTYPES[args.dtype]
    out = {"seq_len": S, "text_len": geometry.text_len, "grid": geometry.grid, "head_dim": head_dim,
           "batch": args.batch, "heads": args.heads, "block_size": block_size, "dtype": args.dtype, "masks": {}}
    for kind in args.mask_list:
        ms = mask_set(geometry, kind, S)
        row = {**ms.density(), "layout_block_density": ms.layout(block_size).block_density, "times_s": {},
               "cpu_times_s": {}, "errors": {}}
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, S, head_dim, generator=g).to(device, dtype) for _ in range(3))
        for backend in backends:
            def fwd():
                with torch.no_grad():
                    _run(backend, q, k, v, ms, block_size, args.flex_block, not args.eager_flex)

            def fwd_bwd():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                _run(backend, qq, kk, vv, ms, block_size, args.flex_block, not args.eager_flex).float().sum().backward()

            t, c = {}, {}
            try:
                t["forward"], c["forward"] = _time(fwd, args.repeats)
                if backend == "flex" and device.type == "cpu":
                    t["forward_backward"] = c["forward_backward"] = None  # no FlexAttention backward on CPU
                else:
                    t["forward_backward"], c["forward_backward"] = _time(fwd_bwd, args.repeats)
            except Exception as e:  # noqa: BLE001 - one backend's failure must not lose the others' figures
                msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
                row["errors"][backend] = msg
                t = {"forward": t.get("forward"), "forward_backward": t.get("forward_backward")}
                c = {"forward": c.get("forward"), "forward_backward": c.get("forward_backward")}
                print(f"  {name:6s} {kind:7s} {backend:14s} FAILED: {msg}", flush=True)
            row["times_s"][backend], row["cpu_times_s"][backend] = t, c
            if backend not in row["errors"]:
                print(f"  {name:6s} {kind:7s} {backend:14s} fwd {t['forward'] * 1e3:9.2f} ms   fwd+bwd "
                      + (f"{t['forward_backward'] * 1e3:9.2f} ms" if t["forward_backward"] is not None else "      n/a")
                      + " (wall)", flush=True)
        if not row["errors"]:
            del row["errors"]
        out["masks"][kind] = row
    return out


def _ms(x: float | None) -> str:
    return f"{x * 1e3:.2f} ms" if x is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--geometries", default="paper,tiny", help="comma-separated: paper, tiny")
    ap.add_argument("--masks", default=",".join(ATTENTION_TYPES), help="comma-separated layer types")
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, from {', '.join(ALL_BACKENDS)} (default: {', '.join(DEFAULT_BACKENDS)}; "
                         "blocksparse only where its module exists)")
    ap.add_argument("--flex-block", type=int, default=0,
                    help="BlockMask block size for flex (default 0: as the model, 128 on GPU)")
    ap.add_argument("--eager-flex", action="store_true",
                    help="run flex_attention uncompiled (a quick check only: eager flex materialises the scores)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/attention[_<config>].json")
    args = ap.parse_args(argv)
    if args.backends is None:
        args.backend_list = [b for b in DEFAULT_BACKENDS if b != "blocksparse" or block_sparse_available()]
    else:
        args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backend_list if b not in ALL_BACKENDS]
    args.mask_list = [m.strip() for m in args.masks.split(",") if m.strip()]
    bad += [m for m in args.mask_list if m not in ATTENTION_TYPES]
    wanted = [g.strip() for g in args.geometries.split(",") if g.strip()]
    bad += [g for g in wanted if g not in ("paper", "tiny")]
    if bad or not (args.backend_list and args.mask_list and wanted):
        ap.error(f"unknown or empty --backends/--masks/--geometries: {bad}")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paper = load_config().transformer  # 256 text + 32x32 image, head dim 64
    tiny = load_config("tiny").transformer
    geometries = [("paper", MaskGeometry.from_config(paper), paper.head_dim, paper.block_size),
                  ("tiny", MaskGeometry.from_config(tiny), tiny.head_dim, tiny.block_size)]
    geometries = [g for g in geometries if g[0] in wanted]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))",
              "torch": torch.__version__, "dtype": args.dtype, "backends": args.backend_list,
              "flex_block": args.flex_block or (128 if device.type == "cuda" else "layout block size"),
              "flex_compiled": not args.eager_flex,
              "geometries": {}}
    print(f"device: {result['device']}; batch {args.batch}, heads {args.heads}, {args.dtype}, "
          f"median of {args.repeats}")
    for name, g, hd, bs in geometries:
        result["geometries"][name] = bench_geometry(name, g, hd, bs, args, device)

    backends = args.backend_list
    key = "cpu_times_s" if device.type == "cpu" else "times_s"
    print(f"\n{'process CPU time' if device.type == 'cpu' else 'wall time'}, median of {args.repeats}:")
    print("mask     stream  density(causal) image->image  blocks@bs"
          + "".join(f"{b + ' fwd':>17s}{b + ' fwd+bwd':>21s}" for b in backends))
    for name, geo in result["geometries"].items():
        for kind, row in geo["masks"].items():
            cells = ""
            for b in backends:
                t = row[key][b]
                cells += f"{_ms(t['forward']):>17s}{_ms(t['forward_backward']):>21s}"
            print(f"{kind:8s} {name:7s} {row['of_causal']:14.3f} {row['image_of_causal']:13.3f} "
                  f"{row['layout_block_density']:9.3f}{cells}")
    default_backends = [b for b in DEFAULT_BACKENDS if b != "blocksparse" or block_sparse_available()]
    out = out_path(args.out, "attention", unless(args.dtype, "float32"), listed(args.backend_list, default_backends),
                   listed(args.mask_list, ATTENTION_TYPES), listed(wanted, ["paper", "tiny"]),
                   unless(device.type, "cpu"))
    from megadalle.transformer import attention as attention_module

    if "flex" in backends and attention_module._compile_failed:
        result["flex_compile_failed"] = True  # the flex figures are eager flex's (a warning said why)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
