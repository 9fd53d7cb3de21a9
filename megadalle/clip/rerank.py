"""Reranking: score each generated image against its caption and keep the best.

Any scorer works if it has `score(images [B,3,H,W] in [0,1], captions: list[str]) -> [B]`
(higher = better match): our own `ClipReranker`, or an open_clip model from `open_clip_loader`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from megadalle.clip.model import ClipModel


class Scorer(Protocol):
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor: ...


class ClipReranker:
    """Our ClipModel plus the function that turns captions into its token ids."""

    def __init__(self, model: ClipModel, encode_text: Callable[[list[str]], torch.Tensor],
                 batch_size: int = 64) -> None:
        self.model = model.eval()
        self.encode_text = encode_text
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(captions), self.batch_size):
            text = self.encode_text(captions[i:i + self.batch_size]).to(device)
            out.append(self.model.similarity(images[i:i + self.batch_size].to(device).float(), text).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort `scores` best first; equal scores keep their original order."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    return torch.sort(scores, descending=True, stable=True).indices


def rerank(images: torch.Tensor, caption: str, scorer: Scorer, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score N images of one caption and return (indices of the `top` best, all N scores)."""
    if not 1 <= top <= images.shape[0]:
        raise ValueError(f"top={top} must be between 1 and the number of images ({images.shape[0]})")
    scores = scorer.score(images, [caption] * images.shape[0])
    return rank(scores)[:top], scores
