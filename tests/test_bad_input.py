"""Every input a user can give the command line — every flag of ``flatmin train``, ``compare``,
``sweep`` and ``analyze``, YAML files, checkpoints, data folders, output folders — gets a one-line error that
names the bad value, exit status 2, no traceback, and leaves the results already on disk as they were.

The flags are read from the argparse parser itself: a flag without a case below fails
``test_every_flag_has_bad_values``.
"""
import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatmin.cli import build_parser, main
from flatmin.train.checkpoint import load_checkpoint, save_checkpoint

QUICK = ["--data", "digits", "--model", "mlp", "--batch-size", "512", "--progress", "none"]
NUMBERS = ["nan", "inf", "-1", "0", "x"]  # what every numeric flag is tried with, where it makes no sense


def case(flag, value, needle, *extra, method=None, joined=False):
    """``flag value`` (``flag=value`` when ``joined`` or the value looks like a flag; ``flag`` alone
    for ``None``), then ``extra`` flags; ``method`` for a method's own hyperparameter. ``needle`` is
    text the one-line error must hold; ``{name}`` in any of them is a path of the ``paths`` fixture."""
    if value is None:
        args = [flag]
    elif joined or value.startswith("-"):
        args = [f"{flag}={value}"]
    else:
        args = [flag, value]
    return pytest.param(flag, [*args, *extra], needle, method, id=" ".join([*args, *extra]) or flag)


def numeric(flag, kind, bad, method=None, extra=(), name=None):
    """Cases for a numeric flag: flatmin refuses the values in ``bad`` naming them as ``name=value``
    (``name``: the setting, by default the flag without dashes), argparse every non-number."""
    name = name or flag[2:].replace("-", "_")
    cases = []
    for value in bad:
        shown = {"int": str(int(float(value))) if value not in ("nan", "inf") else value,
                 "float": repr(float(value))}[kind]
        cases.append(case(flag, value, f"{name}={shown}", *extra, method=method))
    for value in ("x", "nan", "inf", "1.5") if kind == "int" else ("x",):
        if value not in bad:
            cases.append(case(flag, value, f"argument {flag}: invalid {kind} value: '{value}'", *extra, method=method))
    return cases


# ------------------------------------------------------------------------------ flatmin train

CONFIG_CASES = [
    case("--data", "imagenet", "unknown data 'imagenet'"),
    case("--data", "", "unknown data ''"),
    case("--data-dir", "{file}", "cifar10 not found in {file}: download cifar-10-python.tar.gz", "--data", "cifar10",
         "--model", "resnet18"),
    case("--data-dir", "{missing}", "image folder {missing}/train not found", "--data", "imagefolder"),
    case("--data-dir", "{no_images}", "class folder {no_images}/train/cat holds no images", "--data", "imagefolder"),
    case("--data-dir", "{file}", "data_dir {file} is a file", "--data", "mnist1d"),
    case("--model", "resnet9", "unknown model 'resnet9'"),
    case("--model", "vgg16bn", "'vgg16bn' takes images (C, H, W) of at least 32×32 pixels"),
    case("--base", "lbfgs", "unknown base 'lbfgs'"),
    case("--budget", "weekly", "unknown budget 'weekly'"),
    case("--budget", "", "unknown budget ''"),
    case("--budget", "nan", "unknown budget 'nan'"),
    *numeric("--epochs", "int", ["-1", "0"]),
    *numeric("--batch-size", "int", ["-1", "0"]),
    case("--batch-size", "2000", "batch_size=2000 leaves no update per epoch", method="m-rwp"),
    *numeric("--eval-batch-size", "int", ["-1", "0"]),
    *numeric("--lr", "float", ["nan", "inf", "-1", "0"]),
    *numeric("--momentum", "float", ["nan", "inf", "-0.1", "1"]),
    *numeric("--weight-decay", "float", ["nan", "inf", "-1"]),
    *numeric("--warmup-epochs", "float", ["nan", "inf", "-1", "3"], extra=("--epochs", "2")),
    *numeric("--label-smoothing", "float", ["nan", "inf", "-0.1", "1"]),
    *numeric("--clip", "float", ["nan", "inf", "-1", "0"]),
    *numeric("--sigma", "float", ["nan", "inf", "-1"], method="rwp"),
    *numeric("--sigma-inc", "float", ["nan", "inf", "-1"], method="arwp"),
    *numeric("--lam", "float", ["nan", "inf", "-0.1", "1.5"], method="m-rwp"),
    *numeric("--eta", "float", ["nan", "inf", "-1"], method="arwp"),
    *numeric("--beta", "float", ["nan", "inf", "-0.1", "1"], method="m-arwp"),
    *numeric("--rho", "float", ["nan", "inf", "-1"], method="sam"),
    *numeric("--alpha", "float", ["nan", "inf", "-1"], method="nrs"),
    case("--neighbour", "gaussian", "unknown neighbour 'gaussian'", method="nrs"),
    case("--divergence", "js", "unknown divergence 'js'", method="nrs"),
    case("--parallel", None, "--parallel is for the mixed methods m-rwp and m-arwp, not 'sam'", method="sam"),
    case("--parallel", None, "--parallel needs an even number of workers", method="m-rwp"),
    case("--parallel", "yes", "argument --parallel/--no-parallel: ignored explicit argument 'yes'", joined=True),
    case("--fsdp", None, "--fsdp does not combine with --parallel", "--parallel", method="m-rwp"),
    case("--fsdp", "yes", "argument --fsdp/--no-fsdp: ignored explicit argument 'yes'", joined=True),
    case("--fsdp", None, "--amp fp16 does not combine with --fsdp for method 'nrs'", "--amp", "fp16", method="nrs"),
    case("--fsdp", None, "neighbour='adversarial' does not combine with --fsdp", "--neighbour", "adversarial",
         method="nrs"),
    case("--same-batch", "yes", "argument --same-batch/--no-same-batch: ignored explicit argument 'yes'",
         joined=True),
    *numeric("--seed", "int", ["-1"]),
    case("--seed", str(2**63), f"seed={2**63} is not allowed"),
    *numeric("--val-fraction", "float", ["nan", "inf", "-0.1", "1"]),
    case("--val-fraction", "0.001", "val_fraction=0.001 cannot hold out every class"),
    *numeric("--cutout", "int", ["-1"]),
    case("--cutout", "16", "cutout=16 is not allowed for digits"),
    *numeric("--image-size", "int", ["-1", "0"]),
    case("--image-size", "32", "image_size=32 is not allowed for digits: it applies to imagefolder only"),
    case("--normalize", "cifar", "unknown normalize 'cifar'"),
    case("--normalize", "", "unknown normalize ''"),
    case("--normalize", "imagenet", "normalize='imagenet' is not allowed for digits"),
    case("--overwrite", "yes", "argument --overwrite/--no-overwrite: ignored explicit argument 'yes'", joined=True),
    *numeric("--num-workers", "int", ["-1"]),
    case("--device", "tpu", "device='tpu' is not allowed"),
    case("--device", "cuda:x", "device='cuda:x' is not allowed"),
    case("--amp", "fp8", "unknown amp 'fp8'"),
    case("--log", "wandb", "unknown log 'wandb'"),
    case("--log", "", "unknown log ''"),
    *numeric("--threads", "int", ["-1", "0"]),
    *numeric("--flatness", "int", ["-1"]),
    case("--out", "{file}", "out='{file}' is not a folder flatmin can write to"),
    case("--out", "{file}/run", "out='{file}/run' is not a folder flatmin can write to"),
    case("--out", "", "out='' is not allowed"),
    case("--progress", "loud", "unknown progress 'loud'"),
    case("--config", "{missing}.yaml", "cannot read config file {missing}.yaml"),
    case("--config", "{folder}", "cannot read config file {folder}"),
    case("--config", "{yaml_broken}", "is not valid YAML"),
    case("--config", "{yaml_list}", "must hold a mapping of settings, not list"),
    case("--config", "{yaml_unknown}", "unknown setting 'learning_rate'"),
    case("--config", "{yaml_types}", "seed='ten' is not allowed: it must be an integer"),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(case("--device", "cuda", "torch sees no CUDA device here"))
TRAIN_ONLY = [
    case("--method", "adam", "unknown method 'adam'"),
    # compare applies a hyperparameter to the methods that have it and leaves it out for the others
    case("--sigma", "0.1", "--sigma does not apply to method 'sam'", method="sam"),
    case("--lam", "0.5", "--lam does not apply to method 'rwp'", method="rwp"),
    *numeric("--stop-after", "int", ["-1", "0"]),
    case("--resume", "{missing}.pt", "no checkpoint at {missing}.pt"),
    case("--resume", "{folder}", "no checkpoint at {folder}/checkpoint.pt"),
    case("--resume", "{garbage}", "checkpoint {garbage} is damaged or not a torch file"),
    case("--resume", "{truncated}", "checkpoint {truncated} is damaged or not a torch file"),
    case("--resume", "{foreign}", "{foreign} is not a flatmin checkpoint"),
    case("--resume", "{no_config}", "checkpoint {no_config} has no config"),
    case("--resume", "{no_rng}", "checkpoint {no_rng} has no rng"),
    case("--resume", "{run}/checkpoint.pt", "method (checkpoint: 'sgd', now: 'sam')", "--method", "sam"),
    case("--resume", "{run}/checkpoint.pt", "model (checkpoint: 'mlp', now: 'cnn')", "--model", "cnn"),
    case("--resume", "{run}/checkpoint.pt", "epochs=1 is fewer than the 2 epochs", "--epochs", "1"),
    # a fresh run into the folder of a finished one
    case("--out", "{run}", "out='{run}' holds a run already (checkpoint.pt, summary.json): pass --resume"),
    case("--overwrite", None, "--overwrite does not combine with --resume", "--resume", "{run}/checkpoint.pt"),
]
COMPARE_ONLY = [
    case("--methods", "", "--methods names no method"),
    case("--methods", ",", "--methods names no method"),
    case("--methods", "sgd,adam", "unknown method 'adam' in --methods"),
    case("--methods", "sgd,rwp,sgd", "--methods names 'sgd' twice"),
    *numeric("--seeds", "int", ["-1", "0"]),
    *numeric("--jobs", "int", ["-1", "0"]),
    case("--tuned", "{missing}", "tuned='{missing}': no sweep found"),
    case("--tuned", "{file}", "tuned='{file}': no sweep found"),
]
# Every sweep of the cases below searches momentum, so that a case of its own is the only thing wrong.
SWEEP_ONLY = [
    case("--methods", "", "--methods names no method"),
    case("--methods", ",", "--methods names no method"),
    case("--methods", "sgd,adam", "unknown method 'adam' in --methods"),
    case("--methods", "sgd,rwp,sgd", "--methods names 'sgd' twice"),
    case("--space", "sigma=0.01,0.02", "--sigma does not apply to method 'sam'", method="sam"),
    case("--space", "sam.sigma=0.01", "--sigma does not apply to method 'sam'", "--methods", "rwp,sam"),
    case("--space", "rwp.sigma=0.01", "method 'rwp' is not in --methods", method="sam"),
    case("--space", "sigma=0.2:0.1:3", "the range is reversed", method="rwp"),
    case("--space", "sigma=0.1:0.1:3", "the range is empty", method="rwp"),
    case("--space", "lam=0.5:1.5:3", "lam=1.5 is not allowed", method="m-rwp"),
    case("--space", "beta=0.5:1:3", "beta=1.0 is not allowed", method="arwp"),
    case("--space", "sigma=0:0.1:log:3", "a log range must lie above 0", method="rwp"),
    case("--space", "sigma=0.01:0.1", "a grid needs the number of points", method="rwp"),
    case("--space", "sigma=0.01:0.1:cubic", "unknown range option 'cubic'", method="rwp"),
    case("--space", "sigma=0.01:0.1:1", "at least 2 grid points", method="rwp"),
    case("--space", "sigma=", "the list of values is empty", method="rwp"),
    case("--space", "sigma=0.1,x", "'x' is not a number", method="rwp"),
    case("--space", "sigma=0.1,0.1", "a value is listed twice", method="rwp"),
    case("--space", "sigma=nan,0.1", "sigma=nan is not allowed", method="rwp"),
    case("--space", "batch_size=16.5,32", "batch_size takes whole numbers", method="rwp"),
    case("--space", "batch_size=0,32", "batch_size=0 is not allowed", method="rwp"),
    case("--space", "base=lbfgs", "unknown base 'lbfgs'", method="rwp"),
    case("--space", "neighbour=gaussian", "unknown neighbour 'gaussian'", method="nrs"),
    case("--space", "seed=1,2", "'seed' cannot be swept (the seeds are --seed and --seeds)"),
    case("--space", "learning_rate=0.1", "'learning_rate' cannot be swept"),
    case("--space", "adam.lr=0.1", "unknown method 'adam'"),
    case("--space", "momentum=0.5", "momentum of sgd is given twice"),
    case("--space", "sigma", "is neither NAME=VALUES"),
    case("--space", "{missing}.yaml", "cannot read config file {missing}.yaml"),
    case("--space", "{yaml_list}", "must hold a mapping of settings, not list"),
    case("--sampler", "cmaes", "unknown sampler 'cmaes'"),
    case("--trials", "5", "trials=5 is not allowed with the grid sampler"),
    *numeric("--trials", "int", ["-1", "0"], extra=("--sampler", "random")),
    *numeric("--seeds", "int", ["-1", "0"]),
    case("--prune", "yes", "argument --prune/--no-prune: ignored explicit argument 'yes'", joined=True),
    case("--study", "a/b", "study='a/b' is not allowed"),
    case("--study", "", "study='' is not allowed"),
    case("--storage", "redis://localhost", "storage='redis://localhost' is not a database URL"),
    case("--storage", "postgresql://nobody@127.0.0.1:1/db", "cannot open storage postgresql://nobody@127.0.0.1:1/db"),
    *numeric("--jobs", "int", ["-1", "0"]),
    *numeric("--heartbeat", "int", ["-1", "0"]),
    *numeric("--tie", "float", ["nan", "inf", "-0.1", "1"]),
    case("--val-fraction", "0", "val_fraction=0.0 is not allowed in a sweep"),
    case("--data", "imagefolder", "data='imagefolder' cannot be swept"),
]
ANALYZE = [
    case("checkpoints", "{missing}.pt", "no checkpoint at {missing}.pt"),
    case("checkpoints", "{folder}", "no checkpoint at {folder}/checkpoint.pt"),
    case("checkpoints", "{garbage}", "checkpoint {garbage} is damaged"),
    case("checkpoints", "{foreign}", "{foreign} is not a flatmin checkpoint"),
    case("checkpoints", "{no_config}", "checkpoint {no_config} has no config"),
    case("--what", "", "--what='' names no analysis"),
    case("--what", "curvature", "unknown analysis 'curvature'"),
    *numeric("--batches", "int", ["-1", "0"], name="--batches"),
    *numeric("--batch-size", "int", ["-1", "0"], name="--batch-size"),
    case("--split", "holdout", "argument --split: invalid choice: 'holdout'"),
    case("--split", "val", "--split val: this run has no val split"),
    *numeric("--k", "int", ["-1", "0"], name="--k"),
    case("--k", "1000", "k=1000"),
    *numeric("--probes", "int", ["-1", "0", "1"], name="--probes"),
    *numeric("--steps", "int", ["-1", "0", "1"], name="--steps"),
    *numeric("--draws", "int", ["-1", "0"], name="--draws"),
    case("--adversarial", "yes", "argument --adversarial: ignored explicit argument 'yes'", joined=True),
    *numeric("--seed", "int", ["-1"], name="--seed"),
    case("--seed", str(2**63), f"--seed={2**63} is not allowed"),
    case("--device", "tpu", "device='tpu' is not allowed"),
    case("--device", "cuda:x", "device='cuda:x' is not allowed"),
    case("--out", "{file}", "--out='{file}' is not a folder flatmin can write to"),
    case("--out", "{file}/analysis", "--out='{file}/analysis' is not a folder flatmin can write to"),
]


def in_imagefolder(c):
    """A case on an image folder, which a sweep refuses as a whole (it has no validation split)."""
    return "imagefolder" in c.values[1]


# compare and sweep take every setting of a run but the method (they have --methods) and --stop-after
# (they have no --resume).
NOT_IN_COMPARE = ("--method", "--stop-after", "--resume")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A finished two-epoch run and every kind of bad file, by the names the cases use."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    assert main(["train", *QUICK, "--method", "sgd", "--epochs", "2", "--out", str(run)]) == 0
    ckpt = load_checkpoint(run)
    p = {"run": run, "file": root / "a_file", "missing": root / "missing", "folder": root / "empty",
         "no_images": root / "no_images"}
    p["file"].write_text("not a folder")
    p["folder"].mkdir()
    for split in ("train", "val"):
        (p["no_images"] / split / "cat").mkdir(parents=True)
    for name, text in {"yaml_broken": "epochs: [1, 2\n", "yaml_list": "- epochs\n- 2\n",
                       "yaml_unknown": "learning_rate: 0.1\n", "yaml_types": "seed: ten\n"}.items():
        p[name] = root / f"{name}.yaml"
        p[name].write_text(text)
    p["garbage"] = root / "garbage.pt"
    p["garbage"].write_bytes(b"not a checkpoint at all")
    p["truncated"] = root / "truncated.pt"
    whole = (run / "checkpoint.pt").read_bytes()
    p["truncated"].write_bytes(whole[: len(whole) // 2])
    p["foreign"] = root / "foreign.pt"
    torch.save({"state": 1}, p["foreign"])
    for name, drop in (("no_config", "config"), ("no_rng", "rng")):
        p[name] = root / f"{name}.pt"
        save_checkpoint(p[name], {k: v for k, v in ckpt.items() if k not in ("format", drop)})
    return p


def fill(items, paths):
    return [item.format(**{k: str(v) for k, v in paths.items()}) for item in items]


def snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command, needle):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith((f"flatmin {command}: error: ", "flatmin: error: ")), err
    assert needle in lines[0], (needle, err)


@pytest.mark.parametrize("flag, args, needle, method", CONFIG_CASES + TRAIN_ONLY)
def test_train_refuses_bad_values_in_one_line_and_keeps_earlier_results(paths, capsys, flag, args, needle, method):
    before = snapshot(paths["run"])
    argv = ["train", *QUICK, *(["--method", method] if method else []), "--epochs", "2", "--out", str(paths["run"]),
            *fill(args, paths)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "train", fill([needle], paths)[0])
    assert snapshot(paths["run"]) == before


@pytest.mark.parametrize("flag, args, needle, method",
                         [c for c in CONFIG_CASES if c.values[0] not in NOT_IN_COMPARE] + COMPARE_ONLY)
def test_compare_refuses_bad_values_in_one_line_before_any_run(paths, capsys, flag, args, needle, method):
    before = snapshot(paths["run"])
    argv = ["compare", *QUICK, "--epochs", "2", "--seeds", "1", "--out", str(paths["run"]),
            *(["--methods", method] if method else []), *fill(args, paths)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "compare", fill([needle], paths)[0])
    assert snapshot(paths["run"]) == before  # no run started, nothing written


@pytest.mark.parametrize("flag, args, needle, method",
                         [c for c in CONFIG_CASES if c.values[0] not in NOT_IN_COMPARE and not in_imagefolder(c)]
                         + SWEEP_ONLY)
def test_sweep_refuses_bad_values_in_one_line_before_any_trial(paths, capsys, flag, args, needle, method):
    pytest.importorskip("optuna", reason="flatmin sweep needs the sweep extra")
    before = snapshot(paths["run"])
    argv = ["sweep", *QUICK, "--epochs", "2", "--seeds", "1", "--out", str(paths["run"]), "--space", "momentum=0.8,0.9",
            *(["--methods", method] if method else ["--methods", "sgd"]), *fill(args, paths)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "sweep", fill([needle], paths)[0])
    assert snapshot(paths["run"]) == before  # no study made, no trial run, nothing written


@pytest.mark.parametrize("flag, args, needle, method", ANALYZE)
def test_analyze_refuses_bad_values_in_one_line(paths, capsys, flag, args, needle, method):
    before = snapshot(paths["run"])
    args = fill(args, paths)
    checkpoint = args[-1] if flag == "checkpoints" else str(paths["run"] / "checkpoint.pt")
    options = [] if flag == "checkpoints" else args
    code, _, err = run_cli(["analyze", checkpoint, "--batches", "1", "--probes", "2", *options], capsys)
    assert_one_line_error(code, err, "analyze", fill([needle], paths)[0])
    assert snapshot(paths["run"]) == before


def _flags(command):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {(a.option_strings[0] if a.option_strings else a.dest) for a in commands[command]._actions
            if not isinstance(a, argparse._HelpAction)}


def test_every_flag_has_bad_values():
    covered = {
        "train": {c.values[0] for c in CONFIG_CASES + TRAIN_ONLY},
        "compare": {c.values[0] for c in CONFIG_CASES + COMPARE_ONLY if c.values[0] not in NOT_IN_COMPARE},
        "sweep": {c.values[0] for c in CONFIG_CASES + SWEEP_ONLY if c.values[0] not in NOT_IN_COMPARE},
        "analyze": {c.values[0] for c in ANALYZE},
    }
    for command, flags in covered.items():
        parsed = _flags(command)
        assert parsed == flags, (f"flatmin {command}: flags without bad-value cases: {sorted(parsed - flags)}; "
                                 f"cases for no flag: {sorted(flags - parsed)}")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders; --out under a file covers the unwritable case")
def test_a_read_only_output_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["train", *QUICK, "--epochs", "1", "--out", str(locked)], capsys)
        assert_one_line_error(code, err, "train", f"out='{locked}' is not a folder flatmin can write to")
    finally:
        locked.chmod(0o700)


def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys):
    for text, needle in [("device: 5\n", "device=5 is not allowed: it must be text"),
                         ("parallel: 3\n", "parallel=3 is not allowed: it must be true or false"),
                         ("out: 5\n", "out=5 is not allowed: it must be text"),
                         ("seed: 1.5\n", "seed=1.5 is not allowed: it must be an integer"),
                         ("lr: .nan\n", "lr=nan is not allowed"),
                         ("sigma: -.inf\nmethod: rwp\n", "sigma=-inf is not allowed"),
                         ("data: [1, 2]\n", "data=[1, 2] is not allowed: it must be text"),
                         ("epochs:\n", "epochs=None is not allowed: it must be an integer")]:
        config = tmp_path / "run.yaml"
        config.write_text(text)
        code, _, err = run_cli(["train", "--config", str(config)], capsys)
        assert_one_line_error(code, err, "train", needle)


def test_the_installed_command_prints_no_traceback(paths, tmp_path):
    """The real entry point (``python -m flatmin``) on an argparse error and on a damaged checkpoint:
    exit status 2 and one line on stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    for argv, needle in [(["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
                         (["analyze", str(paths["garbage"])], "is damaged or not a torch file")]:
        result = subprocess.run([sys.executable, "-m", "flatmin", *argv], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2 and result.stdout == "", result
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
