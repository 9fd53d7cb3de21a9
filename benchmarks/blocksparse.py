"""The block-sparse kernel against its alternatives, forward and forward+backward, per DALL-E mask.

On CUDA (bf16 by default):
    kernel   megadalle.ops.block_sparse_attention (the CUDA extension)
    flex     torch.compile(flex_attention) with the same BlockMask (same mask, same block size)
    sdpa     dense causal scaled_dot_product_attention (is_causal=True: the FlashAttention
             backend; it computes the causal triangle, not the sparse mask)
On CPU (fp32 by default):
    kernel   the C++ implementation of the same op
    ref      the pure-PyTorch reference (dense scores under the element mask; also the fallback)
    sdpa     dense causal scaled_dot_product_attention

Shapes: `paper` = 256 text + 32x32 image tokens, head dim 64, block 64 (B=8, 8 heads on CUDA;
B=1, 2 heads on CPU unless --batch/--heads are given); `tiny` = the tiny preset's stream.
Column layers run on the transposed grid, as in the model (the mask the kernel sees).
Speed-ups are ratios of times measured in this run: `x_vs_flex` = flex / kernel,
`x_vs_sdpa` = sdpa / kernel (> 1: the kernel is faster).

    python benchmarks/blocksparse.py [--preset paper,tiny] [--dtype bf16]

Writes benchmarks/results/blocksparse_<dtype>.json (blocksparse_fp32.json on CPU by default); a
subset of --preset or a GPU add their value to the name (blocksparse_bf16_cuda.json; see
benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import listed, out_path, write_result  # noqa: E402
from megadalle.config import load_config  # noqa: E402
from megadalle.ops import block_sparse_attention as bsa  # noqa: E402
from megadalle.transformer.masks import MaskGeometry, mask_set  # noqa: E402

KINDS = ("row", "column", "conv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timer(device: torch.device):
    def measure(fn, repeats: int) -> float:
        fn()  # warm-up: compilation (flex), extension load, caches
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def _backends(device: torch.device, ms, block_size: int, scale: float) -> dict:
    layout = ms.layout(block_size)
    bsa.prepare_layout(layout, device)
    backends = {"kernel": lambda q, k, v: bsa.block_sparse_attention(q, k, v, layout, scale)}
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = ms.flex_block_mask(device, block_size)
        backends["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
    else:
        backends["ref"] = lambda q, k, v: bsa.block_sparse_attention_reference(q, k, v, layout, scale)
    backends["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return backends


def bench_shape(name: str, g: MaskGeometry, head_dim: int, block_size: int, batch: int, heads: int,
                dtype: torch.dtype, repeats: int, device: torch.device) -> dict:
    S = g.seq_len
    measure = _timer(device)
    scale = head_dim ** -0.5
    out = {"seq_len": S, "batch": batch, "heads": heads, "head_dim": head_dim, "block_size": block_size,
           "dtype": str(dtype).replace("torch.", ""), "masks": {}}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, S, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    dout = torch.randn(q.shape, generator=gen).to(device, dtype)
    for kind in KINDS:
        ms = mask_set(g, kind, S)
        row = {"layout_block_density": ms.layout(block_size).block_density, "forward_s": {},
               "forward_backward_s": {}}
        for backend, fn in _backends(device, ms, block_size, scale).items():
            def fwd():
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), dout)

            row["forward_s"][backend] = measure(fwd, repeats)
            row["forward_backward_s"][backend] = measure(fwd_bwd, repeats)
        for phase in ("forward_s", "forward_backward_s"):
            t = row[phase]
            row[phase.replace("_s", "_ratios")] = {f"x_vs_{b}": t[b] / t["kernel"] for b in t if b != "kernel"}
        out["masks"][kind] = row
        cells = "  ".join(f"{b} {row['forward_s'][b] * 1e3:8.2f}/{row['forward_backward_s'][b] * 1e3:8.2f}"
                          for b in row["forward_s"])
        ratios = "  ".join(f"{k} {v:5.2f}" for k, v in row["forward_backward_ratios"].items())
        print(f"{name:6s} {kind:7s} blocks {row['layout_block_density']:.3f}  ms fwd/fwd+bwd: {cells}  "
              f"fwd+bwd speed-up: {ratios}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper,tiny", help="comma list of: paper, tiny")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU (paper shape)")
    ap.add_argument("--heads", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/blocksparse_<dtype>[_<config>].json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = DTYPES[dtype_name]
    batch, heads = args.batch or (8 if cuda else 1), args.heads or (8 if cuda else 2)
    if not bsa.load_extension():
        print(f"note: the extension is not available ({bsa.extension_info()}); 'kernel' is the reference")
    shapes = {}
    for name in (p.strip() for p in args.preset.split(",") if p.strip()):
        if name not in ("paper", "tiny"):
            ap.error(f"--preset {name!r}: choose paper or tiny")
        cfg = load_config(None if name == "paper" else "tiny").transformer
        shapes[name] = (MaskGeometry.from_config(cfg), cfg.head_dim, cfg.block_size)
    result = {"device": torch.cuda.get_device_name() if cuda else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))",
              "torch": torch.__version__, "extension": bsa.extension_info(), "repeats": args.repeats, "shapes": {}}
    print(f"device: {result['device']}; {result['extension']}; median of {args.repeats}")
    for name, (g, head_dim, block_size) in shapes.items():
        # The tiny preset is tiny: batch it like its training config would.
        b = batch if name == "paper" else max(batch, 8)
        result["shapes"][name] = bench_shape(name, g, head_dim, block_size, b, heads, dtype, args.repeats, device)
    out = out_path(args.out, "blocksparse", listed(shapes, ("paper", "tiny")), dtype_name, "cuda" if cuda else None)
    write_result(out, result, "blocksparse", sys.argv[1:] if argv is None else argv, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
