"""Quality of the default training recipe against the pytorch/examples VAE recipe, side by side.

Both train on the same seeded digits split for the same number of epochs; both report the one-sample
test negative ELBO in nats per image (the test loss pytorch/examples prints), and the same loss on the images
each trained on, which shows how much of the test figure is generalisation. Run: `make train-quality`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from training.evaluate import evaluate
from training.model import VAEConfig
from training.train import TrainConfig, load_checkpoint, load_splits, train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="for both recipes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        cfg = TrainConfig(seed=seed, epochs=args.epochs)
        train_split, _, test_split, _, _ = load_splits(cfg)
        train_x, test_x = torch.from_numpy(train_split.images), torch.from_numpy(test_split.images)
        started = time.perf_counter()
        reference, reference_train = train_examples(train_x, test_x, args.epochs, seed)
        reference_s = time.perf_counter() - started
        started = time.perf_counter()
        with TemporaryDirectory() as tmp:
            _, c, h, w = train_split.images.shape
            best = train(VAEConfig(channels=c, height=h, width=w), cfg, Path(tmp), progress=False)
            model = load_checkpoint(best).build()
            ours = evaluate(model, test_x, k=1, seed=seed).neg_elbo
            ours_train = evaluate(model, train_x, k=1, seed=seed).neg_elbo
        ours_s = time.perf_counter() - started
        rows.append(
            {
                "seed": seed,
                "reference": reference,
                "default": ours,
                "reference_train": reference_train,
                "default_train": ours_train,
                "reference_s": reference_s,
                "default_s": ours_s,
            }
        )
        print(
            f"seed {seed}: pytorch/examples recipe {reference:.2f} nats/image ({reference_s:.0f} s), "
            f"default recipe {ours:.2f} ({ours_s:.0f} s), {100 * (1 - ours / reference):.1f} % lower; "
            f"on their training images {reference_train:.2f} and {ours_train:.2f}"
        )
    mean_ref, mean_ours, mean_ref_train, mean_ours_train = (
        sum(r[key] for r in rows) / len(rows)
        for key in ("reference", "default", "reference_train", "default_train")
    )
    print(
        f"mean over seeds {args.seeds}, {args.epochs} epochs: "
        f"reference {mean_ref:.2f}, default {mean_ours:.2f} nats/image: "
        f"{100 * (1 - mean_ours / mean_ref):.1f} % lower (10 % lower is {0.9 * mean_ref:.2f}); "
        f"on their training images {mean_ref_train:.2f} and {mean_ours_train:.2f} "
        f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
