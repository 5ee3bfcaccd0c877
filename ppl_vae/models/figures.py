"""The figures every model gets from its program (the default ``report`` hook), on float
pixels: ``latent.png`` (q(z|x) means, by ``encode`` or the guide's first per-image latent
site, in 2-D by PCA), ``reconstructions.png`` (``reconstruct``, or the guide's z replayed
into the model) and ``samples.png`` (``sample``, or ``Predictive`` on the unconditioned
model). A figure that cannot be drawn is skipped with its reason in the run's notes.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pyro import poutine
from pyro.infer import Predictive
from torch import Tensor, nn

from .. import plots
from ..data import pixels
from ..errors import first_line

if TYPE_CHECKING:
    from .base import RunContext


@torch.no_grad()
def default_figures(module: nn.Module, ctx: RunContext, data_args: Callable,
                    proposal: Callable) -> None:
    """Draw what can be drawn into ``ctx.out``; log what cannot, and why (:func:`draw_or_skip`).
    ``data_args`` is the module's hook, ``proposal`` its guide."""
    data, out, test = ctx.data, ctx.out, ctx.data.test
    rows = min(len(test), 1000)
    labels = None if test.y is None else test.y[:rows]
    args = data_args(test.x[:rows], labels)

    def latent() -> str | None:
        if rows < MIN_LATENT_ROWS:
            return (f"the test split has {rows} image{'s' if rows != 1 else ''}; a latent "
                    f"scatter needs at least {MIN_LATENT_ROWS}")
        z = (module.encode(pixels(test.x[:rows]))[0] if defines(module, "encode")
             else latent_means(proposal, args))
        if z is None:
            return "the guide has no latent site with one value per image"
        z = z.reshape(z.shape[0], -1)
        if not torch.isfinite(z).all():
            return "the latent means are not all finite"
        with warnings.catch_warnings():  # PCA of identical means (a collapsed posterior)
            warnings.simplefilter("ignore", RuntimeWarning)
            plots.latent_scatter(z, labels, out / "latent.png",
                                 getattr(ctx.data, "label_name", "label"))
        return None

    def grid(name: str, rows_of: Callable) -> str | None:
        got = rows_of(module, test, args, proposal)
        if isinstance(got, str):
            return got
        rows, title, labels = got
        plots.image_grid(rows, data.image_shape, out / name, title, labels)
        return None

    figures = {"latent.png": latent}
    if data.image_shape is None:
        ctx.log("figure reconstructions.png and samples.png skipped: the data are not images")
    else:
        figures["reconstructions.png"] = functools.partial(grid, "reconstructions.png", recon_rows)
        figures["samples.png"] = functools.partial(grid, "samples.png", sample_rows)
    for name, draw in figures.items():
        draw_or_skip(ctx, name, draw)


MIN_LATENT_ROWS = 2  # Test images the latent scatter needs (PCA of fewer is not a picture).


def recon_rows(module: nn.Module, test: Any, args: tuple[Tensor, ...], proposal: Callable
               ) -> tuple[list[Tensor], str, list[str]] | str:
    """Twelve test inputs and their reconstructions (``reconstruct``, or the guide's z
    replayed into the model), as rows of flat images with a title and row labels; or why
    not."""
    x, size = pixels(test.x[:12]), test.x.shape[1]
    got = (module.reconstruct(x) if defines(module, "reconstruct") else
           reconstructions(module.model, proposal, tuple(a[:12] for a in args), size))
    return got if isinstance(got, str) else (
        [x, got], "test inputs and reconstructions", ["input", "recon"])


def sample_rows(module: nn.Module, test: Any, args: tuple[Tensor, ...], proposal: Callable
                ) -> tuple[list[Tensor], str, list[str]] | str:
    """64 samples (``sample``, else the prior predictive), in rows of 8; or why not."""
    if defines(module, "sample"):
        draws, title = module.sample(64), "samples from the prior: E[x|z], z ~ p(z)"
    else:
        draws = prior_predictive(module, tuple(a[:64] for a in args), test.x.shape[1])
        title = "prior predictive samples x ~ p(x)"
    return draws if isinstance(draws, str) else (list(draws.split(8)), title, [])


@torch.no_grad()
def epoch_images(module: nn.Module, data: Any, data_args: Callable) -> dict[str, Tensor]:
    """The reconstructions and samples the run's figures show, each as one image (C, H, W)
    in [0, 1] for a live log; what cannot be drawn is left out."""
    if data.image_shape is None:
        return {}
    test = data.test
    args = data_args(test.x[:64], None if test.y is None else test.y[:64])
    images = {}
    for name, rows_of in (("reconstructions", recon_rows), ("samples", sample_rows)):
        try:
            got = rows_of(module, test, args, module.guide)
        except Exception:  # (the figures at the end say why)
            continue
        if not isinstance(got, str):
            images[name] = plots.grid_image(got[0], data.image_shape)
    return images


def draw_or_skip(ctx: RunContext, name: str, draw: Callable[[], str | None]) -> None:
    """Call ``draw()`` (None when drawn, else why not); log why the figure ``name`` was
    skipped, including an error the program raised while drawing (a finished run is never
    lost to a figure). Nothing is drawn when the context draws no figures (``evaluate``)."""
    if not ctx.figures:
        return
    try:
        why = draw()
    except Exception as e:  # the user's program failed on this figure's inputs
        why = f"the program raised {type(e).__name__}: {first_line(e, 300)}"[:300]
    if why is not None:
        ctx.log(f"figure {name} skipped: {why}")


def defines(module: nn.Module, name: str) -> bool:
    """Whether the model's class defines the method ``name`` (a submodule called ``encode``
    is a network, not the figure hook ``encode(x) -> (loc, scale)``)."""
    return inspect.isfunction(getattr(type(module), name, None))


def latent_means(guide, args: tuple[Tensor, ...]) -> Tensor | None:
    """The mean (else a draw) of the guide's first continuous latent site with one row per
    data point (a class label's "mean" is no place in the latent space)."""
    rows = args[0].shape[0]
    trace = poutine.trace(guide).get_trace(*args)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site["is_observed"] or _discrete(site["fn"]):
            continue
        value = _mean(site["fn"], site["value"])
        if value.dim() >= 1 and value.shape[0] == rows and value.is_floating_point():
            return value.reshape(rows, -1)
    return None


def _image_site(trace, rows: int, pixels: int) -> str | None:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
            v = site["value"]
            if v.dim() >= 1 and v.shape[0] == rows and v[0].numel() == pixels:
                return name
    return None


def reconstructions(model: Callable, guide: Callable, args: tuple[Tensor, ...], pixels: int
                    ) -> Tensor | str:
    """E[x|z] at z ~ q(z|x): the guide's trace replayed into the model; or why not."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    rows = args[0].shape[0]
    name = _image_site(trace, rows, pixels)
    if name is None:
        return f"no observed site of the model holds one {pixels}-pixel image per row"
    site = trace.nodes[name]
    return _mean(site["fn"], site["fn"].sample()).reshape(rows, pixels)


def prior_predictive(module: nn.Module, args: tuple[Tensor, ...], pixels: int
                     ) -> Tensor | str:
    """Draws of the observed image site from the unconditioned model, by ``Predictive``."""
    rows = args[0].shape[0]
    trace = poutine.trace(module.model).get_trace(*args)
    name = _image_site(trace, rows, pixels)
    if name is None:
        return f"no observed site of the model holds one {pixels}-pixel image per row"
    predictive = Predictive(poutine.uncondition(module.model), num_samples=1,
                            return_sites=[name])
    try:
        return predictive(*args)[name].reshape(rows, pixels)
    except Exception:  # Predictive adds a samples plate some programs cannot take
        unconditioned = poutine.trace(poutine.uncondition(module.model)).get_trace(*args)
        return unconditioned.nodes[name]["value"].reshape(rows, pixels)


def _discrete(fn) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except (NotImplementedError, AttributeError):
        return False


def _mean(fn, fallback: Tensor) -> Tensor:
    try:
        return fn.mean
    except (NotImplementedError, AttributeError):
        return fallback
