"""Text -> N samples -> dVAE decode -> rerank -> files. The core of `megadalle sample`.

The token-level sampler (KV cache, temperature, top-k/top-p, guidance, prefix codes) is the
transformer's (`megadalle.transformer.sampling`); this module batches it over captions and
samples, decodes, reranks and writes the results. Each (caption, batch) pair draws from its own
seeded generator, so a run is reproducible whatever else ran before it in the process.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from megadalle.errors import CommandError
from megadalle.clip.rerank import Scorer, rank
from megadalle.config import SamplingConfig
from megadalle.data.images import labelled_grid, save_png

# A batch of captions' token ids and an optional prefix of image codes -> image codes.
# generate(text long [B,T], prefix long [B,P] | None, generator) -> codes long [B, grid*grid]
CodeSampler = Callable[[torch.Tensor, "torch.Tensor | None", torch.Generator], torch.Tensor]


@dataclass
class Generator:
    """Everything needed to turn captions into ranked images."""

    sample_codes: CodeSampler
    encode_text: Callable[[list[str]], torch.Tensor]  # captions -> long [B, text_len]
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes long [B, g, g] -> float [B,3,H,W]
    grid: int  # image tokens per side
    scorer: Scorer | None = None
    device: torch.device = torch.device("cpu")  # where sampling runs: its random generator lives there


@dataclass
class CaptionResult:
    caption: str
    images: torch.Tensor  # [N,3,H,W], in generation order
    codes: torch.Tensor  # [N, g*g]
    scores: torch.Tensor | None  # [N] reranker scores, or None without a reranker
    order: torch.Tensor  # [N] indices best first (generation order without a reranker)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. facts/split for evaluation


def caption_seed(seed: int, caption_index: int, batch_index: int) -> int:
    # Distinct, reproducible streams per (caption, batch); large odd multipliers avoid overlap.
    return (seed * 1_000_003 + caption_index * 7_919 + batch_index) % (2 ** 63)


def sample_caption(gen: Generator, caption: str, n: int, batch_size: int, seed: int, caption_index: int = 0,
                   prefix: torch.Tensor | None = None, progress: Callable[[int], None] | None = None) -> CaptionResult:
    """N samples of one caption, decoded and (when a scorer is present) ranked best first."""
    codes_out, images_out = [], []
    text_one = gen.encode_text([caption])  # (1, T)
    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        g = torch.Generator(device=gen.device).manual_seed(caption_seed(seed, caption_index, b))
        text = text_one.expand(m, -1)
        pre = None if prefix is None else prefix.reshape(1, -1).expand(m, -1)
        codes = gen.sample_codes(text, pre, g)  # (m, g*g)
        if pre is not None and not torch.equal(codes[:, :pre.shape[1]].cpu(), pre.cpu()):
            raise RuntimeError("the sampler changed the image-prompt codes it was asked to keep")
        codes_out.append(codes.cpu())
        images_out.append(gen.decode(codes.view(m, gen.grid, gen.grid)).float().cpu())  # (m,3,H,W)
        if progress:
            progress(m)
    codes_all, images = torch.cat(codes_out), torch.cat(images_out)
    if gen.scorer is not None:
        scores = gen.scorer.score(images, [caption] * n).float().cpu()
        order = rank(scores)
    else:
        scores, order = None, torch.arange(n)
    return CaptionResult(caption, images, codes_all, scores, order)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "caption"


def write_results(results: list[CaptionResult], out_dir: str | Path, top: int, settings: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each image (named by rank), a grid of every caption's `top` best (one row per caption,
    labelled with it), and samples.json with scores and settings. Returns the report written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": settings, "grid": "grid.png", "captions": []}
    rows = []
    for ci, r in enumerate(results):
        folder = f"{ci:03d}-{_slug(r.caption)}"
        entries = []
        for rnk, idx in enumerate(r.order.tolist()):
            name = f"{folder}/rank{rnk:03d}-sample{idx:03d}.png"
            save_png(r.images[idx], out / name)
            entries.append({"file": name, "sample": idx, "rank": rnk,
                            "score": None if r.scores is None else round(float(r.scores[idx]), 6)})
        report["captions"].append({"caption": r.caption, "top": [e["file"] for e in entries[:top]],
                                   "images": entries, **r.meta})
        rows.append(r.images[r.order[:top]])
    save_png(labelled_grid(rows, [r.caption for r in results]), out / "grid.png")
    if extra:
        report.update(extra)
    tmp = out / "samples.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "samples.json")
    return report


def sampling_settings(cfg: SamplingConfig, **more: Any) -> dict[str, Any]:
    return {**asdict(cfg), **more, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """Captions from --prompt (repeatable) and --prompt-file (one per line, # comments)."""
    captions = [p.strip() for p in (prompts or [])]
    if any(not c for c in captions):
        raise CommandError("--prompt must not be empty")
    if prompt_file:
        p = Path(prompt_file)
        if not p.is_file():
            raise CommandError(f"prompt file {p} does not exist")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CommandError(f"prompt file {p} is not UTF-8 text") from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not from_file:
            raise CommandError(f"prompt file {p} holds no captions (one caption per line; '#' starts a comment)")
        captions += from_file
    if not captions:
        raise CommandError("give at least one caption with --prompt TEXT or --prompt-file FILE")
    return captions


def prompt_prefix(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """The first `rows` rows of a [g,g] code grid, flattened row-major: [rows*g]."""
    g = codes.shape[-1]
    if codes.dim() != 2 or codes.shape[0] != g:
        raise ValueError(f"expected a square code grid [g,g], got {tuple(codes.shape)}")
    if not 1 <= rows < g:
        raise CommandError(f"--prompt-rows={rows} is out of range: the image has {g} token rows; "
                           f"keep between 1 and {g - 1} (the rest is generated)")
    return codes[:rows].reshape(-1)
