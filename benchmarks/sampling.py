"""Image tokens per second: KV-cached generation against full recomputation, same model and batch.

Cached: one real `generate(...)` of whole images (prompt pass included), timed end to end.

Uncached: step j of recomputation runs the whole stream of T + 1 + j positions, so a full
1024-token image on CPU takes tens of minutes at the `small` preset. Unless --full-uncached is
given, the benchmark times that step (`model.hidden` + the image head, exactly what
`generate(use_cache=False)` runs per token) at --uncached-points stream lengths spread over the
image, and integrates the per-step time over all N steps (trapezoid rule) to estimate the
full-image time. It also runs the real uncached `generate` for the last --check-steps tokens
(an image prefix given) and reports how far the estimate is from that measurement.

The JSON lists under "estimated" every key whose value rests on the estimate (the uncached time
and the speed-ups computed from it) and under "measured" the ones timed for real; with
--full-uncached nothing is estimated.

    python benchmarks/sampling.py [--preset small --batch 2]

Writes benchmarks/results/sampling.json for the small preset on CPU with the estimate; another
preset, a GPU or --full-uncached add their value to the name (sampling_tiny_full-uncached.json;
see benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import out_path, unless, write_result  # noqa: E402
from megadalle.config import load_config  # noqa: E402
from megadalle.transformer.model import DALLETransformer, count_parameters  # noqa: E402
from megadalle.transformer.sampling import generate  # noqa: E402


class _Timer:
    """Wall and process CPU time. On a shared CPU machine the wall time depends on the other
    users; the CPU time of a single-threaded run does not, so both are reported."""

    def __enter__(self) -> "_Timer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    ap.add_argument("--uncached-points", type=int, default=5, help="stream lengths timed for the estimate")
    ap.add_argument("--check-steps", type=int, default=4, help="real uncached steps at the end of the image")
    ap.add_argument("--full-uncached", action="store_true", help="run the whole uncached generation for real")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/sampling[_<config>].json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = load_config(args.preset).transformer
    model = DALLETransformer(cfg).to(device).eval()
    B, N, T = args.batch, cfg.image_len, cfg.text_len
    text = torch.randint(1, cfg.text_vocab_size, (B, T), device=device)
    text[:, T // 4:] = 0
    dev_name = (torch.cuda.get_device_name() if device.type == "cuda" else
                f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))")
    print(f"device: {dev_name}; preset {args.preset} ({count_parameters(model) / 1e6:.1f}M parameters, "
          f"{cfg.depth} layers, d {cfg.dim}); batch {B}; {N} image tokens after {T} text tokens")

    with _Timer() as t:
        codes = generate(model, text, generator=torch.Generator(device=device).manual_seed(0))
    cached = {"seconds": t.wall, "cpu_seconds": t.cpu}
    print(f"cached:   {t.wall:8.1f} s wall, {t.cpu:8.1f} s CPU for {B} x {N} tokens (measured)")

    result = {"device": dev_name, "torch": torch.__version__, "preset": args.preset, "batch": B,
              "image_tokens": N, "text_tokens": T, "parameters": count_parameters(model),
              "cached": cached}
    if args.full_uncached:
        with _Timer() as t:
            generate(model, text, generator=torch.Generator(device=device).manual_seed(0), use_cache=False)
        result["uncached"] = {"seconds": t.wall, "cpu_seconds": t.cpu, "method": "measured: full uncached generation"}
        result["estimated"] = []
        result["measured"] = ["cached", "uncached", "speedup_wall", "speedup_cpu"]
        print(f"uncached: {t.wall:8.1f} s wall, {t.cpu:8.1f} s CPU (measured)")
    else:
        # Step j feeds j image tokens; time it at a few j and integrate over j = 0 .. N-1.
        points = sorted({round(i * (N - 1) / (args.uncached_points - 1)) for i in range(args.uncached_points)})
        wall, cpu = {}, {}
        with torch.no_grad():
            for j in points:
                with _Timer() as t:
                    model.image_logits(model.hidden(text, codes[:, :j])[:, -1])
                wall[j], cpu[j] = t.wall, t.cpu
                print(f"  uncached step at {T + 1 + j:5d} positions: {t.wall * 1e3:9.1f} ms wall, "
                      f"{t.cpu * 1e3:9.1f} ms CPU", flush=True)

        def integrate(f: dict[int, float]) -> float:
            return sum((f[a] + f[b]) / 2 * (b - a) for a, b in zip(points, points[1:])) + f[points[-1]]

        # Reality check: the real uncached path for the last few tokens vs the estimate for them.
        with _Timer() as t:
            generate(model, text, prefix_codes=codes[:, :N - args.check_steps], use_cache=False,
                     generator=torch.Generator(device=device).manual_seed(0))
        check = {"steps": args.check_steps, "measured_s": t.wall, "measured_cpu_s": t.cpu,
                 "estimated_s": args.check_steps * wall[points[-1]],
                 "estimated_cpu_s": args.check_steps * cpu[points[-1]]}
        check["measured_over_estimated"] = check["measured_s"] / check["estimated_s"]
        check["measured_over_estimated_cpu"] = check["measured_cpu_s"] / check["estimated_cpu_s"]
        result["uncached"] = {
            "seconds": integrate(wall), "cpu_seconds": integrate(cpu),
            "method": f"estimated: per-step time measured at {len(points)} stream lengths, integrated over "
                      f"{N} steps (trapezoid)",
            "per_step_s": {str(T + 1 + j): wall[j] for j in points},
            "per_step_cpu_s": {str(T + 1 + j): cpu[j] for j in points}, "check": check}
        # Which figures are estimates: the uncached totals and everything computed from them.
        result["estimated"] = ["uncached.seconds", "uncached.cpu_seconds", "uncached.tokens_per_s",
                               "uncached.tokens_per_cpu_s", "speedup_wall", "speedup_cpu"]
        result["measured"] = ["cached", "uncached.per_step_s", "uncached.per_step_cpu_s", "uncached.check"]
        print(f"uncached: {integrate(wall):8.1f} s wall, {integrate(cpu):8.1f} s CPU for {B} x {N} tokens "
              f"(estimated). Check: the real uncached generate of the last {args.check_steps} tokens took "
              f"{check['measured_cpu_s']:.1f} s CPU vs {check['estimated_cpu_s']:.1f} s from the per-step times")
    u = result["uncached"]
    for key in ("seconds", "cpu_seconds"):
        result["cached"]["tokens_per_s" if key == "seconds" else "tokens_per_cpu_s"] = B * N / cached[key]
        u["tokens_per_s" if key == "seconds" else "tokens_per_cpu_s"] = B * N / u[key]
    result["speedup_wall"] = u["seconds"] / cached["seconds"]
    result["speedup_cpu"] = u["cpu_seconds"] / cached["cpu_seconds"]
    print(f"\n{'':10s}{'tokens/s (wall)':>17s}{'tokens/s (CPU)':>17s}")
    print(f"cached    {result['cached']['tokens_per_s']:17.2f}{result['cached']['tokens_per_cpu_s']:17.2f}")
    print(f"uncached  {u['tokens_per_s']:17.2f}{u['tokens_per_cpu_s']:17.2f}")
    print(f"ratio     {result['speedup_wall']:16.1f}x{result['speedup_cpu']:16.1f}x  (target >= 10x)"
          + ("; uncached time and ratios estimated" if result["estimated"] else "; measured"))
    out = out_path(args.out, "sampling", unless(args.preset, "small"), unless(device.type, "cpu"),
                   "full-uncached" if args.full_uncached else None)
    write_result(out, result, "sampling", sys.argv[1:] if argv is None else argv, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
