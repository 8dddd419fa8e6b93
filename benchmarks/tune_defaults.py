"""Choose each method's hyperparameters on a VALIDATION split (never the test set).

For every method and every value on its grid, trains ``--seeds`` runs with ``val_fraction`` of the
training set held out, and prints the mean validation accuracy; the chosen value per method is what
the data set's recipe in ``flatmin/train/config.py`` should hold. Test accuracy is not even printed.

The rule, fixed before looking at any result: the highest mean validation accuracy, where values
within ``--tie`` of it count as tied and the tie goes to the weakest perturbation (each grid lists
its values from weak to strong), so that noise in a small validation split does not pick an
aggressive setting.

    PYTHONPATH=src python benchmarks/tune_defaults.py --data digits --model mlp --jobs 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
from pathlib import Path

from flatmin.train import TrainConfig, train

GRID = {
    "sgd": [{}],
    "sam": [{"rho": r} for r in (0.01, 0.02, 0.05, 0.1, 0.2)],
    "rwp": [{"sigma": s, "sigma_inc": 0.0} for s in (0.005, 0.01, 0.02, 0.05, 0.1)],
    "arwp": [{"sigma": s, "sigma_inc": 10.0} for s in (0.0005, 0.001, 0.002, 0.005, 0.01)],
    "m-rwp": [{"sigma": s, "sigma_inc": 0.0} for s in (0.01, 0.02, 0.05, 0.1)],
    "m-arwp": [{"sigma": s, "sigma_inc": 0.0} for s in (0.01, 0.02, 0.05, 0.1)],
    "nrs": [{"alpha": a, "sigma": s} for a in (0.5, 1.0, 2.0) for s in (0.01, 0.05)],
}


def _run(cfg: TrainConfig) -> dict:
    import torch

    torch.set_num_threads(1)
    summary = train(cfg)
    return {"method": cfg.method, "hparams": summary["hparams"], "seed": cfg.seed, "val_acc": summary["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--methods", default=",".join(GRID))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tie", type=float, default=0.002, help="accuracy difference counted as a tie")
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args()

    configs = []
    for method in args.methods.split(","):
        for i, point in enumerate(GRID[method]):
            for seed in range(args.seeds):
                out = Path(args.out) / args.data / method / f"point{i}-seed{seed}"
                configs.append(TrainConfig(data=args.data, model=args.model, method=method, epochs=args.epochs,
                                           seed=seed, val_fraction=args.val_fraction, out=str(out),
                                           progress="none", overwrite=True, **point))  # its own folders
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(_run, configs)
    by_point: dict = {}
    for r in results:
        by_point.setdefault((r["method"], json.dumps(r["hparams"], sort_keys=True)), []).append(r["val_acc"])
    print(f"validation accuracy on {args.data}/{args.model} ({args.seeds} seeds, {args.epochs} epochs, "
          f"val_fraction {args.val_fraction})")
    for (method, hp), accs in by_point.items():
        mean = statistics.fmean(accs)
        print(f"  {method:>7}  {hp:<70} {100 * mean:6.2f} %")
    print(f"chosen per method (best mean, ties within {100 * args.tie:.1f} % to the weakest perturbation):")
    for method in dict.fromkeys(m for m, _ in by_point):
        points = [(hp, statistics.fmean(a)) for (m, hp), a in by_point.items() if m == method]  # grid order
        top = max(mean for _, mean in points)
        hp, mean = next((hp, mean) for hp, mean in points if mean >= top - args.tie)
        print(f"  {method:>7}  {hp}  val {100 * mean:.2f} %")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.data}-{args.model}.json").write_text(
        json.dumps([dataclasses.asdict(c) | r for c, r in zip(configs, results)], indent=1))


if __name__ == "__main__":
    main()
