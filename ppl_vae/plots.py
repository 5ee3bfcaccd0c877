"""Figures as PNG files, drawn on :class:`matplotlib.figure.Figure` (no pyplot state, no GUI)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from .files import atomic_write


def save(fig: Figure, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def elbo_curves(rows: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Train and test ELBO (nats per image) against epoch."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_elbo"] for r in rows], "o-", label="training objective")
    ax.plot(epochs, [r["test_elbo"] for r in rows], "s-", label="test ELBO")
    if "val_elbo" in rows[0]:
        ax.plot(epochs, [r["val_elbo"] for r in rows], "^-", label="validation ELBO")
    ax.set(xlabel="epoch", ylabel="nats / image", title="ELBO, higher is better")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
    return fig


def image_grid(rows: Sequence[Tensor], image_shape: tuple[int, int], path: str | os.PathLike,
               title: str = "", row_labels: Sequence[str] = ()) -> Figure:
    """Each tensor in ``rows`` (n, H*W) with values in [0, 1] becomes one row of images."""
    h, w = image_shape
    n = max(len(r) for r in rows)
    images = torch.cat([r.detach().float().cpu().clamp(0, 1).reshape(-1, 1, h, w)
                        for r in rows])
    grid = make_grid(images, nrow=n, padding=1, pad_value=1.0)
    fig = Figure(figsize=(min(12, 0.6 * n + 1), 0.6 * len(rows) + 0.6))
    ax = fig.subplots()
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        step = grid.shape[1] / len(rows)
        ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], list(row_labels))
    else:
        ax.set_yticks([])
    ax.set_title(title)
    save(fig, path)
    return fig


def latent_scatter(z: Tensor, labels: Tensor | None, path: str | os.PathLike) -> Figure:
    """Posterior means mu(x) in 2-D: the first two principal components when d > 2."""
    z = z.detach().float().cpu()
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        z = torch.as_tensor(PCA(n_components=2).fit_transform(z.numpy()))
        xlabel, ylabel = "PC 1", "PC 2"
    elif z.shape[1] == 2:
        xlabel, ylabel = "z1", "z2"
    else:
        z = torch.cat([z, torch.zeros_like(z)], 1)
        xlabel, ylabel = "z1", ""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.7)
    else:
        points = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=4,
                            alpha=0.7)
        fig.colorbar(points, ax=ax, label="label")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="q(z|x) means of test images")
    save(fig, path)
    return fig


def arviz():
    """ArviZ, imported without its FutureWarning about a coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def bound_distributions(bounds: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Kernel densities (ArviZ ``plot_dist``) of the repeated bound estimates: one panel per
    sample count, the estimators overlaid."""
    az = arviz()

    counts = sorted({r["particles"] for r in bounds})
    names = list(dict.fromkeys(r["estimator"] for r in bounds))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per estimator
    fig = Figure(figsize=(4 * len(counts), 3.2))
    axes = fig.subplots(1, len(counts), squeeze=False)[0]
    for ax, k in zip(axes, counts, strict=True):
        for r in (x for x in bounds if x["particles"] == k):
            with warnings.catch_warnings():  # ArviZ 0.23 on Matplotlib 3.11
                warnings.simplefilter("ignore", DeprecationWarning)
                az.plot_dist(np.asarray(r["values"]), ax=ax, color=colors[r["estimator"]],
                             label=f"{r['estimator']} ({r['sd']:.2f})")
        ax.set(title=f"{k} sample{'s' * (k > 1)} per data point", xlabel="nats per data point")
        ax.legend(fontsize=8, title="estimator (sd)", title_fontsize=8)
    fig.suptitle("repeated bound estimates on one batch", y=1.04)
    save(fig, path)
    return fig


def gradient_variance(gradients: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Total gradient variance per parameter group, estimators side by side (log scale)."""
    groups = sorted({r["group"] for r in gradients})
    configs = sorted({(r["estimator"], r["particles"]) for r in gradients},
                     key=lambda c: (c[1], c[0]))
    fig = Figure(figsize=(1.6 * len(groups) * max(1, len(configs) / 3) + 2, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(configs)
    by = {(r["estimator"], r["particles"], r["group"]): r["total_variance"] for r in gradients}
    for i, (e, k) in enumerate(configs):
        ax.bar([g + i * width for g in range(len(groups))],
               [by.get((e, k, grp), np.nan) for grp in groups], width, label=f"{e}, L={k}")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set(yscale="log", ylabel="total variance of the gradient",
           title="gradient variance per parameter group (lower is better)")
    ax.legend(fontsize=8)
    save(fig, path)
    return fig


def race_curves(race: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Test ELBO of each racer against epochs and against training seconds."""
    fig = Figure(figsize=(9, 3.5))
    by_epoch, by_time = fig.subplots(1, 2)
    racers = sorted({(r["estimator"], r["particles"]) for r in race})
    for e, k in racers:
        rows = [r for r in race if (r["estimator"], r["particles"]) == (e, k)]
        label = f"{e}, L={k}"
        by_epoch.plot([r["epoch"] for r in rows], [r["test_elbo"] for r in rows], "o-",
                      label=label)
        by_time.plot([r["seconds"] for r in rows], [r["test_elbo"] for r in rows], "o-",
                     label=label)
    by_epoch.set(xlabel="epoch", ylabel="test ELBO (nats)", title="per epoch")
    by_time.set(xlabel="training seconds", title="per second")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8)
    save(fig, path)
    return fig
