"""Symmetric InfoNCE (CLIP) loss with a learned temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# CLIP clips the learned scale at 100 so the logits cannot blow up early in training.
MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, log_scale: torch.Tensor,
                     positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """InfoNCE over a batch of matched (image_i, text_i) pairs.

    image_emb, text_emb: unit vectors [B, E]. log_scale: scalar, the log of the inverse
    temperature. positives: optional bool [B, B], True where text j is also a correct caption of
    image i (the diagonal is always included). With synthetic data the same caption recurs
    within a batch; counting those as negatives would teach the model to tell identical
    captions apart, which is impossible, so the target spreads over all true matches.
    Returns loss (mean of both directions), the two halves, the accuracy of picking the right
    caption, and the temperature in use.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"embeddings must both be [B, E]; got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    b = image_emb.shape[0]
    scale = log_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())  # scalar from [] or [1]
    logits = scale * image_emb @ text_emb.t()  # (B images, B texts)
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    pos = eye if positives is None else (positives.to(logits.device) | eye)
    target = pos.float() / pos.sum(1, keepdim=True)  # rows sum to one
    target_t = pos.t().float() / pos.t().sum(1, keepdim=True)
    loss_i = F.cross_entropy(logits, target)
    loss_t = F.cross_entropy(logits.t(), target_t)
    with torch.no_grad():
        acc = pos.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return {"loss": (loss_i + loss_t) / 2, "loss_image": loss_i, "loss_text": loss_t,
            "accuracy": acc, "temperature": 1.0 / scale.detach()}
