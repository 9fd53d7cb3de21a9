"""The dVAE objective (paper section 2.1 and appendix A): logit-Laplace reconstruction,
KL to a uniform prior over the codebook, Gumbel-softmax relaxation; plus codebook statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def map_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: keeps the logit-Laplace support away from 0 and 1."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_nll(y: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """Elementwise -log p(y) for the density 1/(2 b y (1-y)) * exp(-|logit(y) - mu| / b) on (0, 1)."""
    logit_y = torch.log(y) - torch.log1p(-y)
    return (math.log(2.0) + ln_b + torch.log(y) + torch.log1p(-y)
            + torch.abs(logit_y - mu) * torch.exp(-ln_b))


def gaussian_nll(y: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Elementwise -log N(y; mean, sigma^2): the fixed-scale alternative to the logit-Laplace."""
    return 0.5 * ((y - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform) of the categorical softmax(logits) along `dim`, per position (nats)."""
    log_q = F.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * log_q).sum(dim=dim) + math.log(logits.shape[dim])


def sample_gumbel(shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(shape, device=device, generator=generator)
    # u == 0 would give -inf; the smallest normal float keeps the noise finite.
    u = u.clamp_min(torch.finfo(u.dtype).tiny)
    return -torch.log(-torch.log(u))


def per_sample_gumbel(sample_shape: tuple[int, ...], seeds: list[int],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel noise [len(seeds), *sample_shape], each sample from its own seeded generator.

    Drawing per sample (seeded by run seed, step and the sample's index in the global batch)
    makes training independent of the data-parallel split and of RNG state at resume.
    """
    out = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        out.append(sample_gumbel(sample_shape, device=device, generator=g))
    return torch.stack(out)


def gumbel_softmax(logits: torch.Tensor, temperature: float, noise: torch.Tensor,
                   dim: int = 1, hard: bool = False) -> torch.Tensor:
    """Relaxed one-hot sample softmax((logits + g) / tau); `hard` gives the straight-through
    estimator (one-hot forward, relaxed gradient)."""
    soft = F.softmax((logits + noise) / temperature, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


def elbo_terms(x: torch.Tensor, stats: torch.Tensor, logits: torch.Tensor, kl_weight: float,
               eps: float, reconstruction: str = "logit_laplace", sigma: float = 0.1) -> dict[str, torch.Tensor]:
    """Loss of one batch, normalised as the paper: the negative ELBO divided by C*H*W.

    x: [B, C, H, W] in [0, 1]; stats: decoder output [B, 2C, H, W] (mu then ln b);
    logits: [B, V, g, g]. The reconstruction term becomes the mean per pixel value, and the KL
    summed over the g*g positions is divided by C*H*W as well, so that beta acts as
    beta * g^2 / (C*H*W) (= beta / 192 at 256 px -> 32x32) relative to the per-position KL.
    `reconstruction="gaussian"` replaces the logit-Laplace by a Gaussian of fixed `sigma` around
    sigmoid(mu) (the decoded pixel, before unmapping); the log-scale channels are then unused.
    Returns loss (what is minimised), rec (nats per pixel value), kl (nats per position).
    """
    b, c, h, w = x.shape
    y = map_pixels(x, eps)
    if reconstruction == "gaussian":
        nll = gaussian_nll(y, torch.sigmoid(stats[:, :c]), sigma)
    elif reconstruction == "logit_laplace":
        nll = logit_laplace_nll(y, stats[:, :c], stats[:, c:])
    else:
        raise ValueError(f"unknown reconstruction loss {reconstruction!r}")
    rec = nll.mean()
    kl_pos = kl_to_uniform(logits, dim=1)  # (B, g, g)
    kl_norm = kl_pos.flatten(1).sum(1).mean() / (c * h * w)
    return {"loss": rec + kl_weight * kl_norm, "rec": rec, "kl": kl_pos.mean()}


def code_counts(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(codes.reshape(-1).long(), minlength=vocab_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the empirical code distribution: the effective number of codes used."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-image PSNR in dB for images in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()
