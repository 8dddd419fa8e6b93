"""The figures of a sweep: sensitivity to each swept setting, the convergence/generalisation
trade-off, and Optuna's hyperparameter importances."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..analysis.plots import new_figure, save_figure
from .stats import paired_t_interval

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _complete_runs(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for r in record["runs"] if r.get("state") == "complete"]


def _mean_band(values: List[float]) -> Tuple[float, float]:
    """Mean and half-width of its 95 % t-interval (0 for a single value)."""
    mean, half = paired_t_interval(values, 0.95)
    return mean, half or 0.0


def _use_log(dim: Any, xs: List[Any]) -> bool:
    if dim.is_range:
        return dim.log
    numbers = [x for x in xs if isinstance(x, (int, float))]
    return bool(numbers) and len(numbers) == len(xs) and min(numbers) > 0 and max(numbers) / min(numbers) >= 20


def plot_sensitivity(records: List[Dict[str, Any]], plan: Any, path: Path) -> Optional[Path]:
    """Validation accuracy against each swept setting: per method, the runs of every trial at one
    value pooled over seeds (and over the other settings), mean with a 95 % band."""
    names = list(dict.fromkeys(d.name for dims in plan.spaces.values() for d in dims))
    if not names or not any(_complete_runs(r) for r in records):
        return None
    fig = new_figure((4.8 * len(names), 3.9))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        for i, method in enumerate(plan.methods):
            dim = next((d for d in plan.spaces[method] if d.name == name), None)
            if dim is None:
                continue
            pooled: Dict[Any, List[float]] = {}
            for r in records:
                if r["method"] == method and r["state"] == "complete":
                    pooled.setdefault(r["params"][name], []).extend(run["val_acc"] for run in _complete_runs(r))
            if not pooled:
                continue
            categorical = any(isinstance(x, str) for x in pooled)
            xs = sorted(pooled, key=str) if categorical else sorted(pooled)
            stats = [_mean_band(pooled[x]) for x in xs]
            pos = list(range(len(xs))) if categorical else xs
            means = [100 * m for m, _ in stats]
            halves = [100 * h for _, h in stats]
            ax.plot(pos, means, marker=MARKERS[i % len(MARKERS)], label=method)
            ax.fill_between(pos, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                            alpha=0.2)
            if categorical:
                ax.set_xticks(pos, [str(x) for x in xs])
            elif _use_log(dim, xs):
                ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sensitivity on {plan.base.data}/{plan.base.model}: mean over seeds, 95 % band")
    return save_figure(fig, path)


# A final training loss above this (or not finite) is a run that diverged: off the trade-off's axis.
DIVERGED_LOSS = 100.0


def plot_tradeoff(records: List[Dict[str, Any]], plan: Any, path: Path) -> Optional[Path]:
    """Final training loss against the generalisation gap (train acc − test acc), one point per
    completed trial (mean over seeds), coloured by σ, one marker per method; trials that diverged
    are counted in the title instead."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.lines import Line2D

    points = []
    diverged = 0
    for r in records:
        runs = _complete_runs(r)
        if r["state"] != "complete" or not runs:
            continue
        loss = statistics.fmean(x["train_loss"] for x in runs)
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            diverged += 1
            continue
        sigma = runs[0].get("hparams", {}).get("sigma")
        points.append((r["method"], loss, 100 * statistics.fmean(x["gap"] for x in runs), sigma))
    if not points:
        return None
    sigmas = [p[3] for p in points if p[3] is not None]
    norm = None
    if sigmas:
        low, high = min(sigmas), max(sigmas)
        norm = LogNorm(low, high) if low > 0 and high / low >= 10 else Normalize(low, high if high > low else low + 1)
    fig = new_figure((6.4, 4.6))
    ax = fig.add_subplot()
    scatter = None
    handles = []
    for i, method in enumerate(plan.methods):
        mine = [p for p in points if p[0] == method]
        if not mine:
            continue
        coloured = [p for p in mine if p[3] is not None]
        plain = [p for p in mine if p[3] is None]
        if coloured:
            scatter = ax.scatter([p[1] for p in coloured], [p[2] for p in coloured], c=[p[3] for p in coloured],
                                 cmap="viridis", norm=norm, marker=MARKERS[i % len(MARKERS)], s=46,
                                 edgecolors="black", linewidths=0.5)
        if plain:
            ax.scatter([p[1] for p in plain], [p[2] for p in plain], color="grey", marker=MARKERS[i % len(MARKERS)],
                       s=46, edgecolors="black", linewidths=0.5)
        handles.append(Line2D([], [], marker=MARKERS[i % len(MARKERS)], color="grey", markeredgecolor="black",
                              linestyle="none", label=method))
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="σ")
    ax.set_xlabel("final training loss")
    ax.set_ylabel("generalisation gap: train − test accuracy (pts)")
    title = f"Convergence against generalisation on {plan.base.data}/{plan.base.model}"
    if diverged:
        title += f"\n({diverged} diverged trial{'s' if diverged > 1 else ''}, training loss > {DIVERGED_LOSS:g}, not shown)"
    ax.set_title(title, fontsize=10)
    if all(p[1] > 0 for p in points) and max(p[1] for p in points) / min(p[1] for p in points) >= 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    return save_figure(fig, path)


def plot_importances(plan: Any, studies: Dict[str, Any], path: Path, min_trials: int = 4) -> Optional[Path]:
    """Optuna's hyperparameter importances (fANOVA) per method with at least two swept settings
    and ``min_trials`` completed trials; ``None`` when no method qualifies or the evaluator fails."""
    import optuna
    from optuna.trial import TrialState

    results = {}
    for method in plan.methods:
        if len(plan.spaces[method]) < 2:
            continue
        if len(studies[method].get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < min_trials:
            continue
        try:
            results[method] = optuna.importance.get_param_importances(studies[method])
        except (RuntimeError, ValueError):  # e.g. every trial scored the same
            continue
    if not results:
        return None
    fig = new_figure((4.4 * len(results), 3.2))
    for ax, (method, imp) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items()):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlim(0, 1)
        ax.set_title(method)
        ax.set_xlabel("importance (fANOVA)")
    return save_figure(fig, path)


def plot_all(records: List[Dict[str, Any]], plan: Any, studies: Dict[str, Any], out: Path) -> Dict[str, str]:
    plots = {}
    for name, made in (("sensitivity", plot_sensitivity(records, plan, out / "sensitivity.png")),
                       ("trade-off", plot_tradeoff(records, plan, out / "tradeoff.png")),
                       ("importances", plot_importances(plan, studies, out / "importances.png"))):
        if made is not None:
            plots[name] = str(made)
    return plots

