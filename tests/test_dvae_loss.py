"""The dVAE objective and schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megadalle.config import ConfigError, DVAEConfig, load_config
from megadalle.dvae import loss as L
from megadalle.dvae.schedules import DVAESchedules, cosine


def test_pixel_map_and_inverse():
    x = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(L.map_pixels(x, 0.1), torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(L.unmap_pixels(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), 0.1),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_logit_laplace_density_by_hand():
    y, mu, b = 0.25, 0.3, 0.5
    # p(y) = 1 / (2 b y (1-y)) * exp(-|logit(y) - mu| / b), logit(0.25) = -log 3.
    p = 1 / (2 * b * y * (1 - y)) * math.exp(-abs(-math.log(3) - mu) / b)
    nll = L.logit_laplace_nll(torch.tensor([y]), torch.tensor([mu]), torch.tensor([math.log(b)]))
    assert nll.item() == pytest.approx(-math.log(p), rel=1e-6)


def test_logit_laplace_is_a_density_on_the_unit_interval():
    y = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    for mu, ln_b in ((0.0, 0.0), (1.5, math.log(0.3)), (-2.0, math.log(2.0))):
        p = torch.exp(-L.logit_laplace_nll(y, torch.tensor(mu, dtype=torch.float64),
                                           torch.tensor(ln_b, dtype=torch.float64)))
        assert torch.trapezoid(p, y).item() == pytest.approx(1.0, abs=2e-3)


def test_kl_to_uniform_by_hand():
    # q = softmax([log 1, log 3]) = [1/4, 3/4]: KL = 1/4 log(1/2) + 3/4 log(3/2).
    logits = torch.tensor([[0.0, math.log(3)]]).view(1, 2, 1, 1)
    want = 0.25 * math.log(0.25 * 2) + 0.75 * math.log(0.75 * 2)
    assert L.kl_to_uniform(logits).item() == pytest.approx(want, rel=1e-6)
    assert L.kl_to_uniform(torch.zeros(1, 7, 2, 2)).abs().max().item() < 1e-6  # uniform: 0
    assert L.kl_to_uniform(torch.tensor([[1e4, 0.0, 0.0, 0.0]]), dim=1).item() == pytest.approx(math.log(4))


def test_gumbel_softmax_approaches_one_hot_as_tau_goes_to_zero():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 3, 3)
    noise = L.sample_gumbel(logits.shape)
    target = (logits + noise).argmax(1)
    one_hot = torch.nn.functional.one_hot(target, 10).permute(0, 3, 1, 2).float()
    errs = [(L.gumbel_softmax(logits, tau, noise) - one_hot).abs().max().item() for tau in (1.0, 0.1, 0.01, 1e-3)]
    assert errs[-1] < 1e-6 and all(a >= b for a, b in zip(errs, errs[1:]))
    soft = L.gumbel_softmax(logits, 1.0, noise)
    torch.testing.assert_close(soft.sum(1), torch.ones(4, 3, 3))
    # Straight-through: one-hot values, gradients of the relaxed sample.
    lg = logits.clone().requires_grad_(True)
    hard = L.gumbel_softmax(lg, 1.0, noise, hard=True)
    torch.testing.assert_close(hard.detach(), one_hot)
    w = torch.randn_like(hard)
    (hard * w).sum().backward()
    lg2 = logits.clone().requires_grad_(True)
    (L.gumbel_softmax(lg2, 1.0, noise) * w).sum().backward()
    torch.testing.assert_close(lg.grad, lg2.grad)


def test_gumbel_noise_statistics_and_per_sample_seeding():
    g = L.sample_gumbel((200_000,), generator=torch.Generator().manual_seed(0))
    assert g.mean().item() == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni constant
    a = L.per_sample_gumbel((3, 2), [5, 6])
    b = L.per_sample_gumbel((3, 2), [6])
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)  # a sample's noise depends on its seed only


def test_elbo_normalisation_by_hand():
    torch.manual_seed(0)
    b, c, h, v, g = 2, 3, 4, 5, 2
    x = torch.rand(b, c, h, h)
    stats = torch.randn(b, 2 * c, h, h)
    logits = torch.randn(b, v, g, g)
    out = L.elbo_terms(x, stats, logits, kl_weight=6.6, eps=0.1)
    y = 0.8 * x + 0.1
    nll = L.logit_laplace_nll(y, stats[:, :c], stats[:, c:])
    kl = L.kl_to_uniform(logits)
    # Negative ELBO per image divided by C*H*W, averaged over the batch.
    want = ((nll.sum((1, 2, 3)) + 6.6 * kl.sum((1, 2))) / (c * h * h)).mean()
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["rec"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)


def test_codebook_statistics():
    counts = L.code_counts(torch.tensor([[0, 0, 1, 3]]), 5)
    assert counts.tolist() == [2, 1, 0, 1, 0]
    # p = [1/2, 1/4, 1/4]: entropy 1.5 log 2 -> perplexity 2^1.5.
    assert L.perplexity(counts) == pytest.approx(2 ** 1.5)
    assert L.perplexity(torch.ones(8, dtype=torch.long)) == pytest.approx(8.0)
    x = torch.zeros(1, 3, 2, 2)
    assert L.psnr(x, x + 0.1).item() == pytest.approx(20.0, rel=1e-4)


def test_cosine_endpoints():
    assert cosine(0, 10, 1.0, 0.0) == 1.0 and cosine(10, 10, 1.0, 0.0) == 0.0
    assert cosine(5, 10, 1.0, 0.0) == pytest.approx(0.5) and cosine(50, 10, 1.0, 0.0) == 0.0


def test_paper_schedules_scale_with_run_length():
    cfg = load_config()
    s = DVAESchedules.from_config(cfg.dvae, cfg.dvae_train)
    assert s.total_steps == 3_000_000
    assert (s.kl_steps, s.tau_steps, s.lr_steps) == (5_000, 150_000, 1_200_000)
    assert s.beta(0) == 0.0 and s.beta(5_000) == pytest.approx(6.6) and s.beta(10**6) == pytest.approx(6.6)
    assert s.tau(0) == 1.0 and s.tau(150_000) == pytest.approx(1 / 16) and s.tau(3_000_000) == pytest.approx(1 / 16)
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(1_200_000) == pytest.approx(1.25e-6)
    assert s.lr(2_999_999) == pytest.approx(1.25e-6)
    # A run 1000x shorter keeps the same shape.
    short = DVAESchedules.from_config(cfg.dvae, load_config(overrides={"dvae_train.steps": 3000}).dvae_train)
    assert (short.kl_steps, short.tau_steps, short.lr_steps) == (5, 150, 1200)
    assert short.tau(75) == pytest.approx(s.tau(75_000))


def test_schedule_fractions_are_validated():
    with pytest.raises(ConfigError, match="dvae.kl_warmup_fraction"):
        DVAEConfig(kl_warmup_fraction=1.5)
    with pytest.raises(ConfigError, match="lr_anneal_fraction"):
        load_config(overrides={"dvae.lr_anneal_fraction": -0.1})


def test_gaussian_reconstruction_by_hand():
    y, mean, sigma = 0.3, 0.45, 0.1
    want = 0.5 * ((y - mean) / sigma) ** 2 + math.log(sigma * math.sqrt(2 * math.pi))
    got = L.gaussian_nll(torch.tensor(y, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64), sigma)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # In the ELBO the mean is sigmoid(mu) against the mapped pixel; the log-scale channels are unused.
    torch.manual_seed(0)
    x, stats, logits = torch.rand(2, 3, 4, 4), torch.randn(2, 6, 4, 4), torch.randn(2, 5, 2, 2)
    out = L.elbo_terms(x, stats, logits, kl_weight=1.0, eps=0.1, reconstruction="gaussian", sigma=0.2)
    nll = L.gaussian_nll(0.8 * x + 0.1, torch.sigmoid(stats[:, :3]), 0.2)
    assert out["rec"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
    stats2 = stats.clone()
    stats2[:, 3:] += 5.0
    out2 = L.elbo_terms(x, stats2, logits, kl_weight=1.0, eps=0.1, reconstruction="gaussian", sigma=0.2)
    assert out2["loss"].item() == out["loss"].item()
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        L.elbo_terms(x, stats, logits, kl_weight=1.0, eps=0.1, reconstruction="l2")


def test_reconstruction_options_are_validated():
    with pytest.raises(ConfigError, match="dvae.reconstruction_loss='mse'"):
        load_config(overrides={"dvae.reconstruction_loss": "mse"})
    with pytest.raises(ConfigError, match="dvae.gaussian_sigma"):
        DVAEConfig(gaussian_sigma=0.0)
    with pytest.raises(ConfigError, match="dvae.init_pixel_value"):
        DVAEConfig(init_pixel_value=1.5)


def test_unimplemented_dead_code_restart_is_refused_not_ignored():
    assert DVAEConfig(dead_code_restart=False).dead_code_restart is False  # old configs still load
    with pytest.raises(ConfigError, match="dead_code_restart=true: dead-code restarts are not implemented"):
        load_config(overrides={"dvae.dead_code_restart": True})
