"""`megadalle demo`: the whole system on the built-in shapes data, in one command.

    build data -> train tokenizer -> train dVAE -> encode -> train transformer -> train reranker
    -> sample a grid for a handful of captions (seen and held-out combinations) -> score

Every stage after the data is the real command (`megadalle <command> --config <run>/demo-config.yaml`)
in its own process, so the demo runs exactly what a user runs by hand, and one stage's memory
or process group never leaks into the next. A stage whose output is complete is skipped, so
re-running resumes; an interrupted trainer resumes from its own latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megadalle.errors import CommandError
from megadalle.config import Config, load_config
from megadalle.run_layout import RunLayout

# The full demo's budget on top of the tiny preset: what fits in 15 minutes on a 2-core CPU
# (README, "The demo", has the measured stage times). The dVAE uses the tiny preset's recipe
# (Gaussian reconstruction, output starting at the white background, 48 px -> 12x12 tokens). At
# 64 px / 8x8 tokens the dVAE rounded the shapes off, which capped the samples matching their
# captions at 64% best-of-16 (measured with the same budget). Tried and not kept: dVAE KL weight 1.
# The reranker decides most held-out (shape, colour) captions: on one transformer's samples,
# 1200 reranker updates instead of 400 picked a matching best-of-32 image for 89% of 36 held-out
# captions instead of 67% (`benchmarks/sampling_recipes.py`), for ~45 s more. Best of 32, the
# paper's "most of the gain", costs seconds here. Tried on the transformer and not kept: a cosine
# learning-rate decay and caption dropout 0.2 with guidance (each lowered the per-sample match),
# learning rate 2e-3 (held-out pairs per sample unchanged at ~23%).
FULL: dict[str, object] = {
    "data.shapes.n_train": 10000,
    "dvae_train.steps": 2000,
    "train.steps": 1200,
    "clip_train.steps": 1200,
    "sampling.n": 32,
    "checkpoint.every_steps": 250,
}
# `--quick`: every stage end to end in a minute or two on 2 cores; plumbing, not quality.
QUICK: dict[str, object] = {
    "data.shapes.n_train": 256,
    "data.shapes.n_val": 64,
    "data.shapes.n_heldout": 64,
    "data.shapes.samples_per_shard": 128,
    "data.shuffle_buffer": 64,
    "dvae_train.steps": 4,
    "dvae_train.micro_batch_size": 8,
    "train.steps": 4,
    "train.micro_batch_size": 8,
    "train.schedule.warmup_steps": 1,
    "clip_train.steps": 4,
    "clip_train.micro_batch_size": 16,
    "clip_train.schedule.warmup_steps": 1,
    "checkpoint.every_steps": 2,
    "sampling.n": 2,
    "sampling.top": 2,
    "sampling.batch_size": 2,
    "logging.tensorboard": False,
}
# The caption set scored at the end: single objects of seen and of held-out (shape, colour)
# combinations, and a few two-object scenes. --quick scores a token few.
EVAL_SET = {"seen": 24, "heldout": 12, "pairs": 6}
QUICK_EVAL_SET = {"seen": 2, "heldout": 1, "pairs": 1}
# The grid: a handful of captions, the first ones of each kind.
GRID_CAPTIONS = {"seen": 4, "heldout": 3, "pairs": 1}


@dataclass
class Stage:
    name: str
    what: str
    run: Callable[[], None]
    done: Callable[[], bool]
    outputs: list[Path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run folder (default: runs/demo, or runs/demo-quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute smoke run of every stage (plumbing, not image quality)")
    parser.add_argument("--force", action="store_true", help="re-run every stage even if its output is complete")


def demo_config(cfg: Config, quick: bool, run_dir: Path) -> Config:
    """The tiny preset with the demo's budget (FULL), unless a preset or config file was chosen;
    then --quick's overrides and the run folder."""
    base = cfg if cfg.preset else load_config("tiny", overrides=FULL)
    overrides: dict[str, object] = dict(QUICK) if quick else {}
    overrides["logging.run_dir"] = str(run_dir)
    return base.replace(**overrides)


def _all_exist(*paths: Path) -> Callable[[], bool]:
    return lambda: all(p.exists() for p in paths)


def _shapes_done(cfg: Config, run_dir: Path) -> bool:
    from megadalle.data.shapes_shards import shapes_image_size, split_count
    from megadalle.data.shards import read_manifest

    sc = cfg.data.shapes
    for split in ("train", "val", "heldout"):
        n = split_count(sc, split)
        if n == 0 or (split == "heldout" and sc.heldout_fraction == 0):
            continue
        d = RunLayout(run_dir).shapes(split)
        m = read_manifest(d)
        if not m or m.get("n") != n or m.get("image_size") != shapes_image_size(cfg) \
                or not all((d / s).is_file() for s in m.get("shards", [])):
            return False
    return True


def _tokens_done(folder: Path) -> bool:
    """`encode` records its source units first and renames each shard into place when complete."""
    from megadalle.data.shards import shard_name

    try:
        units = json.loads((folder / "units.json").read_text())
    except (OSError, ValueError):
        return False
    return all((folder / shard_name(i)).is_file() for i in range(len(units)))


def _command(argv: list[str], env: dict[str, str], name: str) -> Callable[[], None]:
    def run() -> None:
        cmd = [sys.executable, "-m", "megadalle", *argv]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise CommandError(f"demo stage {name!r} failed (exit {rc}) running: megadalle {' '.join(argv)}\n"
                               f"fix the error above and run the demo again; finished stages are skipped")
    return run


def grid_captions(cfg: Config) -> list[str]:
    from megadalle.eval.shapes_accuracy import eval_captions

    g = GRID_CAPTIONS
    cases = eval_captions(cfg, g["seen"], g["heldout"], g["pairs"])
    return [c for c, _ in cases]


def build_stages(cfg: Config, run_dir: Path, cfg_file: Path, quick: bool, env: dict[str, str]) -> list[Stage]:
    from megadalle.data.shapes_shards import ensure_shapes_shards

    c = ["--config", str(cfg_file)]
    ev = QUICK_EVAL_SET if quick else EVAL_SET
    captions_file = run_dir / "demo-captions.txt"
    run = RunLayout(run_dir)
    samples, evaluation = run.samples, run.eval

    def build_data() -> None:
        ensure_shapes_shards(cfg, run_dir, progress=True)

    def encode() -> None:
        for split in ("train", "val"):
            _command(["encode", *c, "--split", split], env, f"encode {split}")()

    def sample() -> None:
        captions_file.write_text("\n".join(grid_captions(cfg)) + "\n")
        _command(["sample", *c, "--ckpt", str(run_dir), "--prompt-file", str(captions_file), "--out", str(samples)],
                 env, "sample")()

    return [
        Stage("data", "render the shapes data set into shards", build_data, lambda: _shapes_done(cfg, run_dir),
              [run.shapes()]),
        Stage("tokenizer", "train the caption BPE", _command(["tokenizer", "train", *c], env, "tokenizer"),
              _all_exist(run.tokenizer), [run.tokenizer]),
        Stage("dvae", "train the discrete VAE (stage 1)", _command(["train-dvae", *c], env, "dvae"),
              _all_exist(*run.export("dvae")), [run.dvae]),
        Stage("encode", "encode the train and val images into dVAE tokens", encode,
              lambda: all(_tokens_done(run.tokens(s)) for s in ("train", "val")), [run.tokens("train").parent]),
        Stage("transformer", "train the transformer (stage 2)", _command(["train", *c], env, "transformer"),
              _all_exist(*run.export("transformer")), [run.transformer]),
        Stage("reranker", "train the contrastive reranker", _command(["train-clip", *c], env, "reranker"),
              _all_exist(*run.export("clip")), [run.clip]),
        Stage("sample", "sample, rerank and grid a handful of captions", sample,
              _all_exist(samples / "samples.json"), [samples / "grid.png"]),
        Stage("eval", "score a caption set (seen / held-out)",
              _command(["eval", *c, "--ckpt", str(run_dir), "--out", str(evaluation),
                        *[f"--{k}={v}" for k, v in ev.items()]], env, "eval"),
              _all_exist(evaluation / "eval.json"), [evaluation / "eval.txt", evaluation / "eval.json"]),
    ]


def _check_same_config(cfg: Config, cfg_file: Path, force: bool) -> None:
    """A run folder belongs to one configuration: resuming under another would mix models."""
    if not cfg_file.is_file() or force:
        return
    old = Config.load(cfg_file)
    if old.to_dict() != cfg.to_dict():
        changed = sorted(k for k in cfg.to_dict() if old.to_dict().get(k) != cfg.to_dict()[k])
        raise CommandError(f"{cfg_file.parent} was made by a demo with different settings (sections: "
                           f"{', '.join(changed)}); use another --out, or delete the folder to start over")


def stage_threads(cpus: int, busy: float) -> int:
    """Threads for each stage (one process at a time): the cores that other work leaves idle.

    On an idle 2-core machine two threads train the transformer 1.76x faster than one
    (`benchmarks/threads.py`). On a busy one, spinning OpenMP threads that compete for cores made the
    dVAE stage 5x slower (8 s/step instead of 1.5 s/step, measured), so the cores already busy
    (measured once before the first stage) are left out; at least one.
    """
    return max(1, min(cpus, cpus - int(round(busy))))


def busy_cpus(window_s: float = 0.5) -> float:
    """How many cores other work keeps busy right now: from /proc/stat over `window_s` (the load
    average lags by a minute, so work that just ended would still count), else the load average."""
    def idle_total() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, all

    first = idle_total()
    if first is None:
        return os.getloadavg()[0]
    time.sleep(window_s)
    second = idle_total()
    if second is None or second[1] <= first[1]:
        return os.getloadavg()[0]
    busy_fraction = 1 - (second[0] - first[0]) / (second[1] - first[1])
    return busy_fraction * (os.cpu_count() or 1)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(args: argparse.Namespace, cfg: Config) -> int:
    run_dir = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    cfg = demo_config(cfg, args.quick, run_dir)
    cfg_file = run_dir / "demo-config.yaml"
    _check_same_config(cfg, cfg_file, args.force)
    cfg.save(cfg_file)
    # Each stage is its own single process: a surrounding launcher's rank layout (or a process
    # group alive in this process) must not make it join someone else's rendezvous.
    from megadalle.distributed.launch import without_launcher_vars

    env = without_launcher_vars(os.environ)
    # The stages import this checkout's code whatever the virtualenv was installed from.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = env.get("OMP_NUM_THREADS") or str(stage_threads(_usable_cpus(), busy_cpus()))
    env["OMP_NUM_THREADS"] = threads
    stages = build_stages(cfg, run_dir, cfg_file, args.quick, env)
    rows: list[dict[str, object]] = []
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    print(f"megadalle demo{' --quick' if args.quick else ''}: {len(stages)} stages into {run_dir} "
          f"({threads} thread(s) per stage; set OMP_NUM_THREADS to choose)", flush=True)
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        if st.done() and not args.force:
            print(f"{head}: already complete, skipped", flush=True)
            rows.append({"stage": st.name, "status": "skipped", "wall_s": 0.0, "cpu_s": 0.0})
            continue
        print(f"{head}: {st.what}", flush=True)
        t, c = time.perf_counter(), _cpu_seconds()
        st.run()
        rows.append({"stage": st.name, "status": "ran", "wall_s": round(time.perf_counter() - t, 1),
                     "cpu_s": round(_cpu_seconds() - c, 1)})
    total = {"wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(_cpu_seconds() - cpu0, 1)}
    summary = {"run_dir": str(run_dir), "quick": args.quick, "stages": rows, "total": total,
               "load_average_1min_at_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
               "threads_per_stage": int(threads)}
    scores = RunLayout(run_dir).eval / "eval.json"
    if scores.is_file():
        rep = json.loads(scores.read_text())
        single = rep.get("best_of_n", {}).get("single_object", {})
        summary["single_object_best_of_n_accuracy"] = {s: single.get(s, {}).get("accuracy")
                                                       for s in ("all", "seen", "heldout")}
    (run_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(run_dir, stages, rows, total, summary)
    return 0


def _print_summary(run_dir: Path, stages: list[Stage], rows: list[dict], total: dict, summary: dict) -> None:
    report = RunLayout(run_dir).eval / "eval.txt"
    if report.is_file():
        print("\n" + report.read_text().rstrip())
    print("\n=== megadalle demo: summary ===")
    for row, st in zip(rows, stages):
        outs = ", ".join(str(p.relative_to(run_dir)) for p in st.outputs)
        print(f"  {st.name:12s} {row['status']:8s} {row['wall_s']:7.1f}s wall {row['cpu_s']:7.1f}s cpu   {outs}")
    print(f"  total        {total['wall_s']:.1f}s wall, {total['cpu_s']:.1f}s cpu "
          f"({summary['threads_per_stage']} thread(s) per stage; load average "
          f"{summary['load_average_1min_at_end']} on {summary['cpus']} cpus)")
    acc = summary.get("single_object_best_of_n_accuracy")
    if acc:
        fmt = {k: ("-" if v is None else f"{v:.0%}") for k, v in acc.items()}
        print(f"  single-object captions, best-of-N match: {fmt['all']} (seen {fmt['seen']}, held-out {fmt['heldout']})")
    print(f"\n  run folder  {run_dir}\n  grid        {run_dir / 'samples' / 'grid.png'}\n"
          f"  scores      {run_dir / 'eval' / 'eval.json'} and eval.txt\n  summary     {run_dir / 'demo-summary.json'}")
