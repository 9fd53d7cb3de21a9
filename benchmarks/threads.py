"""Torch threads per demo stage: the tiny transformer trained with 1 thread vs all cores.

`megadalle demo` gives each stage one thread per idle core (`megadalle.commands.demo.stage_threads`). This
measures what that buys on this machine for the demo's longest stage: each configuration is a real
`megadalle train` process (tiny preset, synthetic tokens) with OMP_NUM_THREADS set, timed by the
trainer's own tokens/s over the logged windows after the first (which includes start-up). Prints
the ratios side by side, measured in the same run, and writes JSON.

    python benchmarks/threads.py [--steps 150] [--threads 1 2]

Writes benchmarks/results/threads.json for the bare run (1 thread vs one per core); another list
of thread counts adds it to the name (threads_1+2+4.json; see benchmarks/_results.py).

Run it on an otherwise idle machine: the point is how the stages scale with the cores they get.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import listed, out_path  # noqa: E402

DEFAULT_THREADS = [1, os.cpu_count() or 1]


def _run(threads: int, steps: int, run_dir: Path) -> float:
    """Steady-state tokens/s of one `megadalle train` process."""
    from megadalle.distributed.launch import without_launcher_vars

    # A single process of its own, like a demo stage.
    env = dict(without_launcher_vars(os.environ), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    log_every = max(steps // 3, 1)
    common = [f"--logging.run_dir={run_dir}", "--logging.progress=false", "--logging.tensorboard=false"]
    argv = ["train", "--preset", "tiny", "--train.synthetic_data=true", f"--train.steps={steps}",
            f"--train.log_every={log_every}", f"--checkpoint.every_steps={steps}", *common]
    metrics = run_dir / "transformer" / "metrics.jsonl"
    subprocess.run([sys.executable, "-m", "megadalle", *argv], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if len(rates) < 2:
        raise SystemExit(f"expected at least 2 logged windows in {metrics}, got {len(rates)}")
    return sum(rates[1:]) / len(rates[1:])  # the first window includes start-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, nargs="+", default=DEFAULT_THREADS)
    p.add_argument("--out", default=None, help="default: benchmarks/results/threads[_<threads>].json")
    a = p.parse_args()
    results: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.threads:
            results[str(t)] = _run(t, a.steps, Path(tmp) / f"threads-{t}")
            print(f"  {t} thread(s): {results[str(t)]:10.0f} tokens/s", flush=True)
    base = str(a.threads[0])
    ratios = {t: v / results[base] for t, v in results.items()}
    print(f"\ntiny transformer tokens/s relative to {base} thread(s), {a.steps} steps, {os.cpu_count()} cores: "
          + "  ".join(f"{t} threads {r:.2f}x" for t, r in ratios.items()))
    out = out_path(a.out, "threads", listed(a.threads, DEFAULT_THREADS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "steps": a.steps, "tokens_per_s": results, "ratio_to_first": ratios,
                               "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
