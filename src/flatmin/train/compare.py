"""Train several methods over several seeds on the same data and model, and compare them.

Every method gets the same data, model, learning-rate schedule and seeds, and a budget measured
against SGD trained for ``epochs`` (``TrainConfig.budget``): as many updates (the papers' protocol,
``flatmin compare``'s default), as many gradient evaluations, or the same epochs. Each row states
what the method spent (epochs, updates, gradient evaluations, samples) beside its test accuracy, its
difference from SGD paired by seed with a 95 % t-interval, and its training time.
"""
from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..analysis.plots import overlay
from . import compare_plots
from .config import METHOD_DEFAULTS, PROGRESS_MODES, ConfigError, TrainConfig, choice, output_folder, own_hparams
from .flatness import OVERLAY_PARTS, analyze_checkpoint, write_json
from .loop import RUN_FILES, train
from .stats import paired_t_interval

# The flatness overlay of every trained model (--flatness N): modest settings, so that it costs a
# few seconds per small model; every run is probed with the same seed.
FLATNESS_OPTIONS = {"density": {"probes": 5, "steps": 30}, "landscape_1d": {"steps": 21}, "radius": {"draws": 5}}
BUDGET_TEXT = {
    "updates": "equal updates: every method makes as many updates as SGD in {epochs} epochs "
               "(the mixed methods, two batches per update, run about twice the epochs)",
    "gradients": "equal gradient evaluations: every method uses at most as many as SGD in {epochs} epochs "
                 "(two-gradient methods make half the updates)",
    "epochs": "equal epochs: every method trains {epochs} epochs of data "
              "(the mixed methods, two batches per update, make half the updates)",
}


def run_configs(base: TrainConfig, methods: Sequence[str], seeds: int,
                tuned: Optional[Dict[str, Dict[str, Any]]] = None) -> List[TrainConfig]:
    """One config per (method, seed): ``base`` with the method, the seed and its own output folder,
    and ``threads`` fixed (``base.threads``, 1 when unset): a run's numbers depend on its CPU thread
    count, so fixing it makes them independent of ``jobs`` and of the machine's core count.

    Hyperparameters set in ``base`` apply to the methods that have them (``sigma`` to the RWP
    family, ``rho`` to SAM/ASAM) and are left out for the others. ``tuned`` holds a method's
    chosen point from a sweep (``flatmin compare --tuned``); it overrides ``base`` for that method.
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
        own = own_hparams(base, method)
        own.update((tuned or {}).get(method, {}))
        for seed in range(base.seed, base.seed + seeds):
            out = str(Path(base.out) / method / f"seed{seed}")
            configs.append(dataclasses.replace(base, method=method, seed=seed, out=out, progress="none",
                                               threads=1 if base.threads is None else base.threads, **own))
    for cfg in configs:
        cfg.validate()
    return configs


def _run(cfg: TrainConfig) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Train one run; with ``cfg.flatness``, also analyse its final model for the overlay."""
    summary = train(cfg)
    entry = None
    if cfg.flatness:
        entry = analyze_checkpoint(Path(cfg.out) / "checkpoint.pt", OVERLAY_PARTS, batches=cfg.flatness,
                                   batch_size=cfg.eval_batch_size, seed=0, device=cfg.device, options=FLATNESS_OPTIONS)
    return summary, entry


def compare(base: TrainConfig, methods: Sequence[str], seeds: int = 3, jobs: int = 1,
            log: Any = print, tuned: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Train every (method, seed) under ``base.budget``; write ``results.csv``, ``results.md``,
    ``runs.json`` and the plots into ``base.out`` (with ``base.flatness``, also the flatness bars,
    the overlays and ``analysis.json``); return the table rows. ``tuned``: each method's chosen
    point of a sweep (see ``run_configs``)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds={seeds!r} is not allowed: it must be an integer >= 1")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} is not allowed: it must be an integer >= 1")
    configs = run_configs(base, methods, seeds, tuned)
    if not base.overwrite:  # refused before any run, not after the first ones are done
        taken = [cfg.out for cfg in configs if any((Path(cfg.out) / name).exists() for name in RUN_FILES)]
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise ConfigError(f"out={base.out!r} holds runs of an earlier comparison ({taken[0]}{more}): pass "
                              f"--overwrite to train them again, or choose another --out")
    out = output_folder(base.out)
    summaries: List[Dict[str, Any]] = []
    entries: List[Dict[str, Any]] = []

    def report(i: int, result: Tuple[Dict[str, Any], Optional[Dict[str, Any]]]) -> None:
        summary, entry = result
        summaries.append(summary)
        if entry is not None:
            entries.append(entry)
        log(f"[{i + 1}/{len(configs)}] {summary['method']:>7} seed {summary['seed']}: "
            f"test acc {summary['test_acc']:.4f}  {summary['updates']} updates  "
            f"train time {summary['train_time_s']:.1f} s")

    if jobs == 1:
        threads = torch.get_num_threads()
        try:
            for i, cfg in enumerate(configs):
                report(i, _run(cfg))
        finally:
            torch.set_num_threads(threads)  # each run set its own; the caller gets its count back
    else:
        # Every run sets its own thread count (run_configs), so a worker's share of the cores does
        # not depend on how many there are.
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs) as pool:
            for i, result in enumerate(pool.imap(_run, configs)):
                report(i, result)
            # Let the workers exit on their own: the context's terminate() kills them, and a killed
            # worker leaves its semaphores (tqdm's lock) for the resource tracker to warn about.
            pool.close()
            pool.join()
    rows = table_rows(summaries, methods)
    write_results(rows, summaries, out, base)
    if entries:
        groups = [(f"{method} ({sum(e['method'] == method for e in entries)} seeds)",
                   [e for e in entries if e["method"] == method]) for method in methods]
        plots = overlay(groups, out, prefix="flatness_")
        write_json(out / "analysis.json", {"batches": base.flatness, "split": "train", "options": FLATNESS_OPTIONS,
                                           "checkpoints": entries, "plots": plots})
    return rows


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def table_rows(summaries: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per method: its budget spent, means (and std of the test accuracy) over its seeds,
    and with SGD among the runs, the test-accuracy difference from SGD paired by seed
    (``delta_vs_sgd``) with the half-width of its 95 % t-interval (``delta_ci95``)."""
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for s in summaries:
        by_method.setdefault(s["method"], []).append(s)
    sgd_time: Optional[float] = None
    sgd_acc = {s["seed"]: s["test_acc"] for s in by_method.get("sgd", [])}
    if "sgd" in by_method:
        sgd_time = statistics.fmean(s["train_time_s"] for s in by_method["sgd"])
    rows = []
    for method in methods:
        runs = by_method.get(method, [])
        if not runs:
            continue
        acc = _mean_std([s["test_acc"] for s in runs])
        time_s = statistics.fmean(s["train_time_s"] for s in runs)
        first = runs[0]  # the budget is the same for every seed
        row = {
            "method": method,
            "budget": first["budget"],
            "seeds": len(runs),
            "test_acc_mean": acc["mean"],
            "test_acc_std": acc["std"],
            "delta_vs_sgd": None,
            "delta_ci95": None,
            "train_loss": statistics.fmean(s["train_loss"] for s in runs),
            "gap": statistics.fmean(s["gap"] for s in runs),
            "epochs": first["updates"] / first["updates_per_epoch"],
            "updates": first["updates"],
            "grad_evals": first["grad_evals"],
            "samples": first["samples_seen"],
            "train_time_s": time_s,
            "time_vs_sgd": time_s / sgd_time if sgd_time else None,
        }
        paired = [s["test_acc"] - sgd_acc[s["seed"]] for s in runs if s["seed"] in sgd_acc]
        if method != "sgd" and paired:
            row["delta_vs_sgd"], row["delta_ci95"] = paired_t_interval(paired, 0.95)
        if "val_acc" in first:
            row["val_acc_mean"] = statistics.fmean(s["val_acc"] for s in runs)
        for key in ("hessian_top", "hessian_trace"):
            if key in first:
                row[key] = statistics.fmean(s[key] for s in runs)
        rows.append(row)
    return rows


def _delta_cell(row: Dict[str, Any]) -> str:
    mean, half = row["delta_vs_sgd"], row["delta_ci95"]
    if mean is None:
        return "–"
    if half is None:
        return f"{100 * mean:+.2f}"
    cell = f"{100 * mean:+.2f} ± {100 * half:.2f}"
    return f"**{cell}**" if abs(mean) > half else cell


def _epochs_cell(epochs: float) -> str:
    return f"{epochs:.2f}".rstrip("0").rstrip(".")


COLUMNS = [
    ("method", "method", "{}"),
    ("test acc", "test_acc_mean", lambda r: f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} %"),
    ("Δ vs SGD (pts)", "delta_vs_sgd", _delta_cell),
    ("val acc", "val_acc_mean", "{:.4f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("gap", "gap", "{:+.4f}"),
    ("epochs", "epochs", lambda r: _epochs_cell(r["epochs"])),
    ("updates", "updates", "{}"),
    ("grad evals", "grad_evals", "{}"),
    ("samples", "samples", "{}"),
    ("train time (s)", "train_time_s", "{:.1f}"),
    ("× SGD", "time_vs_sgd", "{:.2f}"),
    ("λ_max", "hessian_top", "{:.3g}"),
    ("tr H", "hessian_trace", "{:.3g}"),
]


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The comparison as a Markdown table (columns without data are left out)."""
    columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            if callable(fmt):
                cells.append(fmt(r))
            else:
                cells.append("–" if r.get(key) is None else fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: List[Dict[str, Any]], base: TrainConfig) -> str:
    """The budget in words, the table, and how to read its difference column."""
    seeds = max((r["seeds"] for r in rows), default=0)
    text = [f"{base.data}, {base.model}, {seeds} seed{'s' if seeds != 1 else ''} from {base.seed}. Budget: "
            + BUDGET_TEXT[base.budget].format(epochs=base.epochs) + ".", "", markdown_table(rows)]
    if any(r["delta_vs_sgd"] is not None for r in rows):
        text += ["", "Δ vs SGD: mean difference in test accuracy (percentage points) from SGD with the same "
                     "seed, ± the half-width of its 95 % t-interval; bold where the interval excludes 0."]
    return "\n".join(text)


def write_results(rows: List[Dict[str, Any]], summaries: List[Dict[str, Any]], out: Path, base: TrainConfig) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_report(rows, base) + "\n")
    write_json(out / "runs.json", summaries)
    methods = [r["method"] for r in rows]
    compare_plots.plot_accuracy(summaries, methods, out / "accuracy.png", base.budget)
    compare_plots.plot_accuracy_curves(summaries, methods, out)
    if base.flatness:
        compare_plots.plot_flatness(summaries, methods, out / "flatness.png")
