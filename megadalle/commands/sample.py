"""`megadalle sample`: captions -> N samples each -> rerank -> top images, a grid and a JSON.

    megadalle sample --ckpt RUN_DIR --prompt "a small red circle at the top" [--prompt-file F]
                     [--n 64] [--top 8] [--out DIR] [--temperature 1] [--top-k 0] [--top-p 1]
                     [--guidance 1] [--seed 0] [--image-prompt IMG --prompt-rows K]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadalle.run_layout import RunLayout
from megadalle.errors import CommandError
from megadalle.config import Config, ConfigError, SamplingConfig
from megadalle.generate.load import (RunPaths, check_compatible, load_run_config, load_tokenizer, load_transformer,
                                     resolve_paths)
from megadalle.generate.pipeline import (CaptionResult, Generator, prompt_prefix, read_prompts, sample_caption,
                                         sampling_settings, write_results)


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


@dataclass
class Loaded:
    generator: Generator
    cfg: Config  # the run's config (from the transformer export)
    dvae: Any
    tokenizer: Any
    paths: RunPaths
    reranker: str  # what reranks, for the report


def load_models(args: argparse.Namespace, cli_cfg: Config, sampling: SamplingConfig) -> Loaded:
    from megadalle.dvae.io import load_dvae
    from megadalle.transformer.sampling import generate

    paths = resolve_paths(args.ckpt, args.dvae, args.tokenizer, args.clip)
    cfg = load_run_config(paths.transformer)
    if sampling.guidance_scale != 1.0 and cfg.transformer.caption_drop == 0:
        print(f"note: --guidance {sampling.guidance_scale} with a transformer trained without caption dropout "
              f"(transformer.caption_drop=0): the null caption was never trained, guidance may not help")
    tokenizer = load_tokenizer(cfg, paths.tokenizer)
    dvae = load_dvae(paths.dvae)
    check_compatible(cfg, dvae.cfg, tokenizer, paths)
    model = load_transformer(paths.transformer, cfg)

    def sample_codes(text: torch.Tensor, prefix: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        return generate(model, text, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        guidance_scale=sampling.guidance_scale, prefix_codes=prefix, generator=gen)

    scorer, reranker = None, "none"
    if not getattr(args, "no_rerank", False):
        scorer, reranker = load_scorer(cli_cfg, paths, tokenizer)
    gen = Generator(sample_codes, lambda caps: tokenizer.encode(caps), dvae.decode, cfg.transformer.image_grid, scorer)
    return Loaded(gen, cfg, dvae, tokenizer, paths, reranker)


def load_scorer(cli_cfg: Config, paths: RunPaths, tokenizer: Any) -> tuple[Any, str]:
    """open_clip when configured, else our reranker from --clip / <run>/clip, else none."""
    if cli_cfg.clip.open_clip_checkpoint:
        from megadalle.clip.open_clip_loader import load_open_clip

        return (load_open_clip(cli_cfg.clip.open_clip_model, cli_cfg.clip.open_clip_checkpoint),
                f"open_clip {cli_cfg.clip.open_clip_model} ({cli_cfg.clip.open_clip_checkpoint})")
    if paths.clip is None:
        print(f"note: no reranker under {paths.run_dir / 'clip'} (train one with `megadalle train-clip`); "
              f"samples stay in generation order")
        return None, "none"
    from megadalle.clip.model import load_clip
    from megadalle.clip.rerank import ClipReranker

    model = load_clip(paths.clip)
    g = model.geometry
    if g.text_len != tokenizer.text_len or g.text_vocab_size < tokenizer.vocab_size:
        raise CommandError(f"reranker {paths.clip} was trained for text_len={g.text_len} / vocabulary "
                           f"{g.text_vocab_size}, but the tokenizer {paths.tokenizer} gives text_len="
                           f"{tokenizer.text_len} / {tokenizer.vocab_size} tokens; retrain it with this run's tokenizer")
    return ClipReranker(model, lambda caps: tokenizer.encode(caps)), f"megadalle clip ({paths.clip})"


def generate_all(loaded: Loaded, captions: list[str], sampling: SamplingConfig,
                 prefix: torch.Tensor | None = None, desc: str = "sample") -> list[CaptionResult]:
    from tqdm import tqdm

    results = []
    with tqdm(total=len(captions) * sampling.n, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for i, caption in enumerate(captions):
            results.append(sample_caption(loaded.generator, caption, sampling.n, sampling.batch_size, sampling.seed,
                                          caption_index=i, prefix=prefix, progress=bar.update))
    return results


def image_prompt_prefix(loaded: Loaded, image: str | None, rows: int | None) -> torch.Tensor | None:
    if image is None and rows is None:
        return None
    if image is None or rows is None:
        raise CommandError("--image-prompt and --prompt-rows go together: give the image and how many token rows "
                           "of it to keep")
    from megadalle.data.images import load_image

    pixels = load_image(image, loaded.dvae.cfg.image_size)  # (3, H, W)
    codes = loaded.dvae.codes(pixels.unsqueeze(0))[0]  # (g, g)
    return prompt_prefix(codes, rows)


def run(args: argparse.Namespace, cfg: Config) -> int:
    captions = read_prompts(args.prompt, args.prompt_file)
    sampling = sampling_config(args, cfg)
    loaded = load_models(args, cfg, sampling)
    prefix = image_prompt_prefix(loaded, args.image_prompt, args.prompt_rows)
    out = Path(args.out) if args.out else RunLayout(loaded.paths.run_dir).samples
    results = generate_all(loaded, captions, sampling, prefix)
    settings = sampling_settings(sampling, ckpt=str(loaded.paths.transformer), dvae=str(loaded.paths.dvae),
                                 tokenizer=str(loaded.paths.tokenizer), reranker=loaded.reranker,
                                 image_prompt=args.image_prompt, prompt_rows=args.prompt_rows)
    write_results(results, out, sampling.top, settings)
    n_files = sum(len(r.order) for r in results)
    print(f"wrote {n_files} images ({len(captions)} caption(s) x {sampling.n}, ranked by {loaded.reranker}), "
          f"grid of the top {sampling.top}: {out / 'grid.png'}; scores and settings: {out / 'samples.json'}")
    return 0
