"""What a sweep adds to the training it runs: storage, sampler and process start-up.

24 grid trials of the digits MLP (30 epochs each) with ``--jobs 2``, as one ``flatmin sweep``
command, timed from its start to its exit (imports, the check of the first point, the storage, the
worker process, the reports and plots included), with one seed per trial and with the sweep's
default of two. Against it:

* the trials' own times: each seed run's ``train()`` call from its start to its summary
  (``run_time_s`` in trials.csv: data, model, epochs, evaluation, checkpoints), summed and divided
  by the 2 workers. The issue's target is ``wall / (sum / 2) <= 1.10``, on the default SQLite
  storage and on PostgreSQL (a cluster of its own in a temporary folder, as tests/test_sweep.py
  starts one);
* the same trainings without a sweep: the run configurations the sweep wrote, run back to back by
  ``flatmin.train.train`` in 2 fresh Python processes (half each), no Optuna, no storage, no
  reports. Their wall time is what any driver that starts processes for these trainings pays
  (Python, torch and its first optimizer, scikit-learn's split); the sweep's own cost is the rest.
  Their validation accuracies are checked equal to the sweep's, so both trained the same things.

    PYTHONPATH=src python benchmarks/bench_sweep.py --out benchmarks/results/bench-sweep-cpu.txt
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin() -> Path:
    """The folder of PostgreSQL's initdb and pg_ctl: Debian's newest, or the one on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


@contextmanager
def postgres() -> Iterator[Optional[str]]:
    """A PostgreSQL server of its own (``None`` where the binaries are missing)."""
    if not (PG_BIN / "initdb").exists():
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="flatmin-bench-pg-"))
    prefix: List[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "postgres" if _has_user("postgres") else "nobody"
        shutil.chown(root, user)
        prefix = ["runuser", "-u", user, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


SWEEP_COMMAND = [sys.executable, "-m", "flatmin", "sweep", "--data", "digits", "--model", "mlp", "--methods", "rwp",
                 "--progress", "none"]
# One process of the no-sweep baseline: its share of the run configurations, trained one after the other.
BARE_DRIVER = """
import json, sys, time
from flatmin.train import TrainConfig, train
runs = []
for cfg in json.load(open(sys.argv[1])):
    start = time.perf_counter()
    summary = train(TrainConfig.from_dict(cfg, where="bench"))
    runs.append({"out": cfg["out"], "val_acc": summary["val_acc"], "run_time_s": time.perf_counter() - start})
json.dump(runs, open(sys.argv[2], "w"))
"""


def _env() -> dict:
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def measure(name: str, out: Path, args: argparse.Namespace, seeds: int,
            storage: Optional[str]) -> Tuple[str, float, float]:
    """Run the sweep once; its wall time against the trials' own, and where the rest went."""
    import optuna

    from flatmin.train.sweep import with_driver

    study = out.name if storage is None else f"bench-{time.time_ns()}"
    command = [*SWEEP_COMMAND, "--epochs", str(args.epochs), "--space", f"sigma=0.001:0.1:log:{args.trials}",
               "--seeds", str(seeds), "--jobs", str(args.jobs), "--out", str(out), "--study", study]
    if storage:
        command += ["--storage", storage]
    load = os.getloadavg()
    began = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(f"{name}: the sweep failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    wall = time.perf_counter() - start
    ended = began + wall
    with open(out / "trials.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["state"] == "complete"]
    runs = sum(float(r["run_time_s"]) for r in rows)
    trains = sum(float(r["train_time_s"]) for r in rows)
    own: Dict[int, float] = {}
    for r in rows:
        own[int(r["trial"])] = own.get(int(r["trial"]), 0.0) + float(r["run_time_s"])
    url = with_driver(storage or f"sqlite:///{(out / 'study.db').resolve()}")
    trials = [t for t in optuna.load_study(study_name=f"{study}/rwp", storage=url).get_trials()
              if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start.timestamp() for t in trials)
    last = max(t.datetime_complete.timestamp() for t in trials)
    # Inside each trial, around its training: suggesting, storing its results, the heartbeat, telling.
    inside = sum((t.datetime_complete - t.datetime_start).total_seconds() - own[t.number] for t in trials)
    ideal = runs / args.jobs
    return (f"{name:<11} {len(trials):>3} trials, {len(rows):>3} runs  wall {wall:6.1f} s  trials' own time "
            f"{runs:6.1f} s "
            f"(training loop alone {trains:6.1f} s)  wall / (own / {args.jobs}) = {wall / ideal:5.3f}, "
            f"{'meets' if wall / ideal <= 1.10 else 'misses'} 1.10\n"
            f"{'':<11} start-up to the first trial {first - began:5.1f} s, reports and exit after the last "
            f"{ended - last:4.1f} s, storage and sampler inside the trials {1000 * inside / len(trials):4.0f} ms per "
            f"trial, between the first start and the last end {last - first - ideal:5.1f} s beyond own / {args.jobs} "
            f"(load average before: {load[0]:.2f})"), wall, wall / ideal


def measure_bare(sweep_out: Path, out: Path, args: argparse.Namespace, sweep_wall: float) -> Tuple[str, float]:
    """The sweep's runs again, without a sweep: ``args.jobs`` fresh processes, each its share in turn."""
    configs, swept = [], {}  # each run's settings, and its validation accuracy in the sweep
    for summary in sorted(sweep_out.glob("rwp/trial*/seed*/summary.json")):
        done = json.loads(summary.read_text())
        configs.append({**done["config"], "out": str(out / summary.parent.relative_to(sweep_out))})
        swept[configs[-1]["out"]] = done["val_acc"]
    shares = [configs[k::args.jobs] for k in range(args.jobs)]
    out.mkdir(parents=True)
    for k, share in enumerate(shares):
        (out / f"share{k}.json").write_text(json.dumps(share))
    load = os.getloadavg()
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", BARE_DRIVER, str(out / f"share{k}.json"),
                               str(out / f"done{k}.json")], env=_env(), stderr=subprocess.PIPE, text=True)
             for k in range(args.jobs)]
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"no sweep: a process failed: {proc.stderr.read().strip()[-2000:]}")
    wall = time.perf_counter() - start
    runs = [r for k in range(args.jobs) for r in json.loads((out / f"done{k}.json").read_text())]
    own = sum(r["run_time_s"] for r in runs)
    same = all(swept[r["out"]] == r["val_acc"] for r in runs)
    return (f"{'no sweep':<11} {len(runs):>3} runs in {args.jobs} processes  wall {wall:6.1f} s  runs' own time "
            f"{own:6.1f} s  "
            f"wall / (own / {args.jobs}) = {wall / (own / args.jobs):5.3f}  (validation accuracies equal to the "
            f"sweep's: {'yes' if same else 'NO'}; load average before: {load[0]:.2f})\n"
            f"{'':<11} the sweep's wall time / this = {sweep_wall / wall:5.3f} (SQLite)"), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", default="1,2", help="seeds per trial, one sweep each (default: 1,2)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of the three, with medians (default: 1)")
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    args = parser.parse_args()
    lines = [f"flatmin sweep overhead: {args.trials} grid trials of the digits MLP, {args.epochs} epochs, --jobs "
             f"{args.jobs}; {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"]
    print(lines[0], flush=True)

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="flatmin-bench-sweep-") as tmp, postgres() as url:
        for seeds in (int(s) for s in args.seeds.split(",")):
            say(f"-- {seeds} seed{'s' if seeds != 1 else ''} per trial")
            ratios: Dict[str, List[float]] = {"sqlite": [], "postgresql": [], "sweep / no sweep": []}
            for rep in range(args.repeat):
                # Each repetition runs the three one after the other, so that the sweep and the same
                # trainings without it meet the same machine; the medians say what holds across them.
                run = Path(tmp) / f"seeds{seeds}-{rep}"
                line, wall, ratio = measure("sqlite file", run / "sqlite", args, seeds, None)
                say(line)
                ratios["sqlite"].append(ratio)
                if url:
                    line, _, ratio = measure("postgresql", run / "postgresql", args, seeds, url)
                    ratios["postgresql"].append(ratio)
                else:
                    line = f"postgresql  skipped: no server binaries in {PG_BIN}"
                say(line)
                line, bare = measure_bare(run / "sqlite", run / "bare", args, wall)
                say(line)
                ratios["sweep / no sweep"].append(wall / bare)
            if args.repeat > 1:
                say(f"{'median':<11} of {args.repeat}: " + "; ".join(
                    f"{name} {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
                    for name, values in ratios.items() if values)
                    + f"  [sqlite and postgresql: wall / (own / {args.jobs})]")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
