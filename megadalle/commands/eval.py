"""`megadalle eval`: sample a caption set, then score what came out.

    megadalle eval --ckpt RUN_DIR [--prompt-file F | --seen 24 --heldout 12 --pairs 6]
                   [--n 16] [--top 4] [--out DIR] [--inception-weights FILE]

Scores (written to <out>/eval.json and eval.txt, beside the samples, grid and samples.json):

- shapes accuracy of the best-of-N reranked image of each caption, per attribute and overall,
  for seen and held-out (shape, colour) combinations, single objects reported separately; and
  the same for every sample before reranking ("single sample"), which shows what reranking adds;
- CLIP score of the best-of-N images with the reranker;
- FID and IS against the validation images, when local Inception weights are given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from megadalle.run_layout import RunLayout
from megadalle.errors import CommandError
from megadalle.config import Config
from megadalle.eval.summary import Judgement, format_summary, summarise
from megadalle.generate.pipeline import CaptionResult, read_prompts, sampling_settings, write_results
from megadalle.commands.sample import add_model_arguments, add_sampling_arguments, load_models, sampling_config
from megadalle.generate.models import generate_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt-file", default=None, metavar="FILE",
                        help="captions to evaluate, one per line (default: a fixed shapes caption set)")
    parser.add_argument("--seen", type=int, default=24, help="single-object captions of seen combinations")
    parser.add_argument("--heldout", type=int, default=12, help="single-object captions of held-out combinations")
    parser.add_argument("--pairs", type=int, default=6, help="two-object captions")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <run>/eval)")
    parser.add_argument("--inception-weights", default=None, metavar="FILE",
                        help="local Inception-v3 weights for FID/IS (torch-fidelity's file); skipped without")
    parser.add_argument("--fid-batches", type=int, default=0,
                        help="real validation batches for FID (default: as many images as generated)")
    add_sampling_arguments(parser)


def judge_results(results: list[CaptionResult], heldout: frozenset) -> tuple[list[Judgement], list[Judgement], int]:
    """(best-of-N judgements, every-sample judgements, captions skipped as not shapes captions)."""
    from megadalle.data.shapes import parse_caption
    from megadalle.eval.shapes_accuracy import judge

    best, every, skipped = [], [], 0
    for r in results:
        if parse_caption(r.caption) is None:
            skipped += 1
            continue
        best.append(judge(r.images[int(r.order[0])], r.caption, heldout))
        every.extend(judge(img, r.caption, heldout) for img in r.images)
        r.meta["best_matches"] = best[-1].matches
        r.meta["split"] = best[-1].split
    return best, every, skipped


def fid_is(loaded: Any, results: list[CaptionResult], weights: str, batches: int) -> dict[str, float]:
    from megadalle.data.loader import image_loader, resolve_image_source
    from megadalle.eval.fid import fid_and_is, load_inception

    extractor = load_inception(weights)
    fake = torch.cat([r.images for r in results])
    cfg = loaded.cfg
    source = resolve_image_source(cfg, "val", loaded.paths.run_dir)
    bs = 64
    n_batches = batches or max(1, (fake.shape[0] + bs - 1) // bs)
    real_loader = image_loader(source, bs, image_size=cfg.data.image_size, augment="none", shuffle_buffer=0,
                               endless=False, rank=0, world_size=1)
    real = [b["image"] for _, b in zip(range(n_batches), real_loader)]
    return fid_and_is(real, list(fake.split(bs)), extractor)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.eval.clip_score import clip_score
    from megadalle.eval.shapes_accuracy import eval_captions, heldout_of

    t0 = time.perf_counter()
    if args.inception_weights and not Path(args.inception_weights).is_file():
        # Checked before sampling, so a typo does not cost the whole run.
        from megadalle.eval.fid import load_inception

        load_inception(args.inception_weights)
    sampling = sampling_config(args, cfg)
    loaded = load_models(args, cfg, sampling)
    run_cfg = loaded.cfg
    if args.prompt_file:
        captions = read_prompts(None, args.prompt_file)
    else:
        if min(args.seen, args.heldout, args.pairs) < 0 or args.seen + args.heldout + args.pairs == 0:
            raise CommandError("--seen, --heldout and --pairs must be >= 0 and not all 0")
        captions = [c for c, _ in eval_captions(run_cfg, args.seen, args.heldout, args.pairs)]
    out = Path(args.out) if args.out else RunLayout(loaded.paths.run_dir).eval
    results = generate_all(loaded, captions, sampling, desc="eval samples")

    report: dict[str, Any] = {"n_captions": len(captions), "n_per_caption": sampling.n,
                              "reranker": loaded.reranker}
    best, every, skipped = judge_results(results, heldout_of(run_cfg))
    if best:
        report["best_of_n"] = summarise(best)
        report["single_sample"] = summarise(every)
    report["captions_not_scored"] = skipped
    if loaded.generator.scorer is not None:
        top_images = torch.stack([r.images[int(r.order[0])] for r in results])
        report["clip_score_best_of_n"] = clip_score(loaded.generator.scorer, top_images, captions)
        report["clip_score_single_sample"] = clip_score(
            loaded.generator.scorer, torch.cat([r.images for r in results]),
            [r.caption for r in results for _ in range(r.images.shape[0])])
    if args.inception_weights:
        report["fid_is"] = fid_is(loaded, results, args.inception_weights, args.fid_batches)
    else:
        report["fid_is"] = "skipped: no --inception-weights given (FID/IS need local Inception-v3 weights)"
    settings = sampling_settings(sampling, ckpt=str(loaded.paths.transformer), reranker=loaded.reranker)
    write_results(results, out, sampling.top, settings)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["settings"] = settings
    text = format_report(report)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.txt'}, the grid {out / 'grid.png'} and every sample "
          f"(ranked) with {out / 'samples.json'}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['n_captions']} captions x {report['n_per_caption']} samples, reranked by {report['reranker']}"]
    if "best_of_n" in report:
        lines.append("\nshapes accuracy, best-of-N reranked image per caption:")
        lines.append(format_summary(report["best_of_n"]))
        lines.append("\nshapes accuracy, every sample (no reranking):")
        lines.append(format_summary(report["single_sample"]))
    if report.get("captions_not_scored"):
        lines.append(f"{report['captions_not_scored']} caption(s) name no shape: not scored for shapes accuracy")
    if "clip_score_best_of_n" in report:
        lines.append(f"\nCLIP score: best-of-N {report['clip_score_best_of_n']:.2f}, "
                     f"every sample {report['clip_score_single_sample']:.2f}")
    fid = report.get("fid_is")
    if isinstance(fid, dict):
        lines.append(f"FID {fid['fid']:.2f}, IS {fid['inception_score']:.2f} +- {fid['inception_score_std']:.2f} "
                     f"({fid['n_fake']} generated vs {fid['n_real']} real images)")
    else:
        lines.append(f"FID/IS {fid}")
    return "\n".join(lines)
