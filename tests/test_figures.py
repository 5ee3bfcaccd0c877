"""Figures a reader can trust: labelled axes, legends beside the data, one colour per
estimator, and a variance of 0 shown on a log axis. Small synthetic inputs, no training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from ppl_vae import plots
from ppl_vae.appendix import amortization, regression

PNG = b"\x89PNG\r\n\x1a\n"


# -- synthetic records -------------------------------------------------------------------------

def bounds_rows(estimators=("mc", "analytic", "iwae"), counts=(1, 10)) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k in counts:
        for j, e in enumerate(estimators):
            v = rng.normal(-100 + j, 2 / math.sqrt(k), 64)
            rows.append({"estimator": e, "particles": k, "mean": v.mean(), "sd": v.std(),
                         "se": v.std() / 8, "ms_per_estimate": 1.0, "values": v.tolist()})
    return rows


GROUPS = ("decoder", "encoder.loc", "encoder.scale")


def gradient_rows(zero=(("analytic", 1, "decoder"), ("analytic", 10, "decoder")),
                  missing=(("mc", 10, "encoder.scale"),)) -> list[dict]:
    rows = []
    for k in (1, 10):
        for e in ("mc", "analytic"):
            for g, base in zip(GROUPS, (10.0, 50.0, 2.0), strict=True):
                v = base / k * (3 if e == "mc" else 1)
                if (e, k, g) in zero:
                    v = 0.0
                if (e, k, g) in missing:
                    v = float("nan")
                rows.append({"estimator": e, "particles": k, "group": g, "total_variance": v,
                             "mean_norm": 1.0, "snr": 1.0, "ms_per_step": 1.0})
    return rows


def race_rows(racers=(("mc", 1), ("analytic", 1), ("iwae", 10), ("mc", 10))) -> list[dict]:
    return [{"estimator": e, "particles": k, "epoch": ep, "train_objective": -100.0,
             "test_elbo": -150 + 10 * math.log(ep) + i, "seconds": ep * (1 + i)}
            for i, (e, k) in enumerate(racers) for ep in range(1, 5)]


def history_rows() -> list[dict]:
    return [{"epoch": i, "train_elbo": -150 + 10 * math.log(i), "test_elbo": -152 + 9 * math.log(i),
             "val_elbo": -151 + 9 * math.log(i)} for i in range(1, 6)]


REGRESSION = {"posterior": {"exact_sd": [0.45, 0.46], "nuts_sd": [0.44, 0.47],
                            "mean_field_vi_sd": [0.14, 0.15]}}
GAPS = {"vae-a": {"approximation_gap": 2.0, "amortization_gap": 1.5},
        "vae-b": {"approximation_gap": 1.0, "amortization_gap": 3.0}}


# -- helpers -----------------------------------------------------------------------------------

def drawn(fig: Figure):
    """Lay the figure out on an Agg canvas, as ``savefig`` does; the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def data_axes(fig: Figure):
    """The axes that show data (colorbars excluded)."""
    return [ax for ax in fig.axes if not hasattr(ax, "_colorbar")
            and (ax.lines or ax.patches or ax.collections or ax.images)]


def assert_labelled(fig: Figure, need_y: bool = True) -> None:
    axes = data_axes(fig)
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip(), f"no x label on {ax.get_title()!r}"
        if need_y:
            assert ax.get_ylabel().strip(), f"no y label on {ax.get_title()!r}"


def assert_legends_outside(fig: Figure, expected: int | None = None) -> None:
    """Every legend's box overlaps no axes' data area (its own or another's)."""
    renderer = drawn(fig)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    if expected is not None:
        assert len(legends) == expected
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data_axes(fig):
            area = ax.get_window_extent(renderer)
            assert not box.overlaps(area), (box, area, ax.get_title())


def same_color(a, b) -> bool:
    return np.allclose(to_rgba(a), to_rgba(b))


def bar_colors(fig: Figure) -> dict[tuple[str, int], tuple]:
    """(estimator, L) -> face colour of the bars of gradient_variance."""
    (ax,) = fig.axes
    out = {}
    for c in ax.containers:
        e, k = c.get_label().split(", L=")
        out[(e, int(k))] = to_rgba(c.patches[0].get_facecolor())
    return out


def line_colors(fig: Figure) -> dict[str, set]:
    """estimator -> the colours of its lines (labels 'name, L=k' or 'name (sd)')."""
    out: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_"):
                continue
            name = label.split(",")[0].split(" (")[0]
            out.setdefault(name, set()).add(to_rgba(line.get_color()))
    return out


# -- labels -----------------------------------------------------------------------------------

def test_every_axis_of_every_figure_is_labelled(tmp_path):
    figs = [
        plots.elbo_curves(history_rows(), tmp_path / "elbo.png"),
        plots.latent_scatter(torch.randn(40, 2), torch.arange(40) % 10, tmp_path / "l2.png"),
        plots.latent_scatter(torch.randn(40, 1), None, tmp_path / "l1.png"),
        plots.latent_scatter(torch.randn(40, 5), None, tmp_path / "l5.png"),
        plots.bound_distributions(bounds_rows(), tmp_path / "bounds.png"),
        plots.gradient_variance(gradient_rows(), tmp_path / "gradients.png"),
        plots.race_curves(race_rows(), tmp_path / "race.png"),
        regression._figure(REGRESSION, tmp_path / "regression.png"),
        amortization.gaps_figure(GAPS, tmp_path / "gaps.png"),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert_labelled(fig)
    for name in ("elbo", "l2", "l1", "l5", "bounds", "gradients", "race", "regression", "gaps"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("title, labels, column", [
    ("test inputs and reconstructions", ["input", "recon"], "image"),
    ("samples from the prior", [], "sample"),
])
def test_image_grid_says_what_rows_and_columns_are(tmp_path, title, labels, column):
    rows = [torch.rand(6, 16), torch.rand(6, 16)]
    fig = plots.image_grid(rows, (4, 4), tmp_path / "grid.png", title, labels)
    assert_labelled(fig, need_y=False)
    (ax,) = fig.axes
    assert column in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == list(labels)
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG)


# -- legends ----------------------------------------------------------------------------------

def test_gradient_variance_legend_lies_outside_the_axes(tmp_path):
    fig = plots.gradient_variance(gradient_rows(), tmp_path / "gradients.png")
    assert_legends_outside(fig, expected=1)
    renderer = drawn(fig)
    (ax,) = fig.axes
    box, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= area.x1  # beside the data area, to its right


def test_regression_legend_lies_outside_the_axes(tmp_path):
    assert_legends_outside(regression._figure(REGRESSION, tmp_path / "regression.png"),
                           expected=1)


def accuracy_rows() -> list[dict]:
    return [{**r, "test_accuracy": 0.5 + 0.05 * r["epoch"]} for r in history_rows()]


def test_a_family_s_accuracy_gets_its_own_labelled_axis(tmp_path):
    """M2's epoch_metrics (test accuracy, a share) are not nats: a right-hand axis in %."""
    fig = plots.elbo_curves(accuracy_rows(), tmp_path / "elbo.png")
    assert_labelled(fig)
    left, right = fig.axes
    assert right.get_ylabel() == "test accuracy (%)"
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([55, 60, 65, 70, 75])
    assert "test accuracy (right)" in [t.get_text() for t in left.get_legend().get_texts()]


@pytest.mark.parametrize("draw, expected", [
    (lambda p: plots.elbo_curves(history_rows(), p), 1),
    (lambda p: plots.elbo_curves(accuracy_rows(), p), 1),
    (lambda p: plots.bound_distributions(bounds_rows(), p), 2),
    (lambda p: plots.race_curves(race_rows(), p), 1),
    (lambda p: amortization.gaps_figure(GAPS, p), 1),
])
def test_no_legend_covers_data(tmp_path, draw, expected):
    assert_legends_outside(draw(tmp_path / "figure.png"), expected=expected)


# -- colours ----------------------------------------------------------------------------------

def test_estimator_color_is_fixed_with_a_stable_fallback():
    assert plots.estimator_color("mc") == plots.ESTIMATOR_COLORS["mc"]
    assert plots.estimator_color("my-estimator") == plots.estimator_color("my-estimator")
    assert plots.estimator_color("my-estimator") not in plots.ESTIMATOR_COLORS.values()


def test_one_colour_per_estimator_across_the_comparison_figures(tmp_path):
    bounds = line_colors(plots.bound_distributions(bounds_rows(), tmp_path / "b.png"))
    race = line_colors(plots.race_curves(race_rows(), tmp_path / "r.png"))
    bars = bar_colors(plots.gradient_variance(gradient_rows(), tmp_path / "g.png"))
    grads: dict[str, set] = {}
    for (e, _), color in bars.items():
        grads.setdefault(e, set()).add(color)

    assert set(bounds) == {"mc", "analytic", "iwae"} and set(grads) == {"mc", "analytic"}
    colours = {}
    for figure in (bounds, race, grads):
        for name, found in figure.items():
            assert len(found) == 1, (name, found)  # particle counts never change the colour
            (color,) = found
            assert same_color(color, plots.estimator_color(name)), name
            colours.setdefault(name, color)
            assert same_color(colours[name], color), name
    assert len({colours[n] for n in colours}) == len(colours)  # distinct estimators differ


def test_particle_counts_differ_by_hatch_and_line_style(tmp_path):
    fig = plots.gradient_variance(gradient_rows(), tmp_path / "g.png")
    (ax,) = fig.axes
    hatches = {c.get_label(): c.patches[0].get_hatch() or "" for c in ax.containers}
    assert hatches["mc, L=1"] != hatches["mc, L=10"]
    assert hatches["mc, L=1"] == hatches["analytic, L=1"]

    fig = plots.race_curves(race_rows(), tmp_path / "r.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    one, ten = lines["mc, L=1"], lines["mc, L=10"]
    assert same_color(one.get_color(), ten.get_color())
    assert (one.get_linestyle(), one.get_marker()) != (ten.get_linestyle(), ten.get_marker())


# -- a variance of 0 on a log axis ---------------------------------------------------------------

def zero_markers(ax):
    return [a for a in ax.lines if a.get_gid() == "zero-variance"]


def test_zero_variance_is_drawn_and_annotated_missing_stays_empty(tmp_path):
    zero = (("analytic", 1, "decoder"),)
    fig = plots.gradient_variance(gradient_rows(zero=zero), tmp_path / "g.png")
    renderer = drawn(fig)
    (ax,) = fig.axes
    markers = zero_markers(ax)
    assert len(markers) == 1  # one zero; the NaN gets no marker
    (marker,) = markers
    assert marker.get_visible() and marker.get_marker() not in (None, "None", "", " ")
    assert marker.get_markersize() > 0

    # at the x of the analytic, L=1 bar in the decoder group, on the bottom edge of the axes
    configs = sorted({("mc", 1), ("analytic", 1), ("mc", 10), ("analytic", 10)},
                     key=lambda c: (c[1], c[0]))
    width = 0.8 / len(configs)
    x_expected = GROUPS.index("decoder") + configs.index(("analytic", 1)) * width
    assert marker.get_xdata()[0] == pytest.approx(x_expected)
    area = ax.get_window_extent(renderer)
    (px, py), = marker.get_transform().transform([[marker.get_xdata()[0],
                                                     marker.get_ydata()[0]]])
    assert area.x0 <= px <= area.x1 and py == pytest.approx(area.y0, abs=1)

    texts = [t for t in ax.texts if "0" in t.get_text() and t.get_visible()]
    assert len(texts) == 1 and "exact" in texts[0].get_text()
    box = texts[0].get_window_extent(renderer)
    assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 < area.y1

    # the missing (NaN) group has no bar, no marker, no annotation
    bars = {c.get_label(): c for c in ax.containers}
    missing = bars["mc, L=10"].patches[GROUPS.index("encoder.scale")]
    assert not np.isfinite(missing.get_height())
    # the zero has no bar either: the marker stands in for it
    zero_bar = bars["analytic, L=1"].patches[GROUPS.index("decoder")]
    assert not np.isfinite(zero_bar.get_height())
    # the log axis still covers the positive bars
    positive = [r["total_variance"] for r in gradient_rows(zero=zero)
                if r["total_variance"] > 0]
    low, high = ax.get_ylim()
    assert low < min(positive) and max(positive) < high


def test_all_zero_or_missing_variances_still_draw(tmp_path):
    rows = [{"estimator": "analytic", "particles": 1, "group": g, "total_variance": v,
             "mean_norm": 0.0, "snr": float("nan"), "ms_per_step": 1.0}
            for g, v in (("a", 0.0), ("b", float("nan")))]
    fig = plots.gradient_variance(rows, tmp_path / "g.png")
    (ax,) = fig.axes
    assert len(zero_markers(ax)) == 1
    assert sum("0" in t.get_text() for t in ax.texts) == 1
    assert (tmp_path / "g.png").read_bytes().startswith(PNG)


def test_latent_scatter_names_its_classes(tmp_path):
    """A few classes get a legend titled with what the label says (not a continuous colour
    bar); many get a colour bar with that name."""
    z = torch.randn(40, 2)
    fig = plots.latent_scatter(z, torch.arange(40) % 2, tmp_path / "two.png",
                               "photograph (0 china, 1 flower)")
    legend = fig.axes[0].get_legend()
    assert len(fig.axes) == 1 and legend.get_title().get_text().startswith("photograph")
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1"]
    fig = plots.latent_scatter(z, torch.arange(40) % 20, tmp_path / "many.png", "class")
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "class"  # the colour bar


def test_the_latent_figure_skips_a_class_label_for_the_continuous_site():
    """A guide sampling y ~ Categorical before z (Pyro's ss-vae order): the latent figure's
    points are z's means, not the label's NaN "mean"."""
    from plugin_models import EnumMixtureVAE

    from ppl_vae.models.figures import latent_means

    torch.manual_seed(0)
    model, x = EnumMixtureVAE(64, z_dim=3, hidden=8), torch.rand(5, 64).bernoulli()
    means = latent_means(model.guide, (x,))
    assert means.shape == (5, 3) and bool(means.isfinite().all())
