"""PNG plots of the analyses' results (the dicts that ``hessian_density``, ``landscape_1d``,
``landscape_2d`` and ``loss_vs_radius`` return, or the same read back from ``analysis.json``).

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting neither needs a
display nor changes the backend of the program that calls it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, Path]


def _figure() -> Figure:
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_density(result: Dict[str, Any], path: PathLike) -> Path:
    """The SLQ eigenvalue density on a log scale (the bulk near 0 and the few outliers both show)."""
    grid, density = np.asarray(result["grid"]), np.asarray(result["density"])
    fig = _figure()
    ax = fig.add_subplot()
    floor = density.max() * 1e-8  # Gaussian tails underflow to 0, which a log axis cannot show
    ax.semilogy(grid, np.maximum(density, floor))
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian eigenvalue density (SLQ, σ = {result['sigma']:.3g})")
    return _save(fig, path)


def plot_landscape_1d(result: Dict[str, Any], path: PathLike) -> Path:
    """Loss along the 1-D slice, with the accuracy on a second axis when there is one."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(result["alphas"], result["loss"], color="C0", marker=".")
    ax.set_xlabel("α (filter-normalised direction)")
    ax.set_ylabel("train loss", color="C0")
    if result.get("accuracy") is not None:
        twin = ax.twinx()
        twin.plot(result["alphas"], result["accuracy"], color="C1", linestyle="--")
        twin.set_ylabel("train accuracy", color="C1")
    ax.set_title("1-D loss landscape")
    return _save(fig, path)


def plot_landscape_2d(result: Dict[str, Any], path: PathLike) -> Path:
    """Contours of the loss over the 2-D slice; the trained weights are the cross at the origin."""
    alphas, betas = np.asarray(result["alphas"]), np.asarray(result["betas"])
    loss = np.asarray(result["loss"]).T  # contour wants rows along β (y), columns along α (x)
    fig = _figure()
    ax = fig.add_subplot()
    low, high = loss.min(), loss.max()
    # The loss grows by orders of magnitude away from a minimum: log-spaced levels keep the basin readable.
    levels = np.geomspace(low, high, 25) if low > 0 and high > low else 25
    filled = ax.contourf(alphas, betas, loss, levels=levels, cmap="viridis")
    ax.contour(alphas, betas, loss, levels=levels, colors="k", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="train loss", format="%.3g")
    ax.plot([0], [0], marker="+", color="w", markersize=12)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_aspect("equal")
    ax.set_title("2-D loss landscape")
    return _save(fig, path)


def plot_loss_vs_radius(result: Dict[str, Any], path: PathLike) -> Path:
    """Mean loss under random perturbation against the radius σ on a log axis, the band of
    ±1 std and the min–max range shaded, the clean loss dashed and, when computed, the loss along
    the SAM direction of the matching norm ρ(σ)."""
    radii = np.asarray(result["radii"])
    shown = radii > 0  # a log axis has no 0; the clean loss is the dashed line instead
    x = radii[shown]
    mean, std = np.asarray(result["loss_mean"])[shown], np.asarray(result["loss_std"])[shown]
    fig = _figure()
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
    shown_losses = [v for line in ax.get_lines() for v in np.ravel(line.get_ydata()) if np.isfinite(v) and v > 0]
    if shown_losses and max(shown_losses) > 100 * min(shown_losses):
        ax.set_yscale("log")  # the SAM direction can reach losses orders of magnitude above the random ones
    ax.set_xlabel("radius σ (filter-wise)")
    ax.set_ylabel("train loss")
    ax.set_title("Loss under weight perturbation")
    ax.legend()
    return _save(fig, path)
