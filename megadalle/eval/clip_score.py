"""CLIP score: how well images match their captions according to a contrastive model."""

from __future__ import annotations

import torch

from megadalle.clip.rerank import Scorer


def clip_score(scorer: Scorer, images: torch.Tensor, captions: list[str]) -> float:
    """100 * mean(max(cos(image, caption), 0)), the definition used by torchmetrics and most
    text-to-image papers since Hessel et al. 2021 (with w = 100 instead of 2.5)."""
    if images.shape[0] == 0:
        raise ValueError("clip_score needs at least one image")
    cos = scorer.score(images, captions)
    return float(100 * cos.clamp(min=0).mean())
