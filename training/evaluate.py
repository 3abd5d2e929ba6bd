"""Test-split metrics in nats per image: one-sample negative ELBO, its two terms, IWAE bound, active units."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from training.model import VAE, DiagonalGaussian, VAEConfig

__all__ = ["IWAE_VALUES", "Metrics", "active_units", "evaluate", "iwae_nll", "widest_layer"]

# The importance draws' seed is the run's seed XOR this. torch seeds a generator from the low 32 bits of its
# seed alone: an offset of 2^32 (or any multiple) would give the one-sample stream again.
_IMPORTANCE_STREAM = 0x9E3779B9
# Most values in one layer's activations while the importance draws are decoded (draws x images x the widest
# layer), 2^25 floats (128 MiB): larger images or wider models decode fewer draws at a time.
IWAE_VALUES = 1 << 25


def widest_layer(cfg: VAEConfig) -> int:
    """Values per image in the model's widest activation: its pixels, latents, a hidden layer or a
    convolution's."""
    if cfg.architecture == "mlp":
        return max(cfg.pixels, cfg.latent_dim, *cfg.hidden)
    stages = (c * (cfg.height >> i) * (cfg.width >> i) for i, c in enumerate(cfg.conv_channels, start=1))
    return max(cfg.pixels, cfg.latent_dim, cfg.conv_dense, *stages)


@dataclass(frozen=True)
class Metrics:
    """Matches the model card's `metrics` block."""

    neg_elbo: float  # one-sample negative ELBO, as pytorch/examples reports its test loss
    reconstruction: float  # one-sample -log p(x|z)
    kl: float  # closed-form KL(q(z|x) || N(0, I))
    iwae_nll: float  # importance-weighted estimate of -log p(x), a tighter upper bound
    iwae_samples: int
    active_units: int  # latent dimensions with Cov_x(E_q[z]) > 0.01
    images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def iwae_nll(model: VAE, x: Tensor, k: int, generator: torch.Generator, chunk: int = 250) -> Tensor:
    """-log p(x) ~= -log (1/k) sum_j p(x|z_j) p(z_j) / q(z_j|x), z_j ~ q(z|x) (Burda et al. 2016). (B,)

    The draws are decoded `chunk` at a time, fewer when that many would pass IWAE_VALUES in a layer."""
    chunk = max(1, min(chunk, IWAE_VALUES // (len(x) * widest_layer(model.cfg))))
    q = model.posterior(x)
    prior = DiagonalGaussian(torch.zeros_like(q.mu), torch.zeros_like(q.logvar))
    log_weights = []
    for start in range(0, k, chunk):
        draws = min(chunk, k - start)
        # (draws, B, D): the same posterior, sampled `draws` times
        eps = torch.randn((draws, *q.mu.shape), generator=generator)
        z = q.mu + q.std * eps
        x_rep = x.expand(draws, *x.shape).reshape(-1, *x.shape[1:])
        recon = model.reconstruction_nll(x_rep, z.reshape(-1, z.shape[-1])).reshape(draws, -1)
        log_weights.append(-recon + prior.log_prob(z) - q.log_prob(z))
    return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k))


@torch.no_grad()
def active_units(model: VAE, x: Tensor, threshold: float = 0.01) -> int:
    """Dimensions whose posterior mean varies across the data: Cov_x(E_q[z]) > threshold."""
    mu = model.posterior(x).mu
    if len(mu) < 2:
        raise ValueError(f"active units are a variance over images: it needs 2 or more, not {len(mu)}")
    return int((mu.var(dim=0, unbiased=True) > threshold).sum())


@torch.no_grad()
def evaluate(model: VAE, images: Tensor, *, k: int = 1000, seed: int = 0, batch_size: int = 256) -> Metrics:
    """All test metrics of `model` on `images` (N, C, H, W); the model is put back in its mode after."""
    was_training = model.training
    model.eval()
    # Each estimate draws from a stream of its own, so that the one-sample figure does not depend on k.
    one_sample = torch.Generator().manual_seed(seed)
    importance = torch.Generator().manual_seed((seed ^ _IMPORTANCE_STREAM) & 0xFFFFFFFF)
    recon_sum, kl_sum, iwae_sum = 0.0, 0.0, 0.0
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            recon, kl = model(x, one_sample)
            recon_sum += float(recon.sum())
            kl_sum += float(kl.sum())
            iwae_sum += float(iwae_nll(model, x, k, importance).sum())
        units = active_units(model, images)
    finally:
        model.train(was_training)
    n = len(images)
    return Metrics(
        neg_elbo=(recon_sum + kl_sum) / n,
        reconstruction=recon_sum / n,
        kl=kl_sum / n,
        iwae_nll=iwae_sum / n,
        iwae_samples=k,
        active_units=units,
        images=n,
    )
