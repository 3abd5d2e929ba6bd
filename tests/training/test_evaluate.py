"""Test metrics: the IWAE bound and the count of active latent units."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from training import evaluate as evaluate_module
from training.evaluate import active_units, evaluate, iwae_nll
from training.model import VAE, DiagonalGaussian, VAEConfig


@pytest.mark.parametrize("k", [1, 8, 300], ids=lambda k: f"k{k}")
def test_iwae_is_exact_when_the_posterior_is_the_prior_and_the_decoder_ignores_z(k: int) -> None:
    """Then p(x) = p(x|z) for every z and every importance weight is p(x): the mean of the k weights, not
    their sum, gives -log p(x) whatever k (300 takes two chunks of draws)."""
    model = VAE(VAEConfig(hidden=[8], latent_dim=3)).eval()
    with torch.no_grad():
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()  # q(z|x) = N(0, I)
        last = model.decoder.body[-1]
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-3, 3, 64))
    x = (torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(0)) > 0.5).float()
    exact = model.reconstruction_nll(x, torch.zeros((4, 3)))
    estimate = iwae_nll(model, x, k, torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        VAEConfig(channels=3, height=32, width=32, hidden=[64]),
        VAEConfig(
            channels=3, height=32, width=32, architecture="conv", conv_channels=[32, 16], conv_dense=32
        ),
    ],
    ids=["mlp-pixels-widest", "conv-stage-widest"],
)
def test_importance_draws_are_decoded_within_a_bound_on_memory(cfg: VAEConfig) -> None:
    """A batch of 256 RGB 32 x 32 images took 250 draws at a time: 196 million values in the decoder's
    output (3.4 GB at its peak). Now the widest activation holds as many draws as IWAE_VALUES allows."""
    model = VAE(cfg).eval()
    sizes: list[int] = []
    for layer in model.decoder.modules():
        if not list(layer.children()):
            layer.register_forward_hook(lambda _, __, out: sizes.append(out.numel()))
    x = torch.rand((256, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    estimate = iwae_nll(model, x, 250, torch.Generator().manual_seed(1))
    assert estimate.shape == (256,) and bool(torch.isfinite(estimate).all())
    widest = evaluate_module.widest_layer(cfg)
    draws = evaluate_module.IWAE_VALUES // (256 * widest)
    assert 1 < draws < 250
    assert max(sizes) == draws * 256 * widest <= evaluate_module.IWAE_VALUES


def test_active_units_count_the_dimensions_whose_posterior_mean_varies_over_the_data() -> None:
    """Cov_x(E_q[z]) > 0.01 (Burda et al. 2016): of posterior means with variances 0, 0.005 and 0.02 over
    the images, one dimension is active, whatever the posterior variances do."""
    mu = torch.tensor([[3.0, -0.05, -0.1], [3.0, 0.05, 0.1]])  # unbiased variances 0, 0.005, 0.02
    logvar = torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]])  # variances 2, 2, 0
    model = SimpleNamespace(posterior=lambda x: DiagonalGaussian(mu, logvar))
    assert active_units(model, torch.zeros((2, 1, 8, 8))) == 1  # type: ignore[arg-type]
    # Over one image no variance is defined (NaN, which was counted as 0 active units): refused, named.
    one = SimpleNamespace(posterior=lambda x: DiagonalGaussian(mu[:1], logvar[:1]))
    with pytest.raises(ValueError, match="a variance over images: it needs 2 or more, not 1"):
        active_units(one, torch.zeros((1, 1, 8, 8)))  # type: ignore[arg-type]


def test_evaluate_puts_the_model_back_in_its_mode_when_it_fails() -> None:
    model = VAE(VAEConfig(hidden=[8], latent_dim=3))
    model.train()
    with pytest.raises(ValueError, match="a variance over images"):
        evaluate(model, torch.rand((1, 1, 8, 8)), k=2)
    assert model.training


def test_the_one_sample_figures_do_not_depend_on_the_importance_samples() -> None:
    """The card's one-sample negative ELBO is what `evaluate --iwae-samples 1` reports for the same model
    and seed, over several batches (the draws of one estimate do not shift the other's)."""
    model = VAE(VAEConfig(hidden=[8], latent_dim=3))
    images = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    few, many = (evaluate(model, images, k=k, seed=3, batch_size=4) for k in (1, 50))
    assert (few.neg_elbo, few.reconstruction, few.kl) == (many.neg_elbo, many.reconstruction, many.kl)
    assert few.iwae_nll != many.iwae_nll


def test_the_importance_draws_are_not_the_one_sample_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two streams, not one stream twice: each generator's state as its first draw is about to be taken
    gives different numbers (torch seeds from the low 32 bits only, so seed + 2^32 gave the same ones)."""
    states: dict[str, torch.Tensor] = {}

    def first_state(name: str, real: Any) -> Any:
        def recorded(*args: Any) -> Any:  # (self, x, generator) and (model, x, k, generator)
            states.setdefault(name, args[-1].get_state())
            return real(*args)

        return recorded

    monkeypatch.setattr(evaluate_module, "iwae_nll", first_state("importance", evaluate_module.iwae_nll))
    monkeypatch.setattr(VAE, "forward", first_state("one sample", VAE.forward))
    for seed in (0, 7, 2**32 - 1):
        states.clear()
        evaluate(VAE(VAEConfig(hidden=[8], latent_dim=3)), torch.rand((4, 1, 8, 8)), k=2, seed=seed)
        draws = []
        for state in states.values():
            generator = torch.Generator()
            generator.set_state(state)
            draws.append(torch.randn(16, generator=generator))
        assert len(draws) == 2 and not torch.equal(*draws), seed
