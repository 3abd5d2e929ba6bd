"""Quality of the default training recipe against the pytorch/examples VAE recipe, side by side.

Both train on the same seeded digits split for the same number of epochs; both report the one-sample
test negative ELBO in nats per image (the test loss pytorch/examples prints), and the same loss on the images
each trained on, which shows how much of the test figure is generalisation. Beside them: the least binary
cross-entropy any decoder can score on those images (their grey levels' own entropy), the exact loss of an
autoregressive model of the pixels (MADE: no latent, each pixel given those before it), which shows what
the likelihood allows beyond a VAE, the exact loss of a mixture of Bernoulli images (a discrete latent, the
pixels independent given it as a VAE's are given z), and with `--variants`, the same loss for variants of
the default recipe.
Run: `make train-quality`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from training.evaluate import evaluate
from training.model import VAEConfig
from training.train import TrainConfig, load_checkpoint, load_splits, train

# Variants of the default recipe, by name: overrides of its VAEConfig and of its TrainConfig.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "wider": ({"hidden": [1024, 1024]}, {}),
    "deeper": ({"hidden": [512, 512, 512]}, {}),
    "conv": ({"architecture": "conv"}, {}),
    "latents-32": ({"latent_dim": 32}, {}),
    "free-bits": ({}, {"free_bits": 0.25}),
    "long-warm-up": ({}, {"warmup_epochs": 50}),
    "weight-decay": ({}, {"weight_decay": 0.05}),
    "small-batch": ({}, {"batch_size": 16}),
}


def _versus(loss: float, reference: float) -> str:
    """`2.9 % lower` (or higher) than `reference`."""
    change = 100 * (1 - loss / reference)
    return f"{abs(change):.1f} % {'lower' if change >= 0 else 'higher'}"


def _describe(name: str) -> str:
    """A variant's name with what it changes: `wider (hidden=[1024, 1024])`."""
    model_overrides, train_overrides = VARIANTS[name]
    return f"{name} ({', '.join(f'{k}={v}' for k, v in {**model_overrides, **train_overrides}.items())})"


class ExamplesVAE(nn.Module):
    """pytorch/examples `vae/main.py`, with the 784 pixels of MNIST replaced by the image size."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.pixels = pixels
        self.fc1 = nn.Linear(pixels, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, pixels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h1 = F.relu(self.fc1(x.view(-1, self.pixels)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def examples_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[1]), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def _as_dataset(images: Tensor) -> Dataset[Tensor]:
    """A tensor is a map-style dataset of its rows (what pytorch/examples' loaders yield, less the labels)."""
    return cast("Dataset[Tensor]", images)


def _examples_loss_per_image(model: ExamplesVAE, images: Tensor) -> float:
    """pytorch/examples' test loss: one-sample negative ELBO summed over `images`, per image."""
    model.eval()
    with torch.no_grad():
        total = 0.0
        for batch in torch.utils.data.DataLoader(_as_dataset(images), batch_size=128):
            recon, mu, logvar = model(batch)
            total += float(examples_loss(recon, batch, mu, logvar))
    return total / len(images)


def train_examples(train_x: Tensor, test_x: Tensor, epochs: int, seed: int) -> tuple[float, float]:
    """The reference recipe: Adam 1e-3, batch 128, shuffled; returns the loss per image on (test, train)."""
    torch.manual_seed(seed)
    pixels = train_x[0].numel()
    model = ExamplesVAE(pixels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.utils.data.DataLoader(_as_dataset(train_x), batch_size=128, shuffle=True):
            optimizer.zero_grad()
            recon, mu, logvar = model(batch)
            loss = examples_loss(recon, batch, mu, logvar)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return _examples_loss_per_image(model, test_x), _examples_loss_per_image(model, train_x)


class MaskedLinear(nn.Linear):
    """A linear layer whose weights are multiplied by a fixed 0/1 mask."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)
        self.mask: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """An autoregressive model of the pixels (Germain et al., 2015), one hidden layer: each pixel's Bernoulli
    mean from the pixels before it in raster order, and no latent. Its loss is the same binary cross-entropy,
    exact rather than a bound: what that likelihood allows a model whose pixels are not independent given a
    latent (a VAE's decoder makes them so)."""

    def __init__(self, pixels: int, hidden: int, seed: int) -> None:
        super().__init__()
        order = torch.arange(1, pixels + 1)
        # Each hidden unit sees the pixels up to a degree drawn from 1 .. pixels - 1; an output, fewer.
        degrees = torch.randint(1, pixels, (hidden,), generator=torch.Generator().manual_seed(seed))
        self.hidden = MaskedLinear((degrees[:, None] >= order[None, :]).float())
        self.out = MaskedLinear((order[:, None] > degrees[None, :]).float())
        self.direct = MaskedLinear((order[:, None] > order[None, :]).float())

    def forward(self, x: Tensor) -> Tensor:
        """Logits of each pixel given those before it. (B, pixels)"""
        logits: Tensor = self.out(F.relu(self.hidden(x))) + self.direct(x)
        return logits


def _made_loss_per_image(model: MADE, images: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        x = images.flatten(1)
        return float(F.binary_cross_entropy_with_logits(model(x), x, reduction="sum")) / len(x)


def train_made(train_x: Tensor, val_x: Tensor, test_x: Tensor, epochs: int, seed: int) -> tuple[float, float]:
    """MADE with 1024 hidden units, AdamW 1e-3 (weight decay 0.01), batch 32, the epoch of the best
    validation loss kept; returns the loss per image on (test, train)."""
    torch.manual_seed(seed)
    model = MADE(train_x[0].numel(), 1024, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    best, best_state = float("inf"), model.state_dict()
    for _ in range(epochs):
        model.train()
        for batch in torch.utils.data.DataLoader(_as_dataset(train_x), batch_size=32, shuffle=True):
            x = batch.flatten(1)
            loss = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        val = _made_loss_per_image(model, val_x)
        if val < best:
            best, best_state = val, {name: t.clone() for name, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    return _made_loss_per_image(model, test_x), _made_loss_per_image(model, train_x)


# The mixture's sizes and smoothings tried; the pair with the least validation loss is kept.
MIXTURE_COMPONENTS = (50, 100, 200)
MIXTURE_SMOOTHING = (0.02, 0.05, 0.1)


class BernoulliMixture(NamedTuple):
    """K images of Bernoulli means and their weights: p(x) = sum_k w_k prod_i Bern(x_i; m_ki). A latent model
    whose pixels are independent given the latent, as a VAE's are, with a discrete latent in place of z, so
    its loss, -log sum_k w_k prod_i Bern(x_i; m_ki), is exact where a VAE's is a bound (on grey levels, a
    cross-entropy against soft targets rather than a normalised likelihood, as for every model here)."""

    means: Tensor  # (K, pixels) float64 in (0, 1)
    weights: Tensor  # (K,) float64, summing to 1

    def joint(self, x: Tensor) -> Tensor:
        """log w_k + log p(x | k) of each image and component. x: (N, pixels) float64 -> (N, K)"""
        return x @ self.means.log().T + (1 - x) @ torch.log1p(-self.means).T + self.weights.log()

    def loss_per_image(self, images: Tensor) -> float:
        """-log p(x), the same binary cross-entropy the VAEs pay, averaged over `images`."""
        return -float(torch.logsumexp(self.joint(images.flatten(1).double()), 1).mean())


def fit_bernoulli_mixture(
    train_x: Tensor, components: int, smoothing: float, seed: int, iterations: int
) -> BernoulliMixture:
    """At most `iterations` steps of EM, from `components` distinct training images drawn with `seed` and
    taken halfway to grey. Each M-step is the MAP estimate under Beta(1 + smoothing, 1 + smoothing) on each
    mean and Dirichlet(2) on the weights, so no mean reaches 0 or 1. It stops early when a step gains less
    than 1e-9 nats per image of what EM then raises at each step, the log-likelihood plus the log-prior
    (the likelihood alone may dip on the way)."""
    x = train_x.flatten(1).double()
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:components]
    mixture = BernoulliMixture(x[pick] * 0.5 + 0.25, torch.full((components,), 1 / components).double())
    previous = -math.inf
    for _ in range(iterations):
        joint = mixture.joint(x)
        log_px = torch.logsumexp(joint, 1, keepdim=True)
        means, weights = mixture
        log_prior = smoothing * float((means.log() + torch.log1p(-means)).sum()) + float(weights.log().sum())
        objective = float(log_px.mean()) + log_prior / len(x)
        if objective - previous < 1e-9:
            break
        previous = objective
        responsibilities = (joint - log_px).exp()  # (N, K): p(k | x)
        counts = responsibilities.sum(0)
        mixture = BernoulliMixture(
            (responsibilities.T @ x + smoothing) / (counts[:, None] + 2 * smoothing),
            (counts + 1) / (len(x) + components),
        )
    return mixture


def train_mixture(
    train_x: Tensor, val_x: Tensor, test_x: Tensor, seed: int, iterations: int
) -> tuple[float, float, int, float]:
    """The mixture of the sizes and smoothings above with the least validation loss; returns its loss per
    image on (test, train), its number of components and its smoothing."""
    fits = [
        (fit_bernoulli_mixture(train_x, k, a, seed, iterations), k, a)
        for k, a in itertools.product(MIXTURE_COMPONENTS, MIXTURE_SMOOTHING)
    ]
    best, components, smoothing = min(fits, key=lambda fit: fit[0].loss_per_image(val_x))
    return best.loss_per_image(test_x), best.loss_per_image(train_x), components, smoothing


def grey_level_floor(images: npt.NDArray[np.float32]) -> float:
    """The least binary cross-entropy any decoder scores on `images`, per image: BCE(x, p) = H(x) + KL(x || p)
    for each pixel, so a decoder that predicts every grey level exactly still pays the pixels' entropy."""
    p = np.clip(images.reshape(len(images), -1).astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-(p * np.log(p) + (1 - p) * np.log1p(-p)).sum(axis=1).mean())


def train_default(
    cfg: TrainConfig, train_x: Tensor, test_x: Tensor, model_overrides: dict[str, Any]
) -> tuple[float, float]:
    """The default recipe (with `model_overrides` on its VAEConfig); returns the loss per image on (test,
    train), one sample each, as `evaluate` reports it."""
    with TemporaryDirectory() as tmp:
        _, c, h, w = train_x.shape
        model_cfg = VAEConfig(channels=c, height=h, width=w, **model_overrides)
        best = train(model_cfg, cfg, Path(tmp), progress=False)
        model = load_checkpoint(best).build()
        test = evaluate(model, test_x, k=1, seed=cfg.seed).neg_elbo
        train_loss = evaluate(model, train_x, k=1, seed=cfg.seed).neg_elbo
    return test, train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="for both recipes and MADE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--em-iterations", type=int, default=2000, help="at most, for each mixture's EM")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=list(VARIANTS),
        metavar="NAME",
        help="also train these variants of the default recipe (all when none is named): "
        + "; ".join(map(_describe, VARIANTS)),
    )
    args = parser.parse_args()
    variants = (args.variants or list(VARIANTS)) if args.variants is not None else []

    rows = []
    for seed in args.seeds:
        cfg = TrainConfig(seed=seed, epochs=args.epochs)
        train_split, val_split, test_split, _, _ = load_splits(cfg)
        train_x, test_x = torch.from_numpy(train_split.images), torch.from_numpy(test_split.images)
        started = time.perf_counter()
        reference, reference_train = train_examples(train_x, test_x, args.epochs, seed)
        reference_s = time.perf_counter() - started
        started = time.perf_counter()
        ours, ours_train = train_default(cfg, train_x, test_x, {})
        ours_s = time.perf_counter() - started
        val_x = torch.from_numpy(val_split.images)
        made, made_train = train_made(train_x, val_x, test_x, args.epochs, seed)
        mixture, mixture_train, components, smoothing = train_mixture(
            train_x, val_x, test_x, seed, args.em_iterations
        )
        row: dict[str, Any] = {
            "seed": seed,
            "reference": reference,
            "default": ours,
            "reference_train": reference_train,
            "default_train": ours_train,
            "reference_s": reference_s,
            "default_s": ours_s,
            "floor": grey_level_floor(test_split.images),
            "floor_train": grey_level_floor(train_split.images),
            "autoregressive": made,
            "autoregressive_train": made_train,
            "mixture": mixture,
            "mixture_train": mixture_train,
            "mixture_components": components,
            "mixture_smoothing": smoothing,
        }
        print(
            f"seed {seed}: pytorch/examples recipe {reference:.2f} nats/image ({reference_s:.0f} s), "
            f"default recipe {ours:.2f} ({ours_s:.0f} s), {_versus(ours, reference)}; "
            f"on their training images {reference_train:.2f} and {ours_train:.2f}; "
            f"no decoder scores below {row['floor']:.2f} and {row['floor_train']:.2f}; "
            f"an autoregressive model (MADE, no latent) {made:.2f}, on its training images {made_train:.2f}; "
            f"a mixture of {components} Bernoulli images (smoothing {smoothing}) {mixture:.2f}, "
            f"on its training images {mixture_train:.2f}",
            flush=True,
        )
        row["variants"] = {}
        for name in variants:
            model_overrides, train_overrides = VARIANTS[name]
            test, train_loss = train_default(
                replace(cfg, **train_overrides), train_x, test_x, model_overrides
            )
            row["variants"][name] = {"test": test, "train": train_loss}
            print(
                f"seed {seed}: {_describe(name)}: {test:.2f}; on its training images {train_loss:.2f}",
                flush=True,
            )
        rows.append(row)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    mean_ref, mean_ours, mean_ref_train, mean_ours_train, floor, floor_train = (
        mean([r[key] for r in rows])
        for key in ("reference", "default", "reference_train", "default_train", "floor", "floor_train")
    )
    made, made_train, mixture, mixture_train = (
        mean([r[key] for r in rows])
        for key in ("autoregressive", "autoregressive_train", "mixture", "mixture_train")
    )
    print(
        f"mean over seeds {args.seeds}, {args.epochs} epochs: "
        f"reference {mean_ref:.2f}, default {mean_ours:.2f} nats/image: "
        f"{_versus(mean_ours, mean_ref)} (10 % lower is {0.9 * mean_ref:.2f}); "
        f"on their training images {mean_ref_train:.2f} and {mean_ours_train:.2f}; "
        f"no decoder scores below {floor:.2f} and {floor_train:.2f} "
        f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print(
        f"  autoregressive model (MADE, no latent; pixels not independent given z): {made:.2f} "
        f"({_versus(made, mean_ref)} than the reference); on its training images {made_train:.2f}"
    )
    print(
        f"  mixture of Bernoulli images (a discrete latent; pixels independent given it, exact loss): "
        f"{mixture:.2f} ({_versus(mixture, mean_ref)} than the reference); "
        f"on its training images {mixture_train:.2f}"
    )
    for name in variants:
        test, train_loss = (mean([r["variants"][name][key] for r in rows]) for key in ("test", "train"))
        print(
            f"  variant {_describe(name)}: {test:.2f} "
            f"({_versus(test, mean_ref)} than the reference); "
            f"on its training images {train_loss:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
