"""The comparison's pictures: test accuracy per method with every seed shown, accuracy against the
gradient evaluations and the wall time spent, and the Hessian's λ_max and trace per method."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from ..analysis.plots import new_figure, save_figure

Summary = Dict[str, Any]


def _runs_of(summaries: List[Summary], method: str) -> List[Summary]:
    return [s for s in summaries if s["method"] == method]


def _strip(ax: Any, methods: Sequence[str], values: Dict[str, List[float]], bars: bool, scale: float = 1.0) -> None:
    """Per method: the mean (a bar from 0, or a diamond where the axis does not start at 0) with an
    error bar of ±1 std over seeds, and a dot per seed."""
    jitter = np.random.default_rng(0)  # spreads coinciding dots apart; fixed, so the picture is too
    for i, method in enumerate(methods):
        points = np.asarray(values[method]) * scale
        std = points.std(ddof=1) if len(points) > 1 else 0.0
        if bars:
            ax.bar(i, points.mean(), width=0.6, color=f"C{i}", alpha=0.35, yerr=std, capsize=5)
        else:
            ax.errorbar(i, points.mean(), yerr=std, fmt="D", color=f"C{i}", markersize=7, capsize=6)
        ax.plot(i + jitter.uniform(-0.2, 0.2, len(points)), points, "o", color=f"C{i}", alpha=0.6, markersize=4)
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.grid(axis="y", alpha=0.3)


def plot_accuracy(summaries: List[Summary], methods: Sequence[str], path: Path, budget: str) -> Path:
    """Test accuracy per method: mean (diamond) ± std over seeds (error bar), each seed a dot, and
    SGD's mean as a dashed line when SGD is among the methods."""
    fig = new_figure((max(5.0, 1.0 + 0.9 * len(methods)), 4.5))
    ax = fig.add_subplot()
    accuracies = {m: [s["test_acc"] for s in _runs_of(summaries, m)] for m in methods}
    _strip(ax, methods, accuracies, bars=False, scale=100)
    if accuracies.get("sgd"):
        ax.axhline(100 * statistics.fmean(accuracies["sgd"]), color="k", linestyle="--", linewidth=0.8,
                   label="SGD mean")
        ax.legend(loc="lower right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy at equal {budget}\n(diamond: mean ± std over seeds; dots: seeds)", fontsize=10)
    return save_figure(fig, path)


def _accuracy_curve(summaries: List[Summary], methods: Sequence[str], path: Path,
                    x_of: Callable[[Summary], List[float]], xlabel: str, title: str) -> Path:
    """Test accuracy after each epoch against ``x_of(summary)`` per epoch: per method the mean over
    seeds, and the range of the seeds as a band."""
    fig = new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        runs = _runs_of(summaries, method)
        epochs = min(len(s["history"]) for s in runs)
        x = np.mean([x_of(s)[:epochs] for s in runs], axis=0)
        acc = 100 * np.array([[row["test_acc"] for row in s["history"][:epochs]] for s in runs])
        if len(runs) > 1:
            ax.fill_between(x, acc.min(0), acc.max(0), color=f"C{i}", alpha=0.15, linewidth=0)
        ax.plot(x, acc.mean(0), color=f"C{i}", marker="o", markersize=2, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _cumulative_grad_evals(summary: Summary) -> List[float]:
    per_update = summary["grad_evals"] / max(summary["updates"], 1)
    return list(np.cumsum([row["updates"] * per_update for row in summary["history"]]))


def plot_accuracy_curves(summaries: List[Summary], methods: Sequence[str], out: Path) -> List[Path]:
    """``accuracy_vs_grads.png`` (the compute each method spent) and ``accuracy_vs_time.png``."""
    return [
        _accuracy_curve(summaries, methods, out / "accuracy_vs_grads.png", _cumulative_grad_evals,
                        "gradient evaluations", "Test accuracy against gradient evaluations (mean, seed range)"),
        _accuracy_curve(summaries, methods, out / "accuracy_vs_time.png",
                        lambda s: [row["train_time_s"] for row in s["history"]],
                        "training time (s)", "Test accuracy against wall time (mean, seed range)"),
    ]


def plot_flatness(summaries: List[Summary], methods: Sequence[str], path: Path) -> Path:
    """The Hessian's top eigenvalue and trace of every final model: mean ± std over seeds per method."""
    fig = new_figure((max(8.0, 1.5 + 1.6 * len(methods)), 4.0))
    for k, (key, title) in enumerate((("hessian_top", "top Hessian eigenvalue λ_max"),
                                      ("hessian_trace", "Hessian trace tr H"))):
        ax = fig.add_subplot(1, 2, k + 1)
        _strip(ax, methods, {m: [s[key] for s in _runs_of(summaries, m)] for m in methods}, bars=True)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Flatness of the final models (bar: mean ± std over seeds; dots: seeds)", fontsize=10)
    return save_figure(fig, path)
