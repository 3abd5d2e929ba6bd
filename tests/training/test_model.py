"""The Gaussian maths and the networks' shapes."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from training.model import VAE, DiagonalGaussian, VAEConfig, gaussian_kl


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_prior_kl_equals_torch_distributions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn((50, 20), generator=g, dtype=torch.float64)
    logvar = 4 * torch.randn((50, 20), generator=g, dtype=torch.float64)
    expected = kl_divergence(_normal(mu, logvar), _normal(torch.zeros_like(mu), torch.zeros_like(logvar)))
    torch.testing.assert_close(gaussian_kl(mu, logvar).sum(-1), expected, rtol=1e-12, atol=1e-12)


def test_general_kl_equals_torch_distributions_and_reduces_to_prior() -> None:
    g = torch.Generator().manual_seed(3)
    mu, logvar, mu_p, logvar_p = (
        2 * torch.randn((40, 6), generator=g, dtype=torch.float64) for _ in range(4)
    )
    expected = kl_divergence(_normal(mu, logvar), _normal(mu_p, logvar_p))
    torch.testing.assert_close(
        gaussian_kl(mu, logvar, mu_p, logvar_p).sum(-1), expected, rtol=1e-12, atol=1e-12
    )
    zeros = torch.zeros_like(mu)
    torch.testing.assert_close(gaussian_kl(mu, logvar, zeros, zeros), gaussian_kl(mu, logvar))


def test_kl_matches_monte_carlo_estimate() -> None:
    g = torch.Generator().manual_seed(4)
    q = DiagonalGaussian(
        torch.randn((1, 5), generator=g, dtype=torch.float64),
        torch.randn((1, 5), generator=g, dtype=torch.float64),
    )
    prior = DiagonalGaussian(
        torch.zeros((1, 5), dtype=torch.float64), torch.zeros((1, 5), dtype=torch.float64)
    )
    draws = 200_000
    z = q.mu + q.std * torch.randn((draws, 5), generator=g, dtype=torch.float64)
    log_ratio = q.log_prob(z) - prior.log_prob(z)
    estimate, stderr = log_ratio.mean(), log_ratio.std() / draws**0.5
    # A Monte Carlo mean is within 5 standard errors of the truth with probability 1 - 6e-7.
    assert abs(float(estimate - q.kl().sum())) < 5 * float(stderr)


def test_sample_is_seeded_and_mode_is_mean() -> None:
    q = DiagonalGaussian(torch.zeros((4, 3)), torch.zeros((4, 3)))
    a = q.sample(torch.Generator().manual_seed(0))
    b = q.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(q.mode(), q.mu)


@pytest.mark.parametrize(
    ("architecture", "size"),
    [("mlp", 8), ("conv", 8), ("conv", 28)],
    ids=["mlp-8", "conv-8", "conv-28"],
)
def test_shapes_and_ranges(architecture: str, size: int) -> None:
    cfg = VAEConfig(height=size, width=size, latent_dim=5, architecture=architecture)  # type: ignore[arg-type]
    model = VAE(cfg).eval().requires_grad_(False)
    x = torch.rand((3, 1, size, size))
    mu, logvar = model.encoder(x)
    assert mu.shape == logvar.shape == (3, 5)
    out = model.decoder(torch.randn((3, 5)) * 50)
    assert out.shape == (3, 1, size, size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    recon, kl = model(x)
    assert recon.shape == (3,) and kl.shape == (3, 5)


def test_logvar_is_clamped() -> None:
    cfg = VAEConfig(logvar_min=-2.0, logvar_max=1.0)
    model = VAE(cfg).eval()
    with torch.no_grad():
        model.encoder.head.bias.fill_(1e4)
        _, high = model.encoder(torch.rand((2, 1, 8, 8)))
        model.encoder.head.bias.fill_(-1e4)
        _, low = model.encoder(torch.rand((2, 1, 8, 8)))
    assert float(high.max()) == 1.0 and float(low.min()) == -2.0


def test_conv_needs_divisible_size() -> None:
    with pytest.raises(ValueError, match="divisible by 4, got 10x10"):
        VAEConfig(height=10, width=10, architecture="conv")
