"""Closed-form KL, draws and interpolation, against torch.distributions and by their properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import Normal, kl_divergence

from service import gaussian

D = 6
# Means and log-variances in the range a trained encoder produces (and well beyond its usual few units).
means = arrays(np.float64, D, elements=st.floats(-20.0, 20.0))
logvars = arrays(np.float64, D, elements=st.floats(-15.0, 15.0))


def torch_kl(mu_q: np.ndarray, logvar_q: np.ndarray, mu_p: np.ndarray, logvar_p: np.ndarray) -> np.ndarray:
    """Per-dimension KL(q || p) by torch.distributions, in float64 (an independent implementation)."""

    def normal(mu: np.ndarray, logvar: np.ndarray) -> Normal:
        return Normal(torch.from_numpy(mu), torch.from_numpy(np.exp(0.5 * logvar)))

    return kl_divergence(normal(mu_q, logvar_q), normal(mu_p, logvar_p)).numpy()


@given(mu=means, logvar=logvars)
def test_kl_to_prior_agrees_with_torch(mu: np.ndarray, logvar: np.ndarray) -> None:
    expected = torch_kl(mu, logvar, np.zeros(D), np.zeros(D))
    # 1e-5 relative is the acceptance bound; the atol covers dimensions where q is the prior (KL ~ 0).
    np.testing.assert_allclose(gaussian.kl_to_prior(mu, logvar), expected, rtol=1e-5, atol=1e-9)


@given(mu_q=means, logvar_q=logvars, mu_p=means, logvar_p=logvars)
def test_kl_between_agrees_with_torch(
    mu_q: np.ndarray, logvar_q: np.ndarray, mu_p: np.ndarray, logvar_p: np.ndarray
) -> None:
    expected = torch_kl(mu_q, logvar_q, mu_p, logvar_p)
    np.testing.assert_allclose(
        gaussian.kl_between(mu_q, logvar_q, mu_p, logvar_p), expected, rtol=1e-5, atol=1e-9
    )


@given(mu=means, logvar=logvars)
def test_kl_between_reduces_to_prior_form(mu: np.ndarray, logvar: np.ndarray) -> None:
    general = gaussian.kl_between(mu, logvar, np.zeros(D), np.zeros(D))
    # The same terms in a different order: equal up to float64 rounding.
    np.testing.assert_allclose(general, gaussian.kl_to_prior(mu, logvar), rtol=1e-12, atol=1e-12)


@given(mu_q=means, logvar_q=logvars, mu_p=means, logvar_p=logvars)
def test_kl_is_never_negative(
    mu_q: np.ndarray, logvar_q: np.ndarray, mu_p: np.ndarray, logvar_p: np.ndarray
) -> None:
    # Not even -1e-16 from rounding where the exact value is 0: /kl answers never show a negative KL.
    assert (gaussian.kl_to_prior(mu_q, logvar_q) >= 0).all()
    assert (gaussian.kl_between(mu_q, logvar_q, mu_p, logvar_p) >= 0).all()


@given(mu=means, logvar=logvars)
def test_kl_of_a_gaussian_from_itself_is_zero(mu: np.ndarray, logvar: np.ndarray) -> None:
    np.testing.assert_array_equal(gaussian.kl_between(mu, logvar, mu, logvar), 0.0)
    np.testing.assert_array_equal(gaussian.kl_to_prior(np.zeros(D), np.zeros(D)), 0.0)
    # Even where 1 / sigma_p^2 overflows: no 0 x inf = NaN from the mean term.
    np.testing.assert_array_equal(gaussian.kl_between(0.0, -720.0, 0.0, -720.0), 0.0)


def test_kl_broadcasts_a_batch_against_one_target() -> None:
    mu, logvar = np.array([[0.0, 1.0], [2.0, -1.0]]), np.array([[0.0, 0.5], [-1.0, 1.0]])
    batched = gaussian.kl_between(mu, logvar, np.array([[0.5, 0.5]]), np.array([[0.0, 0.0]]))
    rows = [gaussian.kl_between(mu[i], logvar[i], np.array([0.5, 0.5]), np.zeros(2)) for i in range(2)]
    np.testing.assert_array_equal(batched, np.stack(rows))


def test_sample_is_the_reparameterisation() -> None:
    mu, logvar, eps = np.array([1.0, -2.0]), np.array([0.0, np.log(4.0)]), np.array([0.5, 1.0])
    np.testing.assert_allclose(gaussian.sample(mu, logvar, eps), [1.5, 0.0])


def test_sample_has_the_posterior_moments() -> None:
    mu, logvar = np.array([0.5, -1.0]), np.array([-2.0, 1.0])
    z = gaussian.sample(mu, logvar, np.random.default_rng(0).standard_normal((200_000, 2)))
    # 200 000 draws: the standard error of the mean is sigma / 447 < 0.004; 0.02 is five of them.
    np.testing.assert_allclose(z.mean(axis=0), mu, atol=0.02)
    np.testing.assert_allclose(z.var(axis=0), np.exp(logvar), rtol=0.02)


vectors = arrays(np.float64, D, elements=st.floats(-10.0, 10.0))


@given(a=vectors, b=vectors, method=st.sampled_from(["lerp", "slerp"]))
def test_interpolation_starts_and_ends_at_the_given_latents(
    a: np.ndarray, b: np.ndarray, method: str
) -> None:
    path = gaussian.interpolate(a, b, 5, method)  # type: ignore[arg-type]
    assert path.shape == (5, D)
    np.testing.assert_allclose(path[0], a, atol=1e-9)
    np.testing.assert_allclose(path[-1], b, atol=1e-9)


@given(a=vectors, b=vectors)
def test_slerp_norm_goes_linearly_from_one_end_to_the_other(a: np.ndarray, b: np.ndarray) -> None:
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if min(norm_a, norm_b) < 1e-3:
        return
    if float(np.dot(a, b)) / (norm_a * norm_b) < -0.999:  # nearly antipodal: slerp falls back to lerp
        return
    t = np.linspace(0.0, 1.0, 9)
    path = gaussian.slerp(a, b, t)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), (1 - t) * norm_a + t * norm_b, rtol=1e-9)


def test_slerp_between_nearly_opposite_latents_of_different_norms_stays_between_them() -> None:
    # Shoemake's formula on the raw vectors gave a midpoint of norm 200 000 here.
    a, b = np.array([3.0, 0.0, 0.0]), np.array([-1.0, 1e-5, 0.0])
    path = gaussian.slerp(a, b, np.linspace(0.0, 1.0, 3))
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), [3.0, 2.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("a", "b"),
    [(np.zeros(3), np.ones(3)), (np.ones(3), 2 * np.ones(3)), (np.ones(3), -np.ones(3))],
    ids=["zero-vector", "parallel", "antipodal"],
)
def test_slerp_falls_back_to_lerp_where_the_circle_is_undefined(a: np.ndarray, b: np.ndarray) -> None:
    t = np.linspace(0.0, 1.0, 4)
    np.testing.assert_allclose(gaussian.slerp(a, b, t), gaussian.lerp(a, b, t), atol=1e-9)


def test_lerp_midpoint() -> None:
    np.testing.assert_allclose(gaussian.lerp([0.0, 2.0], [2.0, 4.0], np.array([0.5])), [[1.0, 3.0]])
