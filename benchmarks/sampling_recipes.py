"""Sampling recipes on one trained run: best-of-N, temperature, reranker training length.

How many samples to rerank, at what temperature, and with a reranker trained for how long.

Each recipe is a real `megadalle eval` process on the same run folder and the same caption set
(seen and held-out single-object captions of the shapes data), so the rows differ only in the
sampling settings or the reranker. With --clip-steps, a reranker is trained for each length
(real `megadalle train-clip` processes on the run's data and settings) and every recipe is
scored with each; the transformer's samples are the same for all rerankers (same seed), so those
rows differ only in which sample the reranker picks. Prints, side by side, the best-of-N match
after reranking (all / seen / held-out), the match of every sample before reranking, and the time
relative to the first row; writes JSON.

    python benchmarks/sampling_recipes.py --run runs/demo [--seen 24 --heldout 36]
        [--clip-steps 400 1200] [--recipe n32_t0.9:--n=32,--temperature=0.9 ...]

A recipe is NAME:ARGS with the `megadalle eval` sampling arguments comma-separated. Without
--recipe: best of 16 and 32 at temperature 1.0 and 0.9. A held-out caption set this small moves
by several points from one seed to the next: compare rows within one run of this script.

Writes benchmarks/results/sampling_recipes_<run folder name>.json; other recipes than the default
and --clip-steps add their value to the name (sampling_recipes_demo_clip400+1200.json; see
benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ["n16_t1.0:--n=16", "n32_t1.0:--n=32", "n16_t0.9:--n=16,--temperature=0.9",
                   "n32_t0.9:--n=32,--temperature=0.9"]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, _, args = text.partition(":")
    if not name or not args:
        raise SystemExit(f"--recipe {text!r}: write NAME:ARGS, e.g. n32:--n=32,--temperature=0.9")
    return name, [a for a in args.split(",") if a]


def _megadalle(run: Path, command: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "megadalle", command, *args]
    config = run / "demo-config.yaml"
    if config.is_file():  # a demo run folder: the settings it was trained with
        cmd[4:4] = ["--config", str(config)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def train_reranker(run: Path, steps: int, folder: Path) -> Path:
    """A reranker trained for `steps` updates on the run's data and tokenizer, in `folder`."""
    folder.mkdir(parents=True)
    for name in ("data", "tokenizer.json"):
        (folder / name).symlink_to((run / name).resolve())
    _megadalle(run, "train-clip", [f"--logging.run_dir={folder}", f"--clip_train.steps={steps}",
                                   "--logging.progress=false", "--logging.tensorboard=false"])
    return folder / "clip"


def run_recipe(run: Path, args: list[str], seen: int, heldout: int, out: Path) -> dict:
    _megadalle(run, "eval", ["--ckpt", str(run), f"--seen={seen}", f"--heldout={heldout}", "--pairs=0",
                             "--out", str(out), *args])
    return json.loads((out / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a trained run folder (e.g. a demo's --out)")
    parser.add_argument("--recipe", action="append", default=None, help="NAME:ARGS (repeatable)")
    parser.add_argument("--clip-steps", type=int, nargs="*", default=[],
                        help="train a reranker of each length and score every recipe with it "
                             "(default: the run's own reranker)")
    parser.add_argument("--seen", type=int, default=24)
    parser.add_argument("--heldout", type=int, default=36)
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/sampling_recipes_<run>[_<recipes>][_clip<steps>].json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import listed, out_path, slug

    recipe_names = listed([r.partition(":")[0] for r in (args.recipe or DEFAULT_RECIPES)],
                          [r.partition(":")[0] for r in DEFAULT_RECIPES])
    out = out_path(args.out, "sampling_recipes", slug(args.run.resolve().name), recipe_names,
                   "clip" + "+".join(map(str, args.clip_steps)) if args.clip_steps else None)
    if not (args.run / "transformer").is_dir():
        raise SystemExit(f"{args.run} holds no transformer/: give a run folder trained by megadalle demo or train")
    recipes = [parse_recipe(r) for r in (args.recipe or DEFAULT_RECIPES)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rerankers: list[tuple[str, list[str]]] = [("", [])]
        if args.clip_steps:
            rerankers = []
            for steps in args.clip_steps:
                print(f"training a reranker for {steps} updates ...", flush=True)
                clip = train_reranker(args.run, steps, Path(tmp) / f"clip{steps}")
                rerankers.append((f"clip{steps}/", [f"--clip={clip}"]))
        for (prefix, clip_args), (name, extra) in ((r, x) for r in rerankers for x in recipes):
            name, extra = prefix + name, clip_args + extra
            print(f"recipe {name} ...", flush=True)
            report = run_recipe(args.run, extra, args.seen, args.heldout, Path(tmp) / name.replace("/", "_"))
            best, every = report["best_of_n"]["single_object"], report["single_sample"]["single_object"]
            rows.append({"recipe": name, "args": extra, "seconds": report["seconds"],
                         "best_of_n": {k: best[k]["accuracy"] for k in ("all", "seen", "heldout")},
                         "every_sample": {k: every[k]["accuracy"] for k in ("all", "seen", "heldout")},
                         "heldout_per_attribute_best": best["heldout"]["per_attribute"]})
    base = rows[0]["seconds"]
    print(f"\nrun {args.run}; {args.seen} seen + {args.heldout} held-out single-object captions; "
          f"{platform.machine()}, {os.cpu_count()} cores, no GPU")
    print(f"{'recipe':<20}{'best all':>10}{'seen':>8}{'held-out':>10}{'| every':>9}{'seen':>8}{'held-out':>10}"
          f"{'time':>8}")
    for r in rows:
        b, e = r["best_of_n"], r["every_sample"]
        print(f"{r['recipe']:<20}{b['all']:>10.0%}{b['seen']:>8.0%}{b['heldout']:>10.0%}{e['all']:>9.0%}"
              f"{e['seen']:>8.0%}{e['heldout']:>10.0%}{r['seconds'] / base:>7.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "seen": args.seen, "heldout": args.heldout,
                               "clip_steps": args.clip_steps,
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                               "recipes": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
