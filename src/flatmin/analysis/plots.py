"""PNG plots of the analyses' results (the dicts that ``hessian_density``, ``landscape_1d``,
``landscape_2d`` and ``loss_vs_radius`` return, or the same read back from ``analysis.json``): one
model per figure, or several overlaid (``overlay_*``: one labelled curve per model or group of models).
``split`` names the data the loss was measured on (``train``, ``test``, ``val``) in the axis labels.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting neither needs a
display nor changes the backend of the program that calls it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Sequence, Tuple, Union

import numpy as np

from .hessian import slq_density

if TYPE_CHECKING:  # matplotlib is imported by the first figure: a command that draws none skips its 0.4 s
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PathLike = Union[str, Path]
# A curve's label and the results it stands for: one model's, or several (e.g. one method's seeds).
Groups = Sequence[Tuple[str, Sequence[Dict[str, Any]]]]


def load_matplotlib() -> None:
    """Import matplotlib's figure and Agg canvas now (about half a second), for a caller that has
    time to spare before its first plot, such as a process waiting on others' work."""
    import importlib

    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(module)


def new_figure(size: Tuple[float, float] = (6.0, 4.5)) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_density(result: Dict[str, Any], path: PathLike, split: str = "train") -> Path:
    """The SLQ eigenvalue density on a log scale (the bulk near 0 and the few outliers both show)."""
    grid, density = np.asarray(result["grid"]), np.asarray(result["density"])
    fig = new_figure()
    ax = fig.add_subplot()
    floor = density.max() * 1e-8  # Gaussian tails underflow to 0, which a log axis cannot show
    ax.semilogy(grid, np.maximum(density, floor))
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian eigenvalue density of the {split} loss (SLQ, σ = {result['sigma']:.3g})")
    return save_figure(fig, path)


def plot_landscape_1d(result: Dict[str, Any], path: PathLike, split: str = "train") -> Path:
    """Loss along the 1-D slice, with the accuracy on a second axis when there is one."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(result["alphas"], result["loss"], color="C0", marker=".")
    ax.set_xlabel("α (filter-normalised direction)")
    ax.set_ylabel(f"{split} loss", color="C0")
    if result.get("accuracy") is not None:
        twin = ax.twinx()
        twin.plot(result["alphas"], result["accuracy"], color="C1", linestyle="--")
        twin.set_ylabel(f"{split} accuracy", color="C1")
    ax.set_title("1-D loss landscape")
    return save_figure(fig, path)


def plot_landscape_2d(result: Dict[str, Any], path: PathLike, title: str = "2-D loss landscape",
                      split: str = "train") -> Path:
    """Contours of the loss over the 2-D slice; the trained weights are the cross at the origin."""
    alphas, betas = np.asarray(result["alphas"]), np.asarray(result["betas"])
    loss = np.asarray(result["loss"]).T  # contour wants rows along β (y), columns along α (x)
    fig = new_figure()
    ax = fig.add_subplot()
    low, high = loss.min(), loss.max()
    # The loss grows by orders of magnitude away from a minimum: log-spaced levels keep the basin readable.
    levels = np.geomspace(low, high, 25) if low > 0 and high > low else 25
    filled = ax.contourf(alphas, betas, loss, levels=levels, cmap="viridis")
    ax.contour(alphas, betas, loss, levels=levels, colors="k", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label=f"{split} loss", format="%.3g")
    ax.plot([0], [0], marker="+", color="w", markersize=12)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_aspect("equal")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_loss_vs_radius(result: Dict[str, Any], path: PathLike, split: str = "train") -> Path:
    """Mean loss under random perturbation against the radius σ on a log axis, the band of
    ±1 std and the min–max range shaded, the clean loss dashed and, when computed, the loss along
    the SAM direction of the matching norm ρ(σ)."""
    radii = np.asarray(result["radii"])
    shown = radii > 0  # a log axis has no 0; the clean loss is the dashed line instead
    x = radii[shown]
    mean, std = np.asarray(result["loss_mean"])[shown], np.asarray(result["loss_std"])[shown]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.fill_between(x, np.asarray(result["loss_min"])[shown], np.asarray(result["loss_max"])[shown],
                    color="C0", alpha=0.15, linewidth=0, label="min–max")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.3, linewidth=0, label="±1 std")
    ax.plot(x, mean, color="C0", marker=".", label=f"random (mean of {result['draws']})")
    if result.get("adversarial_loss") is not None:
        ax.plot(x, np.asarray(result["adversarial_loss"])[shown], color="C3", marker=".",
                label="adversarial (SAM), ρ = σ·sqrt(Σ s²)")
    ax.axhline(result["clean_loss"], color="k", linestyle="--", linewidth=0.8, label="clean")
    ax.set_xscale("log")
    _log_scale_if_wide(ax)  # the SAM direction can reach losses orders of magnitude above the random ones
    ax.set_xlabel("radius σ (filter-wise)")
    ax.set_ylabel(f"{split} loss")
    ax.set_title("Loss under weight perturbation")
    ax.legend()
    return save_figure(fig, path)


def _log_scale_if_wide(ax: Axes) -> None:
    """A log y axis when the plotted values span more than two orders of magnitude."""
    shown = [v for line in ax.get_lines() for v in np.ravel(line.get_ydata()) if np.isfinite(v) and v > 0]
    if shown and max(shown) > 100 * min(shown):
        ax.set_yscale("log")


def _same(groups: Groups, key: str) -> np.ndarray:
    """The x values every result shares (radii, α): curves of different grids cannot be pooled."""
    first = np.asarray(groups[0][1][0][key])
    for label, results in groups:
        for r in results:
            if not np.allclose(np.asarray(r[key]), first):
                raise ValueError(f"cannot overlay {label!r}: its {key} differ from the first curve's")
    return first


def overlay_loss_vs_radius(groups: Groups, path: PathLike, split: str = "train") -> Path:
    """Mean loss under random perturbation against the radius σ, one curve per group, with a band of
    ±1 std over every draw of the group (of every model in it: the spread of draws and of seeds)."""
    radii = _same(groups, "radii")
    shown = radii > 0
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, results) in enumerate(groups):
        pooled = [np.concatenate([r["losses"][j] for r in results]) for j in range(len(radii))]
        mean = np.array([row.mean() for row in pooled])[shown]
        std = np.array([row.std(ddof=1) if len(row) > 1 else 0.0 for row in pooled])[shown]
        ax.fill_between(radii[shown], mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(radii[shown], mean, color=f"C{i}", marker=".", label=label)
    ax.set_xscale("log")
    _log_scale_if_wide(ax)
    ax.set_xlabel("radius σ (filter-wise)")
    ax.set_ylabel(f"{split} loss")
    ax.set_title("Loss under random weight perturbation (mean, ±1 std band)")
    ax.legend()
    return save_figure(fig, path)


def overlay_density(groups: Groups, path: PathLike, split: str = "train") -> Path:
    """The SLQ eigenvalue densities on one grid and one broadening ``σ`` (1 % of the Ritz values'
    overall range), one curve per group with its probes pooled; a group of several models shows the
    range of their own densities as a band."""
    values = [v for _, results in groups for r in results for v in r["ritz_values"]]
    weights = [w for _, results in groups for r in results for w in r["ritz_weights"]]
    common = slq_density(values, weights)
    grid, sigma = common["grid"], common["sigma"]
    floor = max(common["density"]) * 1e-8  # Gaussian tails underflow to 0, which a log axis cannot show
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, results) in enumerate(groups):
        pooled = slq_density([v for r in results for v in r["ritz_values"]],
                             [w for r in results for w in r["ritz_weights"]], grid, sigma)["density"]
        if len(results) > 1:
            each = np.array([slq_density(r["ritz_values"], r["ritz_weights"], grid, sigma)["density"] for r in results])
            ax.fill_between(grid, np.maximum(each.min(0), floor), np.maximum(each.max(0), floor),
                            color=f"C{i}", alpha=0.2, linewidth=0)
        ax.semilogy(grid, np.maximum(pooled, floor), color=f"C{i}", label=label)
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian eigenvalue density of the {split} loss (SLQ, σ = {sigma:.3g})")
    ax.legend()
    return save_figure(fig, path)


def overlay_landscape_1d(groups: Groups, path: PathLike, split: str = "train") -> Path:
    """The loss along each model's own 1-D filter-normalised slice (same seed, so the same draw
    before normalisation), one curve per group: the mean, and the range of a group's models as a band."""
    alphas = _same(groups, "alphas")
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, results) in enumerate(groups):
        losses = np.array([r["loss"] for r in results])
        if len(results) > 1:
            ax.fill_between(alphas, losses.min(0), losses.max(0), color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(alphas, losses.mean(0), color=f"C{i}", marker=".", label=label)
    _log_scale_if_wide(ax)
    ax.set_xlabel("α (filter-normalised direction)")
    ax.set_ylabel(f"{split} loss")
    ax.set_title("1-D loss landscapes")
    ax.legend()
    return save_figure(fig, path)


OVERLAYS: Dict[str, Any] = {
    "radius": overlay_loss_vs_radius,
    "density": overlay_density,
    "landscape_1d": overlay_landscape_1d,
}


def overlay(groups: Groups, out_dir: PathLike, prefix: str = "", split: str = "train") -> Dict[str, str]:
    """Every overlay the results allow, one PNG per analysis in ``out_dir`` (``{prefix}{name}.png``);
    ``groups`` hold whole ``analyze`` results, all measured on ``split``. Returns name → path."""
    written = {}
    for name, plot in OVERLAYS.items():
        parts = [(label, [r[name] for r in results]) for label, results in groups
                 if all(name in r for r in results)]
        if parts:
            written[name] = str(plot(parts, Path(out_dir) / f"{prefix}{name}.png", split=split))
    return written
