"""The command line: ``flatmin train``, ``flatmin compare`` (and ``python -m flatmin ...``).

Every setting of a run is a flag named after its ``TrainConfig`` field; ``--config run.yaml``
reads the same names from a file and flags given on the command line override it. Errors in what
the user gave print one line and exit with status 2; Ctrl-C exits with 130 and leaves the last
complete checkpoint in place.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from .train.checkpoint import CheckpointError
from .train.config import ConfigError, TrainConfig, load_yaml

DEFAULT_METHODS = "sgd,sam,rwp,arwp,m-rwp,m-arwp"


def _flag_type(field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    # default=SUPPRESS: only flags the user typed reach the namespace, so they can override a
    # YAML file or a resumed run's settings without the defaults overriding anything.
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        kind = _flag_type(field)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML",
                        help="read settings from a YAML file (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flatmin", description="Train toward flat minima with random weight perturbation, SAM and friends.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train one model with one method",
                                description="Train one model with one method. With no flags: ARWP on the "
                                            "bundled 8x8 digits with an MLP, on the CPU, in about a minute.")
    _add_config_flags(train)
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="continue from a checkpoint (default: OUT/checkpoint.pt); settings come from it, "
                            "flags may change only epochs, device, output and progress display")

    compare = commands.add_parser("compare", help="train several methods over several seeds and compare them",
                                  description="Train every method over several seeds and print a comparison table; "
                                              "writes results.csv, results.md and accuracy_vs_time.png into --out.")
    _add_config_flags(compare, skip=("method",))
    compare.add_argument("--methods", default=DEFAULT_METHODS,
                         help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per method, from --seed on (default: 3)")
    compare.add_argument("--jobs", type=int, default=1,
                         help="runs at once, in separate processes sharing the cores (default: 1)")
    return parser


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
        saved = load_checkpoint(resume)["config"]
        cfg = TrainConfig.from_dict({**saved, **settings}, where="resume")
    else:
        cfg = TrainConfig.from_dict(settings, where=getattr(args, "config", "flags"))
    try:
        summary = train(cfg, resume=resume)
    except KeyboardInterrupt:
        print(f"flatmin: interrupted; the last complete checkpoint is {Path(cfg.out) / 'checkpoint.pt'} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    parts = [f"{k} {summary[k]:.4f}" for k in ("test_acc", "train_acc", "val_acc") if k in summary]
    print(f"{cfg.method} on {cfg.data}/{cfg.model}: " + "  ".join(parts)
          + f"  train time {summary['train_time_s']:.1f} s  ({summary['updates']} updates, "
          f"{summary['grad_evals']} gradient evaluations) -> {cfg.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import compare, markdown_table

    settings = _settings(args, extra=("methods", "seeds", "jobs"))
    settings.setdefault("out", f"runs/compare-{settings.get('data', TrainConfig.data)}")
    base = TrainConfig.from_dict(settings, where=getattr(args, "config", "flags"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        rows = compare(base, methods, seeds=args.seeds, jobs=args.jobs)
    except KeyboardInterrupt:
        print("flatmin: interrupted; finished runs keep their summary.json and checkpoints", file=sys.stderr)
        return 130
    print()
    print(markdown_table(rows))
    print(f"\nwritten: {base.out}/results.csv, results.md, accuracy_vs_time.png")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": _train, "compare": _compare}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"flatmin {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
