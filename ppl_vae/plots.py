"""Figures as PNG files, drawn on :class:`matplotlib.figure.Figure` (no pyplot state, no GUI)."""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory
from torch import Tensor
from torchvision.utils import make_grid

from .data import pixels
from .files import atomic_write

# One colour per estimator in every comparison figure (bounds, gradients, race); particle
# counts L are told apart by hatch / alpha (bars) or line style and marker (curves).
ESTIMATOR_COLORS = {"mc": "C0", "analytic": "C1", "iwae": "C2", "enum": "C3", "stl": "C4",
                    "iwae-dreg": "C5", "rws": "C6", "tracegraph": "C8"}
_SPARE_COLORS = ("C9", "tab:olive", "tab:cyan", "navy", "maroon")  # C7 (grey): zero markers
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def estimator_color(name: str) -> str:
    """The colour of estimator ``name``: fixed for the known ones, and for any other name one
    of the spare colours picked by a stable hash, so that it too is the same in every figure."""
    spare = _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]
    return ESTIMATOR_COLORS.get(name, spare)


def legend_outside(ax: Axes, **kwargs):
    """A legend to the right of ``ax``, never over data (``save`` crops the PNG around it)."""
    return ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0,
                        "fontsize": 8, **kwargs})


def save(fig: Figure, path: str | os.PathLike) -> Figure:
    """Write ``fig`` to ``path`` as a PNG (atomically) and return it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return fig


def elbo_curves(rows: Sequence[dict], path: str | os.PathLike) -> Figure:
    """The training objective and test ELBO (nats per image) against epoch, and a test
    accuracy (a family's ``on_epoch`` numbers) on a second axis where the rows have one."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_elbo"] for r in rows], "o-", label="training objective")
    ax.plot(epochs, [r["test_elbo"] for r in rows], "s-", label="test ELBO")
    if "val_elbo" in rows[0]:
        ax.plot(epochs, [r["val_elbo"] for r in rows], "^-", label="validation ELBO")
    ax.set(xlabel="epoch", ylabel="nats / image", title="ELBO, higher is better")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 on short runs
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if all("test_accuracy" in r for r in rows):
        right = ax.twinx()
        right.plot(epochs, [100 * r["test_accuracy"] for r in rows], "d--", color="C3",
                   label="test accuracy (right)")
        right.set(xlabel="epoch", ylabel="test accuracy (%)")  # (its x axis is ax's)
        ax.set_title("ELBO and test accuracy, higher is better")
        more, more_labels = right.get_legend_handles_labels()
        legend_outside(ax, handles=handles + more, labels=labels + more_labels, ncol=2,
                       loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: right side taken
    else:
        legend_outside(ax)
    return save(fig, path)


def grid_image(rows: Sequence[Tensor], image_shape: Sequence[int]) -> Tensor:
    """Each tensor in ``rows`` (n, C*H*W) one row of images of ``image_shape`` (C, H, W),
    as one image (3 or 1, H', W') in [0, 1]: colour for C = 3, grey otherwise (other C:
    channels side by side); uint8 levels are divided by 255."""
    *channels, h, w = image_shape
    c = channels[0] if channels else 1

    def images(r: Tensor) -> Tensor:
        r = pixels(r.detach().cpu()).float().clamp(0, 1).reshape(-1, c, h, w)
        if c not in (1, 3):  # channels side by side: (n, 1, H, C*W)
            r = r.permute(0, 2, 1, 3).reshape(-1, 1, h, c * w)
        return r

    n = max(len(r) for r in rows)
    return make_grid(torch.cat([images(r) for r in rows]), nrow=n, padding=1, pad_value=1.0)


def image_grid(rows: Sequence[Tensor], image_shape: Sequence[int], path: str | os.PathLike,
               title: str = "", row_labels: Sequence[str] = ()) -> Figure:
    """:func:`grid_image` of ``rows`` drawn, for ``image_shape`` (C, H, W) or (H, W), pixels
    clipped to [0, 1]. No numeric axes: rows carry ``row_labels``; the x label says a column
    is a sample or an image."""
    n = max(len(r) for r in rows)
    grid = grid_image(rows, image_shape)
    fig = Figure(figsize=(min(12, 0.6 * n + 1), 0.6 * len(rows) + 0.9))
    ax = fig.subplots()
    if len(image_shape) == 3 and image_shape[0] == 3:  # colour
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    else:  # make_grid repeats one channel three times
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        step = grid.shape[1] / len(rows)
        ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], list(row_labels))
    else:
        ax.set_yticks([])
    column = "sample" if "sample" in title.lower() else "image"
    ax.set_xlabel(f"{column} (one per column)" if row_labels else f"{column}s (one per cell)",
                  fontsize=9)
    ax.set_title(title)
    return save(fig, path)


def latent_scatter(z: Tensor, labels: Tensor | None, path: str | os.PathLike,
                   label_name: str = "label") -> Figure:
    """Posterior means mu(x) in 2-D: the first two principal components when d > 2; up to
    ten classes get a colour each and a legend titled ``label_name``, more a colour bar."""
    z = z.detach().float().cpu()
    one_d = z.shape[1] == 1
    xlabel, ylabel = "z1", "z2"
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        z = torch.as_tensor(PCA(n_components=2).fit_transform(z.numpy()))
        xlabel, ylabel = "PC 1", "PC 2"
    elif one_d:
        z = torch.cat([z, torch.zeros_like(z)], 1)
        ylabel = "none (1-D latent, drawn at 0)"
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.7)
    elif len(classes := labels.unique()) <= 10:
        labels = labels.cpu()
        for c in classes.tolist():
            ax.scatter(z[labels == c, 0], z[labels == c, 1], s=4, alpha=0.7,
                       color=f"C{c % 10}", label=str(c))
        legend_outside(ax, title=label_name, title_fontsize=8, markerscale=3)
    else:
        points = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu().numpy(), cmap="viridis", s=4,
                            alpha=0.7)
        fig.colorbar(points, ax=ax, label=label_name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="q(z|x) means of test images")
    if one_d:
        ax.set_yticks([])
    return save(fig, path)


def arviz():
    """ArviZ, imported without its FutureWarning about a coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def bound_distributions(bounds: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Kernel densities (ArviZ ``plot_dist``) of the repeated bound estimates: one panel per
    sample count, the estimators overlaid, each in its colour from ``ESTIMATOR_COLORS``."""
    az = arviz()
    counts = sorted({r["particles"] for r in bounds})
    fig = Figure(figsize=(5.2 * len(counts), 3.2), layout="constrained")
    axes = fig.subplots(1, len(counts), squeeze=False)[0]
    for ax, k in zip(axes, counts, strict=True):
        for r in (x for x in bounds if x["particles"] == k):
            with warnings.catch_warnings():  # ArviZ 0.23 on Matplotlib 3.11
                warnings.simplefilter("ignore", DeprecationWarning)
                az.plot_dist(np.asarray(r["values"]), ax=ax, color=estimator_color(r["estimator"]),
                             label=f"{r['estimator']} ({r['sd']:.2f})")
        ax.set(title=f"{k} sample{'s' * (k > 1)} per data point", xlabel="nats per data point",
               ylabel="density")
        ax.tick_params(labelsize=9)  # ArviZ's own tick labels dwarf the axis labels
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long values: few ticks, no overlap
        legend_outside(ax, title="estimator (sd)", title_fontsize=8)
    fig.suptitle("repeated bound estimates on one batch")
    return save(fig, path)


def gradient_variance(gradients: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Total gradient variance per parameter group, estimators side by side (log scale).
    Colour: the estimator; hatch: the particle count L. A variance of exactly 0 (an exact
    gradient, as the analytic estimator's for some groups) has no bar on a log axis: it is
    drawn as a marker on the bottom edge, annotated ``0 (exact)``. NaN (missing) stays empty."""
    groups = sorted({r["group"] for r in gradients})
    configs = sorted({(r["estimator"], r["particles"]) for r in gradients},
                     key=lambda c: (c[1], c[0]))
    counts = sorted({k for _, k in configs})
    fig = Figure(figsize=(1.6 * len(groups) * max(1, len(configs) / 3) + 3, 3.5),
                 layout="constrained")
    ax = fig.subplots()
    ax.set_yscale("log")
    width = 0.8 / len(configs)
    by = {(r["estimator"], r["particles"], r["group"]): r["total_variance"] for r in gradients}
    positive, zeros = [], []
    for i, (e, k) in enumerate(configs):
        x = np.arange(len(groups)) + i * width
        v = np.array([by.get((e, k, grp), np.nan) for grp in groups], dtype=float)
        v = np.where(v < 0, np.nan, v)  # a variance is never negative: such a value is junk
        ax.bar(x, np.where(v > 0, v, np.nan), width, color=estimator_color(e),
               hatch=_HATCHES[counts.index(k) % len(_HATCHES)], edgecolor="black",
               linewidth=0.5, label=f"{e}, L={k}")
        positive += [float(y) for y in v if y > 0 and math.isfinite(y)]
        zeros += [(float(xi), estimator_color(e)) for xi, y in zip(x, v, strict=True) if y == 0]
    if positive:
        ax.set_ylim(10 ** math.floor(math.log10(min(positive)) - 0.5),
                    10 ** math.ceil(math.log10(max(positive)) + 0.2))
    else:
        ax.set_ylim(1e-3, 1.0)
    bottom = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes
    for x, color in zeros:
        ax.plot([x], [0.0], marker="o", markersize=7, color=color, markeredgecolor="black",
                linestyle="none", transform=bottom, clip_on=False, zorder=5, gid="zero-variance")
        ax.text(x, 0.05, "0 (exact)", transform=bottom, rotation=90, ha="center",
                va="bottom", fontsize=8, gid="zero-variance")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set(xlabel="parameter group", ylabel="total variance of the gradient",
           title="gradient variance per parameter group (lower is better)")
    legend_outside(ax, title="estimator, particles", title_fontsize=8)
    return save(fig, path)


def race_curves(race: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Test ELBO of each racer against epochs and against training seconds. Colour: the
    estimator; line style and marker: the particle count L."""
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    by_epoch, by_time = fig.subplots(1, 2)
    racers = sorted({(r["estimator"], r["particles"]) for r in race})
    counts = sorted({k for _, k in racers})
    for e, k in racers:
        rows = [r for r in race if (r["estimator"], r["particles"]) == (e, k)]
        j = counts.index(k)
        style = dict(color=estimator_color(e), linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                     marker=_MARKERS[j % len(_MARKERS)], markersize=4, label=f"{e}, L={k}")
        by_epoch.plot([r["epoch"] for r in rows], [r["test_elbo"] for r in rows], **style)
        by_time.plot([r["seconds"] for r in rows], [r["test_elbo"] for r in rows], **style)
    by_epoch.set(xlabel="epoch", ylabel="test ELBO (nats)", title="per epoch")
    by_time.set(xlabel="training seconds", ylabel="test ELBO (nats)", title="per second")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    legend_outside(by_time, title="estimator, particles", title_fontsize=8)
    return save(fig, path)


def snr_against_k(rows: Sequence[dict], slopes: Sequence[dict], path: str | os.PathLike) -> Figure:
    """Gradient SNR against K on log-log axes, one panel per parameter group, one line per
    estimator (its colour), with the fitted power law dashed and its slope in the legend."""
    groups = sorted({r["group"] for r in rows})
    fig = Figure(figsize=(3.6 * len(groups) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    fits = {(r["estimator"], r["group"]): r for r in slopes}
    for ax, group in zip(axes, groups, strict=True):
        for e in sorted({r["estimator"] for r in rows}):
            pts = sorted((r["particles"], r["snr"]) for r in rows
                         if (r["estimator"], r["group"]) == (e, group) and r["snr"])
            if not pts:
                continue
            ks, snr = zip(*pts, strict=True)
            fit = fits.get((e, group))
            label = e if fit is None else f"{e}: slope {fit['slope']:+.2f}"
            ax.plot(ks, snr, "o-", color=estimator_color(e), label=label)
            if fit is not None:
                ax.plot(ks, [math.exp(fit["intercept"]) * k ** fit["slope"] for k in ks], "--",
                        color=estimator_color(e), linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="K (samples per data point)",
               ylabel="gradient SNR", title=group)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("gradient signal-to-noise ratio against K (dashed: fitted power law)", fontsize=10)
    return save(fig, path)
