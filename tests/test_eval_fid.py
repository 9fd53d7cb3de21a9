"""FID / IS plumbing with a randomly initialised feature extractor, and the math on known cases."""

import math

import pytest
import torch
from torch import nn

from megadalle.errors import CommandError
from megadalle.eval.clip_score import clip_score
from megadalle.eval.fid import (feature_statistics, fid_and_is, frechet_distance, inception_score,
                                load_inception)

torch.set_num_threads(1)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    # For commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_a_rotated_copy_is_zero_and_symmetric():
    torch.manual_seed(0)
    a = torch.randn(5, 5, dtype=torch.float64)
    s1 = a @ a.t() + 0.1 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, 5, dtype=torch.float64)
    s2 = b @ b.t()
    mu = torch.randn(5, dtype=torch.float64)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(frechet_distance(mu + 1, s2, mu, s1), rel=1e-8)


def test_inception_score_extremes():
    # Every image confidently a different class: IS = number of classes. Uniform: IS = 1.
    confident = torch.eye(8) * 100
    assert inception_score(confident, splits=1)[0] == pytest.approx(8.0, rel=1e-6)
    assert inception_score(torch.zeros(8, 8), splits=2)[0] == pytest.approx(1.0)


class _RandomExtractor(nn.Module):
    """A randomly initialised conv net standing in for Inception (features + logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.cls = nn.Linear(32, 10)

    def forward(self, images):
        f = self.net(images)
        return f, self.cls(f)


def test_fid_and_is_plumbing_with_random_extractor():
    ex = _RandomExtractor().eval()
    g = torch.Generator().manual_seed(1)
    real = [torch.rand(16, 3, 16, 16, generator=g) for _ in range(4)]
    same = fid_and_is(real, real, ex, is_splits=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["n_real"] == same["n_fake"] == 64
    dark = [r * 0.3 for r in real]
    shifted = fid_and_is(real, dark, ex)
    assert shifted["fid"] > 1e-3 and math.isfinite(shifted["inception_score"])
    assert shifted["inception_score"] >= 1.0 - 1e-9


def test_feature_statistics_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(torch.zeros(1, 4))


def test_missing_inception_weights_give_a_clear_error(tmp_path):
    with pytest.raises(CommandError, match="--inception-weights"):
        load_inception(tmp_path / "nope.pth")
    with pytest.raises(CommandError, match="none given"):
        load_inception("")


def test_clip_score_is_100_times_clamped_cosine():
    class Fixed:
        def score(self, images, captions):
            return torch.tensor([0.5, -0.2, 0.3])

    assert clip_score(Fixed(), torch.zeros(3, 3, 4, 4), ["a", "b", "c"]) == pytest.approx(100 * 0.8 / 3)
