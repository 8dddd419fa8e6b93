"""Train several methods over several seeds on the same data and model, and compare them.

Every method sees the same epochs of data, learning-rate schedule and seeds; the table states the
budget each one spent (updates, gradient evaluations) beside its accuracy and training time.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import METHOD_DEFAULTS, METHOD_HPARAMS, PROGRESS_MODES, ConfigError, TrainConfig, choice, output_folder
from .loop import train


def run_configs(base: TrainConfig, methods: Sequence[str], seeds: int) -> List[TrainConfig]:
    """One config per (method, seed): ``base`` with the method, the seed and its own output folder.

    Hyperparameters set in ``base`` apply to the methods that have them (``sigma`` to the RWP
    family, ``rho`` to SAM/ASAM) and are left out for the others.
    """
    if not methods:
        raise ConfigError(f"--methods names no method: choose from {', '.join(METHOD_DEFAULTS)}")
    for method in methods:
        if method not in METHOD_DEFAULTS:
            raise ConfigError(f"unknown method {method!r} in --methods: choose from {', '.join(METHOD_DEFAULTS)}")
        if list(methods).count(method) > 1:
            raise ConfigError(f"--methods names {method!r} twice: each method is one row of the comparison")
    base.check_types()  # the seed and the folder are used below, before each run's own validate()
    choice("progress", base.progress, PROGRESS_MODES)  # every run is quiet, but a typo is still one
    if base.stop_after is not None:
        raise ConfigError(f"stop_after={base.stop_after} is not allowed in a comparison: every run trains to the "
                          "end of its schedule")
    configs = []
    for method in methods:
        own = {name: getattr(base, name) if name in METHOD_DEFAULTS[method] else None for name in METHOD_HPARAMS}
        for seed in range(base.seed, base.seed + seeds):
            out = str(Path(base.out) / method / f"seed{seed}")
            configs.append(dataclasses.replace(base, method=method, seed=seed, out=out, progress="none", **own))
    for cfg in configs:
        cfg.validate()
    return configs


def _train_quietly(cfg: TrainConfig) -> Dict[str, Any]:
    return train(cfg)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def compare(base: TrainConfig, methods: Sequence[str], seeds: int = 3, jobs: int = 1,
            log: Any = print) -> List[Dict[str, Any]]:
    """Train every (method, seed); write ``results.csv``, ``results.md``, ``runs.json`` and
    ``accuracy_vs_time.png`` into ``base.out``; return the table rows."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds={seeds!r} is not allowed: it must be an integer >= 1")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} is not allowed: it must be an integer >= 1")
    configs = run_configs(base, methods, seeds)
    out = output_folder(base.out)
    summaries: List[Dict[str, Any]] = []

    def report(i: int, summary: Dict[str, Any]) -> None:
        summaries.append(summary)
        log(f"[{i + 1}/{len(configs)}] {summary['method']:>7} seed {summary['seed']}: "
            f"test acc {summary['test_acc']:.4f}  train time {summary['train_time_s']:.1f} s")

    if jobs == 1:
        for i, cfg in enumerate(configs):
            report(i, train(cfg))
    else:
        # Each worker gets its share of the cores; every run then trains under the same conditions.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs, initializer=_worker_init, initargs=(threads,)) as pool:
            for i, summary in enumerate(pool.imap(_train_quietly, configs)):
                report(i, summary)
    rows = table_rows(summaries, methods)
    write_results(rows, summaries, out)
    return rows


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def table_rows(summaries: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per method: means (and std of the test accuracy) over its seeds."""
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for s in summaries:
        by_method.setdefault(s["method"], []).append(s)
    sgd_time: Optional[float] = None
    if "sgd" in by_method:
        sgd_time = statistics.fmean(s["train_time_s"] for s in by_method["sgd"])
    rows = []
    for method in methods:
        runs = by_method.get(method, [])
        if not runs:
            continue
        acc = _mean_std([s["test_acc"] for s in runs])
        time_s = statistics.fmean(s["train_time_s"] for s in runs)
        row = {
            "method": method,
            "seeds": len(runs),
            "test_acc_mean": acc["mean"],
            "test_acc_std": acc["std"],
            "train_loss": statistics.fmean(s["train_loss"] for s in runs),
            "gap": statistics.fmean(s["gap"] for s in runs),
            "train_time_s": time_s,
            "time_vs_sgd": time_s / sgd_time if sgd_time else None,
            "grad_evals": runs[0]["grad_evals"],
            "updates": runs[0]["updates"],
        }
        if "val_acc" in runs[0]:
            row["val_acc_mean"] = statistics.fmean(s["val_acc"] for s in runs)
        for key in ("hessian_top", "hessian_trace"):
            if key in runs[0]:
                row[key] = statistics.fmean(s[key] for s in runs)
        rows.append(row)
    return rows


COLUMNS = [
    ("method", "method", "{}"),
    ("test acc", None, None),
    ("val acc", "val_acc_mean", "{:.4f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("gap", "gap", "{:+.4f}"),
    ("train time (s)", "train_time_s", "{:.1f}"),
    ("× SGD", "time_vs_sgd", "{:.2f}"),
    ("grad evals", "grad_evals", "{}"),
    ("updates", "updates", "{}"),
    ("λ_max", "hessian_top", "{:.3g}"),
    ("tr H", "hessian_trace", "{:.3g}"),
]


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The comparison as a Markdown table (columns without data are left out)."""
    columns = [c for c in COLUMNS if c[1] is None or any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for title, key, fmt in columns:
            if key is None:
                cells.append(f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} %")
            else:
                value = r.get(key)
                cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: List[Dict[str, Any]], summaries: List[Dict[str, Any]], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    (out / "runs.json").write_text(json.dumps(summaries, indent=1))
    plot_accuracy_vs_time(summaries, out / "accuracy_vs_time.png")


def plot_accuracy_vs_time(summaries: List[Dict[str, Any]], path: Path) -> None:
    """Test accuracy after each epoch against cumulative training time, mean over seeds per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(s["method"] for s in summaries))
    for method in methods:
        runs = [s["history"] for s in summaries if s["method"] == method]
        epochs = min(len(h) for h in runs)
        times = [statistics.fmean(h[e]["train_time_s"] for h in runs) for e in range(epochs)]
        accs = [statistics.fmean(h[e]["test_acc"] for h in runs) for e in range(epochs)]
        ax.plot(times, [100 * a for a in accs], marker="o", markersize=2, label=method)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against wall time (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
