"""The VAE: config, encoder x -> (mu, logvar), decoder z -> Bernoulli means, and the diagonal Gaussian.

Randomness stays outside the encoder and decoder, so both export to deterministic ONNX graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VAE", "Decoder", "DiagonalGaussian", "Encoder", "VAEConfig", "check_choices", "gaussian_kl"]


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}


def check_choices(config: object) -> None:
    """ValueError naming the field, for a field of a config dataclass typed `Literal[...]` that holds a value
    outside it (dataclasses check no types; a config may come from the command line or a checkpoint)."""
    for name, hint in get_type_hints(type(config)).items():
        value = getattr(config, name)
        if get_origin(hint) is Literal and value not in get_args(hint):
            raise ValueError(f"{name} must be one of {', '.join(get_args(hint))}; got {value!r}")


@dataclass
class VAEConfig:
    """Architecture of a VAE; saved in every checkpoint and in the model card."""

    channels: int = 1  # image channels: 1 (grayscale) or 3 (RGB)
    height: int = 8  # image height in pixels
    width: int = 8  # image width in pixels
    latent_dim: int = 16  # size of z
    architecture: Literal["mlp", "conv"] = "mlp"  # fully connected, or strided convolutions
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # mlp: widths of the hidden layers
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])  # conv: channels per stride-2 stage
    conv_dense: int = 256  # conv: width of the dense layer between the convolutions and the latents
    activation: Literal["relu", "elu", "silu"] = "silu"  # nonlinearity between layers
    logvar_min: float = -30.0  # log sigma^2 is clamped to [logvar_min, logvar_max] in the encoder
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("height", "width", "latent_dim", "conv_dense"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("hidden", "conv_channels"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{name} must be one or more sizes of at least 1, got {sizes}")
        check_choices(self)
        if not -math.inf < self.logvar_min < self.logvar_max < math.inf:
            raise ValueError(
                "logvar_min must be below logvar_max, both finite, got "
                f"[{self.logvar_min}, {self.logvar_max}]"
            )
        if self.architecture == "conv":
            factor = 2 ** len(self.conv_channels)
            if self.height % factor or self.width % factor:
                raise ValueError(
                    f"conv with {len(self.conv_channels)} stride-2 stages needs height and width divisible "
                    f"by {factor}, got {self.height}x{self.width}"
                )

    @property
    def pixels(self) -> int:
        """Values in one image."""
        return self.channels * self.height * self.width


def _activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def gaussian_kl(
    mu: Tensor, logvar: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None
) -> Tensor:
    """Per-dimension KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)); the prior N(0, I) when p is omitted.

    Closed form (Kingma & Welling 2014, Appendix B):
    KL(q || N(0, I)) = 1/2 sum_i (sigma_i^2 + mu_i^2 - 1 - log sigma_i^2).
    """
    if mu_p is None or logvar_p is None:
        return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).pow(2)) / logvar_p.exp() - 1.0)


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar)))."""

    def __init__(self, mu: Tensor, logvar: Tensor) -> None:
        self.mu = mu
        self.logvar = logvar
        self.std = torch.exp(0.5 * logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw mu + sigma * eps, differentiable in mu and logvar."""
        eps = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + self.std * eps

    def mode(self) -> Tensor:
        return self.mu

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL per dimension, shape like mu; against N(0, I) when `other` is None."""
        if other is None:
            return gaussian_kl(self.mu, self.logvar)
        return gaussian_kl(self.mu, self.logvar, other.mu, other.logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z), summed over the last dimension."""
        return (-0.5 * (math.log(2 * math.pi) + self.logvar + (z - self.mu).pow(2) / self.logvar.exp())).sum(
            -1
        )


class Encoder(nn.Module):
    """x (B, C, H, W) in [0, 1] -> (mu, logvar), each (B, D)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.body: nn.Module
        if cfg.architecture == "mlp":
            self.body = nn.Sequential(
                nn.Flatten(), _mlp([cfg.pixels, *cfg.hidden], cfg.activation), _activation(cfg.activation)
            )
            width = cfg.hidden[-1]
        else:
            stages: list[nn.Module] = []
            channels = [cfg.channels, *cfg.conv_channels]
            for a, b in zip(channels[:-1], channels[1:], strict=True):
                stages += [nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1), _activation(cfg.activation)]
            factor = 2 ** len(cfg.conv_channels)
            flat = channels[-1] * (cfg.height // factor) * (cfg.width // factor)
            stages += [nn.Flatten(), nn.Linear(flat, cfg.conv_dense), _activation(cfg.activation)]
            self.body = nn.Sequential(*stages)
            width = cfg.conv_dense
        self.head = nn.Linear(width, 2 * cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)  # (B, C, H, W) -> (B, width)
        mu, logvar = self.head(h).chunk(2, dim=-1)  # (B, 2D) -> 2 x (B, D)
        return mu, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)


class Decoder(nn.Module):
    """z (B, D) -> Bernoulli means (B, C, H, W) in [0, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.body: nn.Module
        if cfg.architecture == "mlp":
            self.body = _mlp([cfg.latent_dim, *reversed(cfg.hidden), cfg.pixels], cfg.activation)
        else:
            factor = 2 ** len(cfg.conv_channels)
            h, w = cfg.height // factor, cfg.width // factor
            channels = [*reversed(cfg.conv_channels), cfg.channels]
            stages: list[nn.Module] = [
                nn.Linear(cfg.latent_dim, cfg.conv_dense),
                _activation(cfg.activation),
                nn.Linear(cfg.conv_dense, channels[0] * h * w),
                _activation(cfg.activation),
                nn.Unflatten(1, (channels[0], h, w)),
            ]
            for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
                stages.append(nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1))
                if i < len(channels) - 2:
                    stages.append(_activation(cfg.activation))
            self.body = nn.Sequential(*stages)

    def logits(self, z: Tensor) -> Tensor:
        out: Tensor = self.body(z)  # (B, D) -> (B, C*H*W) or (B, C, H, W)
        return out.reshape(-1, self.cfg.channels, self.cfg.height, self.cfg.width)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))


class VAE(nn.Module):
    """Encoder and decoder with the negative ELBO of a Bernoulli likelihood."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encoder(x))

    def reconstruction_nll(self, x: Tensor, z: Tensor) -> Tensor:
        """-log p(x|z) per image: binary cross-entropy summed over pixels, in nats. (B,)"""
        logits = self.decoder.logits(z)
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One-sample loss terms: reconstruction (B,) and KL per dimension (B, D)."""
        q = self.posterior(x)
        z = q.sample(generator)
        return self.reconstruction_nll(x, z), q.kl()
