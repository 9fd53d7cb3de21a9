"""FID and Inception Score over features from any image feature extractor.

The math is here (Frechet distance between Gaussians fitted to features; IS from class
probabilities), so it is tested with a randomly initialised extractor. The real numbers use
the Inception-v3 weights that torch-fidelity ships, loaded from a local file only
(`load_inception`); without that file or the package there is a clear error, never a download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from megadalle.errors import CommandError

# extractor(images float [B,3,H,W] in [0,1]) -> (features [B,D], logits [B,C])
FeatureExtractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D,D] (unbiased, float64) of features [N,D]."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows [N,D] for a covariance, got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.t() @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    # Covariances are symmetric PSD up to rounding; clamp the tiny negative eigenvalues.
    vals, vecs = torch.linalg.eigh((m + m.t()) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.t()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) equals tr((S1^(1/2) S2 S1^(1/2))^(1/2)), and the inner matrix is symmetric
    PSD, so an eigendecomposition gives it without scipy's general (and sometimes complex)
    sqrtm.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrt_psd(sigma1)
    inner = torch.linalg.eigvalsh(r1 @ sigma2 @ r1).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * inner)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (the usual protocol)."""
    n = logits.shape[0]
    splits = max(1, min(splits, n))
    p = torch.softmax(logits.double(), dim=1)
    scores = []
    for part in torch.chunk(p, splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(scores) > 1 else 0.0


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the extractor over batches of images; returns all features and logits."""
    feats, logits = [], []
    for batch in images:
        f, lg = extractor(batch)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(logits)


def fid_and_is(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], extractor: FeatureExtractor,
               is_splits: int = 10) -> dict[str, float]:
    real_f, _ = extract(extractor, real)
    fake_f, fake_logits = extract(extractor, fake)
    fid = frechet_distance(*feature_statistics(real_f), *feature_statistics(fake_f))
    is_mean, is_std = inception_score(fake_logits, is_splits)
    return {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std,
            "n_real": real_f.shape[0], "n_fake": fake_f.shape[0]}


def load_inception(weights_path: str | Path, device: str = "cpu") -> FeatureExtractor:
    """torch-fidelity's Inception-v3 (the FID reference network) from a local weights file."""
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise CommandError(
            f"Inception weights {weights_path or '(none given)'} not found; FID/IS need the file "
            "'weights-inception-2015-12-05-6726825d.pth' stored locally: pass --inception-weights PATH "
            "(nothing is downloaded at run time)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise CommandError("FID/IS need the optional package torch-fidelity; install it with "
                           "`pip install torch-fidelity` (or `pip install megadalle[eval]`)") from None
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path)).to(device).eval()
    except Exception as e:
        raise CommandError(f"could not load Inception weights from {path}: {e}") from None

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch-fidelity's extractor wants uint8 [B,3,H,W] and resizes to 299 itself.
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8).to(device)
        feats, logits = net(x)
        return feats, logits

    return run
