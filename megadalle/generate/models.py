"""Load a run's models for sampling, on any device and in any precision, from plain values.

`load_models(ckpt, sampling, device=..., dtype=...)` is what `megadalle sample`, `megadalle eval`
and `megadalle.Pipeline` share. The transformer runs in `dtype` (fp32, bf16, or fp16 on a GPU);
its logits are computed in fp32 either way (model.py), and the dVAE decoder and the reranker stay
fp32, since they cost little next to sampling and decide what the images look like.

On a GPU the random numbers come from a generator on that device, so the same seed gives other
tokens there than on the CPU (torch draws differently per device); on the CPU the tokens are the
same as `megadalle.transformer.sampling.generate` with the same seed, in each precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadalle.config import Config, SamplingConfig
from megadalle.errors import CommandError
from megadalle.generate.load import (RunPaths, check_compatible, load_run_config, load_tokenizer, load_transformer,
                                     resolve_paths)
from megadalle.generate.pipeline import CaptionResult, Generator, prompt_prefix, sample_caption

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": the GPU where there is one, else the CPU; a GPU asked for where none is: an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CommandError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu (or auto)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise CommandError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise CommandError("dtype fp16 needs a GPU (CPU kernels for fp16 attention are slow or missing); "
                           "use bf16 or fp32 on the CPU")
    return DTYPES[dtype]


@dataclass
class Loaded:
    generator: Generator
    cfg: Config  # the run's config (from the transformer export)
    dvae: Any
    tokenizer: Any
    paths: RunPaths
    reranker: str  # what reranks, for the report
    device: torch.device
    dtype: torch.dtype
    transformer: Any = None


def load_models(ckpt: str | Path, sampling: SamplingConfig, *, cli_cfg: Config | None = None,
                dvae: str | None = None, tokenizer: str | None = None, clip: str | None = None,
                rerank: bool = True, device: str | torch.device = "cpu", dtype: str = "fp32") -> Loaded:
    """Everything sampling needs from a run folder, checked to fit together, on `device`."""
    from megadalle.dvae.io import load_dvae

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    paths = resolve_paths(ckpt, dvae, tokenizer, clip)
    cfg = load_run_config(paths.transformer)
    if sampling.guidance_scale != 1.0 and cfg.transformer.caption_drop == 0:
        print(f"note: guidance {sampling.guidance_scale} with a transformer trained without caption dropout "
              f"(transformer.caption_drop=0): the null caption was never trained, guidance may not help")
    tok = load_tokenizer(cfg, paths.tokenizer)
    vae = load_dvae(paths.dvae).to(dev)
    check_compatible(cfg, vae.cfg, tok, paths)
    model = load_transformer(paths.transformer, cfg, dev).to(dt)
    scorer, reranker = None, "none"
    if rerank:
        scorer, reranker = load_scorer(cli_cfg or cfg, paths, tok)
    gen = Generator(code_sampler(model, dev, sampling), lambda caps: tok.encode(caps),
                    lambda codes: vae.decode(codes.to(dev)), cfg.transformer.image_grid, scorer, device=dev)
    return Loaded(gen, cfg, vae, tok, paths, reranker, dev, dt, model)


def code_sampler(model: Any, device: torch.device, sampling: SamplingConfig) -> Any:
    """(text, prefix codes, generator) -> image codes, with the sampling knobs of `sampling`."""
    from megadalle.transformer.sampling import generate

    def sample_codes(text: torch.Tensor, prefix: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        return generate(model, text.to(device), temperature=sampling.temperature, top_k=sampling.top_k,
                        top_p=sampling.top_p, guidance_scale=sampling.guidance_scale,
                        prefix_codes=None if prefix is None else prefix.to(device), generator=gen)

    return sample_codes


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
                 prefix: torch.Tensor | None = None, desc: str = "sample", progress: bool = True) -> list[CaptionResult]:
    from tqdm import tqdm

    results = []
    with tqdm(total=len(captions) * sampling.n, desc=desc, unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for i, caption in enumerate(captions):
            results.append(sample_caption(loaded.generator, caption, sampling.n, sampling.batch_size, sampling.seed,
                                          caption_index=i, prefix=prefix, progress=bar.update))
    return results


def image_prompt_prefix(loaded: Loaded, image: str | None, rows: int | None) -> torch.Tensor | None:
    """The first `rows` token rows of `image`, to be kept while the rest is generated."""
    if image is None and rows is None:
        return None
    if image is None or rows is None:
        raise CommandError("--image-prompt and --prompt-rows go together: give the image and how many token rows "
                           "of it to keep")
    from megadalle.data.images import load_image

    pixels = load_image(image, loaded.dvae.cfg.image_size).to(loaded.device)  # (3, H, W)
    codes = loaded.dvae.codes(pixels.unsqueeze(0))[0]  # (g, g)
    return prompt_prefix(codes.cpu(), rows)
