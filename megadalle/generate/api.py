"""`megadalle.Pipeline`: captions in, PIL images out, from Python.

    from megadalle import Pipeline

    pipe = Pipeline.from_run("runs/demo", device="auto", dtype="bf16")
    images = pipe(["a small red circle at the top"], n=32, top=4, seed=0)   # [[PIL.Image, ...]]

It is the same code as `megadalle sample` (generate/models.py, generate/pipeline.py): the same
seed gives the same images as the command with the same settings. `sample()` returns the full
results (codes, scores, order) instead of images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from megadalle.config import SamplingConfig
from megadalle.errors import ConfigError, CommandError
from megadalle.generate.models import Loaded, code_sampler, generate_all, image_prompt_prefix, load_models
from megadalle.generate.pipeline import CaptionResult

_OPTIONS = {"n": "n", "top": "top", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "guidance": "guidance_scale", "seed": "seed", "batch_size": "batch_size"}


class Pipeline:
    def __init__(self, loaded: Loaded, sampling: SamplingConfig) -> None:
        self.loaded, self.sampling = loaded, sampling

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | torch.device = "auto", dtype: str = "fp32",
                 rerank: bool = True, dvae: str | None = None, tokenizer: str | None = None,
                 clip: str | None = None, **sampling: Any) -> "Pipeline":
        """The models of a run folder (or its transformer/ folder); `sampling` sets defaults for
        n, top, temperature, top_k, top_p, guidance, seed, batch_size (else the run's config)."""
        from megadalle.generate.load import load_run_config, resolve_paths

        base = load_run_config(resolve_paths(run_dir, dvae, tokenizer, clip).transformer).sampling
        settings = _apply(base, sampling)
        loaded = load_models(run_dir, settings, dvae=dvae, tokenizer=tokenizer, clip=clip, rerank=rerank,
                             device=device, dtype=dtype)
        return cls(loaded, settings)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> "Pipeline":
        """A folder written by `megadalle export` (checked by its export.json); same options as from_run."""
        from megadalle.tools.export import check_export

        check_export(folder)
        return cls.from_run(folder, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def sample(self, captions: str | list[str], *, image_prompt: str | None = None, prompt_rows: int | None = None,
               progress: bool = False, **options: Any) -> list[CaptionResult]:
        """N samples per caption, decoded and ranked (best first when there is a reranker)."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise CommandError("give at least one caption")
        settings = _apply(self.sampling, options)
        prefix = image_prompt_prefix(self.loaded, image_prompt, prompt_rows)
        # The loaded sampler closes over the pipeline's settings: a call that changes them gets its
        # own sampler, and the next call starts from the pipeline's settings again.
        loaded = self.loaded if settings == self.sampling else _with_sampling(self.loaded, settings)
        return generate_all(loaded, captions, settings, prefix, progress=progress)

    def __call__(self, captions: str | list[str], **options: Any) -> list[list[Any]]:
        """The `top` best images of each caption, as PIL images (one list per caption)."""
        from PIL import Image

        top = options.get("top", self.sampling.top)
        out = []
        for result in self.sample(captions, **options):
            images = []
            for i in result.order[:top].tolist():
                pixels = (result.images[i].clamp(0, 1) * 255 + 0.5).to(torch.uint8)  # (3, H, W)
                images.append(Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB"))
            out.append(images)
        return out


def _apply(base: SamplingConfig, options: dict[str, Any]) -> SamplingConfig:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise CommandError(f"unknown sampling option(s) {sorted(unknown)}; use {', '.join(_OPTIONS)}")
    values = {_OPTIONS[k]: v for k, v in options.items() if v is not None}
    if "n" in values and "top" not in values and base.top > values["n"]:
        values["top"] = values["n"]
    try:
        return replace(base, **values)
    except ConfigError as e:
        raise CommandError(str(e)) from None


def _with_sampling(loaded: Loaded, settings: SamplingConfig) -> Loaded:
    sampler = code_sampler(loaded.transformer, loaded.device, settings)
    return replace(loaded, generator=replace(loaded.generator, sample_codes=sampler))
