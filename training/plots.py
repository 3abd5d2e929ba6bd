"""Figures written beside an exported model: loss curves, reconstructions, prior samples, latent map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from training.model import VAE  # noqa: E402

__all__ = ["write_plots"]

PLOTS = ("loss_curves.png", "reconstructions.png", "samples.png", "latent_map.png")


def _tile(images: npt.NDArray[np.float32], columns: int) -> npt.NDArray[np.float32]:
    """(N, C, H, W) -> one (rows*H, columns*W[, C]) image with a one-pixel gap."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.ones((c, rows * (h + 1) - 1, columns * (w + 1) - 1), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _show(ax: Axes, grid: npt.NDArray[np.float32], title: str) -> None:
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def _loss_curves(history: list[dict[str, float]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(
        axes, ("neg_elbo", "reconstruction", "kl"), ("negative ELBO", "reconstruction", "KL"), strict=True
    ):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats / image")
        ax.set_title(label)
        ax.legend()
    if history:
        low = min(row["val_neg_elbo"] for row in history)
        axes[0].set_ylim(low * 0.9, low * 2.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def write_plots(
    model: VAE,
    history: list[dict[str, float]],
    test_images: npt.NDArray[np.float32],
    test_labels: npt.NDArray[np.int64] | None,
    out: Path,
    seed: int = 0,
) -> list[str]:
    """Write the four figures to `out`; return their file names."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    _loss_curves(history, out / PLOTS[0])

    x = torch.from_numpy(test_images[:32])
    recon = model.decoder(model.posterior(x).mode()).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5))
    _show(axes[0], _tile(x.numpy(), 8), "test images")
    _show(axes[1], _tile(recon, 8), "reconstructions (decoder mean of mu)")
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=100)
    plt.close(fig)

    z = torch.randn((64, model.cfg.latent_dim), generator=generator)
    fig, ax = plt.subplots(figsize=(6, 6))
    _show(ax, _tile(model.decoder(z).numpy(), 8), "samples from the prior N(0, I)")
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=100)
    plt.close(fig)

    mu = model.posterior(torch.from_numpy(test_images)).mu.numpy()
    if mu.shape[1] > 2:  # principal components of the posterior means
        centred = mu - mu.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, axis_label = centred @ vt[:2].T, "principal component"
        # Fewer than two test images give fewer than two components: the missing ones are 0.
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    else:
        points, axis_label = np.pad(mu, ((0, 0), (0, 2 - mu.shape[1]))), "z"
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if test_labels is not None:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=test_labels, cmap="tab10", s=8)
        fig.colorbar(scatter, ax=ax, label="label")
    else:  # no colours to map: a colormap would only earn matplotlib's warning that it is ignored
        ax.scatter(points[:, 0], points[:, 1], s=8)
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_title("posterior means of the test images")
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=100)
    plt.close(fig)
    return list(PLOTS)
