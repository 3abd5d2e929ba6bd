"""Diagonal Gaussians in pure numpy: closed-form KL, reparameterised draws, latent interpolation.

A posterior q(z|x) = N(mu, diag(exp(logvar))) is given by its mean and log-variance arrays (..., D).
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Array",
    "InterpolationMethod",
    "generator",
    "interpolate",
    "kl_between",
    "kl_to_prior",
    "lerp",
    "sample",
    "slerp",
]

Array = npt.NDArray[np.float64]
InterpolationMethod = Literal["lerp", "slerp"]

# Below this angle (radians) between two latents slerp is numerically lerp.
_PARALLEL = 1e-6


def kl_to_prior(mu: npt.ArrayLike, logvar: npt.ArrayLike) -> Array:
    """KL(N(mu, sigma^2) || N(0, I)) per dimension, in nats (..., D).

    Kingma & Welling (2014), Appendix B: -KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2), with
    sigma^2 - 1 as expm1(log sigma^2): accurate near the prior, where KL is the small difference of terms
    near 1, 0 at the prior itself, and never below 0.
    """
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    kl: Array = np.maximum(0.5 * (np.expm1(logvar) - logvar + mu * mu), 0.0)
    return kl


def kl_between(
    mu_q: npt.ArrayLike, logvar_q: npt.ArrayLike, mu_p: npt.ArrayLike, logvar_p: npt.ArrayLike
) -> Array:
    """KL(q || p) between diagonal Gaussians per dimension, in nats (broadcast to (..., D)).

    1/2 (log sigma_p^2 - log sigma_q^2 + (sigma_q^2 + (mu_q - mu_p)^2) / sigma_p^2 - 1), written with
    r = log sigma_q^2 - log sigma_p^2 as 1/2 (expm1(r) - r + (mu_q - mu_p)^2 / sigma_p^2): 0 exactly for
    q = p (a mean term of 0 even where 1 / sigma_p^2 overflows), never below 0. p = N(0, I) gives
    `kl_to_prior`.
    """
    mu_q = np.asarray(mu_q, dtype=np.float64)
    logvar_q = np.asarray(logvar_q, dtype=np.float64)
    mu_p = np.asarray(mu_p, dtype=np.float64)
    logvar_p = np.asarray(logvar_p, dtype=np.float64)
    diff = mu_q - mu_p
    ratio = logvar_q - logvar_p
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.where(diff == 0.0, 0.0, diff * diff * np.exp(-logvar_p))
    kl: Array = np.maximum(0.5 * (np.expm1(ratio) - ratio + spread), 0.0)
    return kl


def sample(mu: npt.ArrayLike, logvar: npt.ArrayLike, eps: npt.ArrayLike) -> Array:
    """Reparameterised draws z = mu + exp(logvar / 2) * eps; eps ~ N(0, I) from the caller's generator."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    z: Array = mu + np.exp(0.5 * logvar) * np.asarray(eps, dtype=np.float64)
    return z


def lerp(start: npt.ArrayLike, end: npt.ArrayLike, t: npt.ArrayLike) -> Array:
    """Straight-line interpolation: one row per t, (T, D) from (D,), (D,) and (T,)."""
    a = np.asarray(start, dtype=np.float64)
    b = np.asarray(end, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[:, None]
    return (1.0 - t) * a + t * b


def slerp(start: npt.ArrayLike, end: npt.ArrayLike, t: npt.ArrayLike) -> Array:
    """Spherical interpolation (Shoemake 1985; White 2016 for latent spaces): (T, D) from (D,), (D,), (T,).

    The direction follows the great circle between the two directions and the norm goes linearly from one
    end's to the other's, which keeps intermediate points at the typical radius of N(0, I). (Shoemake's
    formula applied to the vectors themselves does so only for equal norms: between nearly opposite ones of
    different norms it runs far past both.) Nearly parallel, opposite or zero vectors fall back to lerp.
    """
    a = np.asarray(start, dtype=np.float64)
    b = np.asarray(end, dtype=np.float64)
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 or norm_b == 0.0:
        return lerp(a, b, t)
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = float(np.arccos(np.clip(np.dot(unit_a, unit_b), -1.0, 1.0)))
    sin_omega = np.sin(omega)
    if omega < _PARALLEL or sin_omega < _PARALLEL:
        return lerp(a, b, t)
    t = np.asarray(t, dtype=np.float64)[:, None]
    direction = (np.sin((1.0 - t) * omega) * unit_a + np.sin(t * omega) * unit_b) / sin_omega
    path: Array = direction * ((1.0 - t) * norm_a + t * norm_b)
    return path


def interpolate(start: npt.ArrayLike, end: npt.ArrayLike, steps: int, method: InterpolationMethod) -> Array:
    """`steps` evenly spaced points from `start` to `end` inclusive, (steps, D)."""
    t = np.linspace(0.0, 1.0, steps)
    return slerp(start, end, t) if method == "slerp" else lerp(start, end, t)


def generator(seed: int | None) -> np.random.Generator:
    """A generator seeded with `seed`; without a seed, the process's own (seeding one per call from the
    operating system's entropy costs more than the draws of a request)."""
    return np.random.default_rng(seed) if seed is not None else _unseeded()


@cache
def _unseeded() -> np.random.Generator:
    return np.random.default_rng()
