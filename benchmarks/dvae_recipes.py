"""Which dVAE recipe keeps the shapes facts after a few CPU minutes: side by side, same run.

Each recipe trains the real `DiscreteVAE` (tiny preset plus the recipe's config overrides) in a
plain PyTorch loop on pre-rendered shapes images: same seed, same batches, AdamW at the tiny
preset's lr with a cosine decay, the Gumbel temperature annealed 1 -> 1/16 over 80% of the run,
the preset's KL weight from step 0. Every `--every` updates it reports, on held-out images, the
share whose argmax-code reconstruction the shapes analyser reads as the same facts, the codebook
perplexity and PSNR. No DeepSpeed here: this compares objectives, not the training system
(`megadalle train-dvae` gives the same figure for the tiny preset at the end of its run).

    python benchmarks/dvae_recipes.py [--steps 1000] [--recipes paper,tiny]

Writes benchmarks/results/dvae_recipes.json for the default recipes (the README's table); another
set of recipes adds it to the name (dvae_recipes_paper+tiny.json; see benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import listed, out_path  # noqa: E402

# name -> config overrides on top of the tiny preset.
RECIPES: dict[str, dict[str, object]] = {
    "paper": {"dvae.reconstruction_loss": "logit_laplace", "dvae.init_pixel_value": -1.0},
    "laplace_white_start": {"dvae.reconstruction_loss": "logit_laplace", "dvae.init_pixel_value": 1.0},
    "gaussian_zero_bias": {"dvae.reconstruction_loss": "gaussian", "dvae.init_pixel_value": -1.0},
    "tiny": {},
    # The same recipe with other patch geometries: 8x8-pixel patches at 64 px (the tiny preset
    # before), and 4x4 patches at 32 px (objects only 8-11 px across, 2-3 tokens).
    "tiny_64px_8x8": {"data.image_size": 64, "dvae.image_size": 64, "dvae.group_count": 4,
                      "transformer.image_grid": 8},
    "tiny_32px_8x8": {"data.image_size": 32, "dvae.image_size": 32, "dvae.group_count": 3,
                      "transformer.image_grid": 8},
}
# A bare run: the four the README's table compares (about 3-5 CPU minutes each).
DEFAULT_RECIPES = ("paper", "gaussian_zero_bias", "tiny", "tiny_64px_8x8")


def render(split: str, n: int, size: int):
    import numpy as np
    import torch

    from megadalle.data.shapes import ShapesDataset

    ds = ShapesDataset(split, image_size=size)
    images = [np.asarray(ds.image(ds.sample(i)), dtype=np.float32) / 255 for i in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S)


def train_recipe(name: str, overrides: dict[str, object], steps: int, every: int, batch: int,
                 n_train: int, n_check: int) -> dict:
    import torch

    from megadalle.config import load_config
    from megadalle.dvae import loss as L
    from megadalle.dvae.model import DiscreteVAE
    from megadalle.dvae.schedules import cosine
    from megadalle.training.dvae_trainer import reconstruction_agreement

    cfg = load_config("tiny", None, overrides)
    d = cfg.dvae
    size = d.image_size
    train, check = render("train", n_train, size), render("heldout", n_check, size)
    torch.manual_seed(0)
    model = DiscreteVAE(d)
    lr = cfg.dvae_train.optimizer.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    order = torch.Generator().manual_seed(1)
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine(step, steps, lr, cfg.dvae_train.schedule.min_lr)
        x = train[torch.randint(0, n_train, (batch,), generator=order)]
        tau = cosine(step, int(d.temperature_anneal_fraction * steps), d.temperature_start, d.temperature_end)
        out = model.loss(x, tau, d.kl_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            batches = [{"image": check[i:i + 64]} for i in range(0, n_check, 64)]
            got = reconstruction_agreement(model, batches, n_check)
            model.train()
            row = {"step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                   "facts_agree": got["facts_agree"], "codebook_perplexity": round(got["codebook_perplexity"], 1),
                   "psnr": round(got["psnr"], 2)}
            curve.append(row)
            print(f"  {name:>20} step {row['step']:5d}: facts kept {row['facts_agree']:6.1%}  "
                  f"perplexity {row['codebook_perplexity']:6.1f}  PSNR {row['psnr']:5.1f} dB", flush=True)
    return {"overrides": overrides, "curve": curve, "final": curve[-1], "best": max(c["facts_agree"] for c in curve)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--check-images", type=int, default=200)
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma list of: {', '.join(RECIPES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default: benchmarks/results/dvae_recipes[_<recipes>].json")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    results = {}
    for name in names:
        results[name] = train_recipe(name, RECIPES[name], a.steps, a.every, a.batch, a.train_images, a.check_images)
    print(f"\nheld-out facts kept after {a.steps} updates (batch {a.batch}); best over the checks in brackets")
    for name, r in results.items():
        f = r["final"]
        print(f"  {name:>20}: {f['facts_agree']:6.1%} ({r['best']:.1%})  perplexity {f['codebook_perplexity']:6.1f}  "
              f"PSNR {f['psnr']:5.1f} dB  {f['seconds']:6.0f} s")
    out = out_path(a.out, "dvae_recipes", listed(names, DEFAULT_RECIPES))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch_threads": a.threads,
                               "steps": a.steps, "batch": a.batch, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
