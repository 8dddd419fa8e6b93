"""The command line: ``flatmin train``, ``compare``, ``sweep``, ``analyze`` (and ``python -m flatmin ...``).

Every setting of a run is a flag named after its ``TrainConfig`` field; ``--config run.yaml``
reads the same names from a file and flags given on the command line override it. Errors in what
the user gave print one line and exit with status 2; Ctrl-C exits with 130 and leaves the last
complete checkpoint in place.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional

from .train.checkpoint import CheckpointError
from .train.config import (NOT_INHERITED, ConfigError, TrainConfig, check_device, load_yaml, output_folder,
                           with_legacy_defaults)

DEFAULT_METHODS = "sgd,sam,rwp,arwp,m-rwp,m-arwp,nrs"
# Where compare's defaults differ from a single run's: the data set where the methods differ, the
# papers' protocol (equal updates), and one CPU thread per run, so that its numbers do not depend on
# --jobs or on the machine's core count.
COMPARE_DEFAULTS = {"data": "mnist1d", "budget": "updates", "threads": 1}
# A sweep scores every point on a validation split of the training set, under compare's protocol,
# so that its chosen points carry over to ``flatmin compare --tuned``.
SWEEP_DEFAULTS = {**COMPARE_DEFAULTS, "val_fraction": 0.2}


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a flag's value of the wrong type, an unknown flag) are one line, as
    flatmin's own: ``flatmin train: error: argument --epochs: invalid int value: 'x'``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag_type(field: dataclasses.Field, hints: Dict[str, Any]) -> Any:
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple = (), defaults: Optional[Dict[str, Any]] = None) -> None:
    # default=SUPPRESS: only flags the user typed reach the namespace, so they can override a
    # YAML file or a resumed run's settings without the defaults overriding anything.
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {(defaults or {}).get(field.name, field.default)})"
        kind = _flag_type(field, hints)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML",
                        help="read settings from a YAML file (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="flatmin", description="Train toward flat minima with random weight perturbation, SAM and friends.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train one model with one method",
                                description="Train one model with one method. With no flags: ARWP on the "
                                            "bundled 8x8 digits with an MLP, 60 epochs on the CPU, in about "
                                            "10 seconds on 2 cores. A folder that holds a run already is refused: "
                                            "continue it with --resume or replace it with --overwrite.")
    _add_config_flags(train)
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="continue from a checkpoint (default: OUT/checkpoint.pt) to the end of its schedule; "
                            "settings come from it, flags may change only epochs, device, output and progress "
                            "display, and --stop-after applies only when given again")

    compare = commands.add_parser("compare", help="train several methods over several seeds and compare them",
                                  description="Train every method over several seeds under one budget and print a "
                                              "comparison table with each method's difference from SGD; writes "
                                              "results.csv, results.md, runs.json and PNG plots into --out.")
    _add_config_flags(compare, skip=("method", "stop_after"), defaults={**COMPARE_DEFAULTS, "out": "runs/compare-DATA"})
    compare.add_argument("--methods", default=DEFAULT_METHODS,
                         help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per method, from --seed on (default: 3)")
    compare.add_argument("--jobs", type=int, default=1,
                         help="runs at once, in separate processes sharing the cores; each run uses --threads "
                              "CPU threads whatever --jobs is, so the results do not depend on it (default: 1)")
    compare.add_argument("--tuned", default=None, metavar="SWEEP_DIR",
                         help="take each method's chosen point from a finished 'flatmin sweep' in this folder "
                              "(methods it did not tune keep their defaults)")

    sweep = commands.add_parser(
        "sweep", help="search hyperparameters on a validation split (Optuna), on one machine or many",
        description="Search each method's hyperparameters, scored by the mean validation accuracy over seeds on a "
                    "split held out of the training set (never the test set). Writes trials.csv, sweep.md, "
                    "sweep.json, METHOD/best.yaml and plots into --out. The same command on several machines "
                    "with one --storage shares one study; run again, it continues. See docs/sweep.md.")
    _add_config_flags(sweep, skip=("method", "stop_after"), defaults={**SWEEP_DEFAULTS, "out": "runs/sweep-DATA"})
    sweep.add_argument("--methods", default=TrainConfig.method,
                       help=f"comma-separated methods, one study each (default: {TrainConfig.method})")
    sweep.add_argument("--space", action="append", default=None, metavar="NAME=VALUES|YAML",
                       help="a dimension: NAME=V1,V2,... (a list), NAME=LOW:HIGH[:log][:int][:POINTS] (a range; "
                            "POINTS values on a grid), METHOD.NAME=... for one method only; or a YAML file of "
                            "such entries. Repeat for several")
    sweep.add_argument("--sampler", default="grid", help="grid, random or tpe (default: grid)")
    sweep.add_argument("--trials", type=int, default=None,
                       help="trials per method for random and tpe, over all workers (default: 20)")
    sweep.add_argument("--seeds", type=int, default=2, help="seeds per point, from --seed on (default: 2)")
    sweep.add_argument("--prune", action=argparse.BooleanOptionalAction, default=False,
                       help="stop trials whose per-epoch validation accuracy falls below the median of earlier "
                            "trials (Optuna's MedianPruner; default: off)")
    sweep.add_argument("--study", default=None, help="study name (default: the name of the --out folder)")
    sweep.add_argument("--storage", default=None, metavar="URL",
                       help="an Optuna database URL shared by every worker, e.g. postgresql://USER@HOST/DB "
                            "(default: sqlite file study.db in --out)")
    sweep.add_argument("--jobs", type=int, default=1,
                       help="trials at once on this machine, in worker processes sharing the cores (default: 1)")
    sweep.add_argument("--tie", type=float, default=0.0,
                       help="validation accuracies within this of the best count as tied; the tie goes to the "
                            "earliest trial, i.e. a grid's first point (default: 0)")
    sweep.add_argument("--heartbeat", type=int, default=10, metavar="S",
                       help="seconds between a running trial's heartbeats; a trial silent for twice as long "
                            "(its worker killed) is failed and retried (default: 10)")
    analyze = commands.add_parser(
        "analyze", help="flatness of a trained model: Hessian spectrum, loss landscapes, loss under perturbation",
        description="Analyse a checkpoint written by 'flatmin train'; writes analysis.json and PNG plots.")
    analyze.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                         help="checkpoint.pt of a run (or the run's folder); several are analysed alike and "
                              "overlaid, one labelled curve each")
    analyze.add_argument("--what", default="hessian,landscape,radius",
                         help="comma-separated: hessian, landscape, radius, or single parts eigenvalues, trace, "
                              "density, landscape_1d, landscape_2d (default: hessian,landscape,radius)")
    analyze.add_argument("--batches", type=int, default=4, help="batches of data the loss is averaged over (default: 4)")
    analyze.add_argument("--batch-size", type=int, default=256, help="samples per batch (default: 256)")
    analyze.add_argument("--split", default="train", choices=("train", "test", "val"),
                         help="the data the loss is measured on, without augmentation: train (the training "
                              "set; an image folder's train/), test (the test set; an image folder's val/ "
                              "folder) or val (the part of train the run held out with --val-fraction). The "
                              "first --batches batches, in stored order (an image folder's in an order fixed by "
                              "--seed, so that they hold every class) (default: train)")
    analyze.add_argument("--k", type=int, default=5, help="top-k Hessian eigenvalues (default: 5)")
    analyze.add_argument("--probes", type=int, default=50, help="Hutchinson probes for the trace (default: 50)")
    analyze.add_argument("--steps", type=int, default=21, help="grid points per landscape axis (default: 21)")
    analyze.add_argument("--draws", type=int, default=10, help="noise draws per radius (default: 10)")
    analyze.add_argument("--adversarial", action="store_true",
                         help="also the loss along the SAM direction of each radius (default: off)")
    analyze.add_argument("--seed", type=int, default=0, help="seed of every random probe and direction (default: 0)")
    analyze.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    analyze.add_argument("--out", default=None,
                         help="output folder (default: analysis/ beside the checkpoint; needed for several)")
    return parser


def _analyze(args: argparse.Namespace) -> int:
    from .train.flatness import check_checkpoints

    for name, low in (("batches", 1), ("batch_size", 1), ("k", 1), ("probes", 2), ("steps", 2), ("draws", 1),
                      ("seed", 0)):
        if not low <= getattr(args, name) < 2**63:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: "
                              f"it must be an integer in [{low}, 2**63)")
    check_device(args.device)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not what:
        raise ConfigError(f"--what={args.what!r} names no analysis: give hessian, landscape, radius or single parts")
    several = len(args.checkpoints) > 1
    if several and args.out is None:
        raise ConfigError(f"{len(args.checkpoints)} checkpoints need --out DIR for their overlays")
    check_checkpoints(args.checkpoints)
    ckpt = Path(args.checkpoints[0])
    folder = Path(args.out if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "analysis").expanduser()
    made = not folder.exists()
    out = output_folder(folder, "--out")
    try:
        return _analyze_into(args, what, out)
    except BaseException:
        if made:  # a failed analysis leaves no folder it created behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _analyze_into(args: argparse.Namespace, what: List[str], out: Path) -> int:
    from .analysis.plots import overlay, plot_landscape_2d
    from .analysis.report import plot_parts
    from .train.flatness import analyze_checkpoints, write_json

    several = len(args.checkpoints) > 1
    options = {"eigenvalues": {"k": args.k}, "trace": {"probes": args.probes},
               "landscape_1d": {"steps": args.steps}, "landscape_2d": {"steps": max(3, args.steps // 2)},
               "radius": {"draws": args.draws, "adversarial": args.adversarial}}
    entries = analyze_checkpoints(args.checkpoints, what, batches=args.batches, batch_size=args.batch_size,
                                  split=args.split, seed=args.seed, device=args.device, progress=True,
                                  options=options)
    if several:
        plots = overlay([(e["label"], [e]) for e in entries], out, split=args.split)
        for i, e in enumerate(entries):
            if "landscape_2d" in e:  # contours do not overlay: one figure per checkpoint
                plots[f"landscape_2d {e['label']}"] = str(plot_landscape_2d(
                    e["landscape_2d"], out / f"landscape_2d-{i + 1}.png", title=f"2-D loss landscape: {e['label']}",
                    split=args.split))
    else:
        plots = plot_parts(entries[0], out, args.split)
    write_json(out / "analysis.json", {"batches": args.batches, "batch_size": args.batch_size, "split": args.split,
                                       "checkpoints": entries, "plots": plots})
    for e in entries:
        parts = []
        if "eigenvalues" in e:
            parts.append("top Hessian eigenvalues " + ", ".join(f"{v:.4g}" for v in e["eigenvalues"]))
        if "trace" in e:
            parts.append(f"trace {e['trace']['estimate']:.4g} ± {e['trace']['stderr']:.2g}")
        print(f"{e['label']} ({e['data']}/{e['model']}, {e['checkpoint']}, {args.split} split)"
              + (": " + "; ".join(parts) if parts else ""))
    print(f"written: {out}/analysis.json and " + ", ".join(sorted({Path(p).name for p in plots.values()})))
    return 0


def _settings(args: argparse.Namespace, extra: tuple) -> Dict[str, Any]:
    """The config settings: YAML file first, then the flags the user typed."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config") + extra}
    values = load_yaml(args.config) if "config" in vars(args) else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(given)
    return values


def _train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.checkpoint import load_checkpoint

    settings = _settings(args, extra=("resume",))
    resume = args.resume
    if resume is not None:
        if resume == "auto":
            resume = str(Path(settings.get("out", TrainConfig.out)) / "checkpoint.pt")
        saved = load_checkpoint(resume, require=("config",))["config"]
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {resume} is damaged: its config is not a mapping of settings")
        saved = {k: v for k, v in with_legacy_defaults(saved).items() if k not in NOT_INHERITED}
        cfg = TrainConfig.from_dict({**saved, **settings}, where="resume")
    else:
        cfg = TrainConfig.from_dict(settings, where=getattr(args, "config", "flags"))
    try:
        summary = train(cfg, resume=resume)
    except KeyboardInterrupt:
        print(f"flatmin: interrupted; the last complete checkpoint is {Path(cfg.out) / 'checkpoint.pt'} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    parts = [f"{k} {summary[k]:.4f}" for k in ("test_acc", "train_acc", "val_acc") if k in summary]
    print(f"{cfg.method} on {cfg.data}/{cfg.model}: " + "  ".join(parts)
          + f"  train time {summary['train_time_s']:.1f} s  ({summary['updates']} updates, "
          f"{summary['grad_evals']} gradient evaluations) -> {cfg.out}")
    ending = _unfinished(cfg, summary)
    if ending:
        print(ending)
    return 0


def _unfinished(cfg: TrainConfig, summary: Dict[str, Any]) -> Optional[str]:
    """The last line of ``flatmin train`` when the run is not done or trained nothing: why, and what next."""
    done, epochs = summary["epochs_done"], summary["epochs"]
    checkpoint = Path(cfg.out) / "checkpoint.pt"
    again = f"continue with: flatmin train --resume {checkpoint}"
    if summary["workers"] > 1:
        again += " (under the same torchrun launch)"
    if summary["start_epoch"] == done:  # a resumed run that trained nothing
        if summary["completed"]:
            return (f"nothing left to train: {checkpoint} is at epoch {done} of {epochs}, the run is complete "
                    f"(summary.json written from it); to train longer, resume with --epochs above {epochs}")
        return (f"nothing trained: --stop-after {cfg.stop_after} and {checkpoint} is at epoch {done} of {epochs}; "
                f"{again}")
    if summary["stopped_early"]:
        return f"stopped after epoch {done} of {epochs}; {again}"
    return None


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import compare, markdown_report

    settings = {**COMPARE_DEFAULTS, **_settings(args, extra=("methods", "seeds", "jobs", "tuned"))}
    settings.setdefault("out", f"runs/compare-{settings['data']}")
    base = TrainConfig.from_dict(settings, where=getattr(args, "config", "flags"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tuned = None
    if args.tuned is not None:
        from .train.sweep import tuned_hparams

        base.check_types()
        tuned, text = tuned_hparams(args.tuned, methods, base)
        print(text)
    try:
        rows = compare(base, methods, seeds=args.seeds, jobs=args.jobs, tuned=tuned)
    except KeyboardInterrupt:
        print("flatmin: interrupted; finished runs keep their summary.json and checkpoints", file=sys.stderr)
        return 130
    print()
    print(markdown_report(rows, base))
    written = sorted(p.name for p in Path(base.out).iterdir() if p.is_file())
    print(f"\nwritten in {base.out}: " + ", ".join(written))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .train.sweep import make_plan, sweep

    extra = ("methods", "space", "sampler", "trials", "seeds", "prune", "study", "storage", "jobs", "heartbeat", "tie")
    settings = {**SWEEP_DEFAULTS, **_settings(args, extra=extra)}
    settings.setdefault("out", f"runs/sweep-{settings['data']}")
    base = TrainConfig.from_dict(settings, where=getattr(args, "config", "flags"))
    base.check_types()
    plan = make_plan(base, [m.strip() for m in args.methods.split(",") if m.strip()], args.space or [],
                     sampler=args.sampler, trials=args.trials, seeds=args.seeds, prune=args.prune, study=args.study,
                     storage=args.storage, heartbeat=args.heartbeat, tie=args.tie)
    try:
        # As a run's progress: a bar on a terminal, else one line per finished trial; none: quiet.
        bar = base.progress == "bar" or (base.progress == "auto" and sys.stderr.isatty())
        summary = sweep(plan, jobs=args.jobs, progress=bar,
                        log=(lambda text: None) if base.progress == "none" else lambda text: print(text, flush=True))
    except KeyboardInterrupt:
        print("flatmin: interrupted; finished trials are in the study, the running ones are retried when the same "
              "command runs again", file=sys.stderr)
        return 130
    print()
    for method, chosen in summary["chosen"].items():
        point = ", ".join(f"{k}={v}" for k, v in chosen["params"].items()) or "defaults"
        half = chosen["val_acc_ci95"]
        print(f"{method}: trial {chosen['trial']}, {point}: val acc {chosen['val_acc']:.4f}"
              + (f" ± {half:.4f}" if half is not None else "") + f" -> {chosen['best_yaml']}")
    print(f"{summary['finished']} of {summary['planned']} trials finished; written in {plan.out}: trials.csv, "
          "sweep.md, sweep.json" + "".join(f", {Path(p).name}" for p in summary["plots"].values()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a one-line argparse error already printed
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": _train, "compare": _compare, "sweep": _sweep, "analyze": _analyze}
    try:
        code = handlers[args.command](args)
    except (ConfigError, CheckpointError, ValueError, TypeError, OSError) as err:
        print(f"flatmin {args.command}: error: {err}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done and whose process group is destroyed: skip the
        # interpreter's teardown, where gloo's threads occasionally abort the process
        # ("terminate called without an active exception") and torchrun would report a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def command() -> None:
    """The ``flatmin`` program: :func:`main`, then an exit without the interpreter's last garbage
    collections, which walk every object that torch, Optuna and matplotlib made (0.3-0.8 s per
    command). The command's own garbage is collected first, so its finalizers still run."""
    code = main()
    gc.collect()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
