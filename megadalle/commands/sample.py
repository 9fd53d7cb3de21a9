"""`megadalle sample`: captions -> N samples each -> rerank -> top images, a grid and a JSON.

    megadalle sample --ckpt RUN_DIR --prompt "a small red circle at the top" [--prompt-file F]
                     [--n 64] [--top 8] [--out DIR] [--temperature 1] [--top-k 0] [--top-p 1]
                     [--guidance 1] [--seed 0] [--image-prompt IMG --prompt-rows K]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megadalle.run_layout import RunLayout
from megadalle.errors import CommandError
from megadalle.config import Config, ConfigError, SamplingConfig
from megadalle.generate import models
from megadalle.generate.models import Loaded, generate_all, image_prompt_prefix
from megadalle.generate.pipeline import read_prompts, sampling_settings, write_results


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the models come from; shared with `megadalle eval`."""
    parser.add_argument("--ckpt", required=True, metavar="DIR",
                        help="run folder (or its transformer/ folder) holding the trained transformer")
    parser.add_argument("--dvae", default=None, metavar="DIR", help="dVAE folder (default: <run>/dvae)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE", help="default: <run>/tokenizer.json")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="reranker folder (default: <run>/clip when present; or set "
                             "clip.open_clip_model + clip.open_clip_checkpoint for a local open_clip model)")
    parser.add_argument("--no-rerank", action="store_true", help="keep samples in generation order")
    parser.add_argument("--device", default="auto", help="where to sample: auto (the GPU if there is one), cpu, "
                                                         "cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(models.DTYPES),
                        help="the transformer's precision while sampling (fp16 needs a GPU)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=None, help="samples per caption (default: sampling.n)")
    parser.add_argument("--top", type=int, default=None, help="best samples kept per caption in the grid "
                                                               "(default: sampling.top)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0 disables")
    parser.add_argument("--top-p", type=float, default=None, help="1 disables")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (1 = off; needs transformer.caption_drop > 0 in training)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images generated at once")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a caption (repeatable)")
    parser.add_argument("--prompt-file", default=None, metavar="FILE", help="captions, one per line")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <run>/samples)")
    parser.add_argument("--image-prompt", default=None, metavar="IMG",
                        help="complete this image: keep the first --prompt-rows token rows, generate the rest")
    parser.add_argument("--prompt-rows", type=int, default=None, metavar="K")
    add_sampling_arguments(parser)


def sampling_config(args: argparse.Namespace, cfg: Config) -> SamplingConfig:
    """The sampling section with the command-line flags applied (flags beat config)."""
    d = dict(cfg.sampling.__dict__)
    for flag, key in (("n", "n"), ("top", "top"), ("temperature", "temperature"), ("top_k", "top_k"),
                      ("top_p", "top_p"), ("guidance", "guidance_scale"), ("seed", "seed"),
                      ("batch_size", "batch_size")):
        v = getattr(args, flag, None)
        if v is not None:
            d[key] = v
    if getattr(args, "top", None) is None and d["top"] > d["n"]:
        d["top"] = d["n"]  # --n 4 alone should not fail against the preset's top
    try:
        return SamplingConfig(**d)
    except ConfigError as e:
        raise CommandError(str(e).replace("sampling.", "--").replace("sampling:", "--n/--top:")) from None


def load_models(args: argparse.Namespace, cli_cfg: Config, sampling: SamplingConfig) -> Loaded:
    """The models the command line names, on --device in --dtype."""
    return models.load_models(args.ckpt, sampling, cli_cfg=cli_cfg, dvae=args.dvae, tokenizer=args.tokenizer,
                              clip=args.clip, rerank=not getattr(args, "no_rerank", False),
                              device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "fp32"))


def run(args: argparse.Namespace, cfg: Config) -> int:
    captions = read_prompts(args.prompt, args.prompt_file)
    sampling = sampling_config(args, cfg)
    loaded = load_models(args, cfg, sampling)
    prefix = image_prompt_prefix(loaded, args.image_prompt, args.prompt_rows)
    out = Path(args.out) if args.out else RunLayout(loaded.paths.run_dir).samples
    results = generate_all(loaded, captions, sampling, prefix)
    settings = sampling_settings(sampling, ckpt=str(loaded.paths.transformer), dvae=str(loaded.paths.dvae),
                                 tokenizer=str(loaded.paths.tokenizer), reranker=loaded.reranker,
                                 device=str(loaded.device), dtype=str(loaded.dtype).replace("torch.", ""),
                                 image_prompt=args.image_prompt, prompt_rows=args.prompt_rows)
    write_results(results, out, sampling.top, settings)
    n_files = sum(len(r.order) for r in results)
    print(f"wrote {n_files} images ({len(captions)} caption(s) x {sampling.n}, ranked by {loaded.reranker}), "
          f"grid of the top {sampling.top}: {out / 'grid.png'}; scores and settings: {out / 'samples.json'}")
    return 0
