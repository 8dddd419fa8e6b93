"""What a sweep adds to the training it runs: storage, sampler and process start-up.

24 grid trials of the digits MLP (30 epochs each, one seed) with ``--jobs 2``, as one
``flatmin sweep`` command, timed from its start to its exit (imports, the check of the first
point, the storage, the worker process, the reports and plots included). Against it: the trials' own
times, each seed run's ``train()`` call from its start to its summary (``run_time_s`` in
trials.csv: data, model, epochs, evaluation, checkpoints), summed and divided by the 2 workers.
The target is ``wall / (sum / 2) <= 1.10``, on the default SQLite storage and on PostgreSQL (a
cluster of its own in a temporary folder, as tests/test_sweep.py starts one).

    PYTHONPATH=src python benchmarks/bench_sweep.py --out benchmarks/results/bench-sweep-cpu.txt
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

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


def measure(name: str, out: Path, args: argparse.Namespace, storage: Optional[str]) -> str:
    """Run the sweep once; its wall time against the trials' own, and where the rest went."""
    import optuna

    from flatmin.train.sweep import with_driver

    study = out.name if storage is None else f"bench-{time.time_ns()}"
    command = [sys.executable, "-m", "flatmin", "sweep", "--data", "digits", "--model", "mlp", "--epochs",
               str(args.epochs), "--methods", "rwp", "--space", f"sigma=0.001:0.1:log:{args.trials}", "--seeds", "1",
               "--jobs", str(args.jobs), "--progress", "none", "--out", str(out), "--study", study]
    if storage:
        command += ["--storage", storage]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()
    began = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{name}: the sweep failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    wall = time.perf_counter() - start
    ended = began + wall
    with open(out / "trials.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["state"] == "complete"]
    runs = sum(float(r["run_time_s"]) for r in rows)
    trains = sum(float(r["train_time_s"]) for r in rows)
    own = {int(r["trial"]): float(r["run_time_s"]) for r in rows}
    url = with_driver(storage or f"sqlite:///{(out / 'study.db').resolve()}")
    trials = [t for t in optuna.load_study(study_name=f"{study}/rwp", storage=url).get_trials()
              if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start.timestamp() for t in trials)
    last = max(t.datetime_complete.timestamp() for t in trials)
    # Inside each trial, around its training: suggesting, storing its results, the heartbeat, telling.
    inside = sum((t.datetime_complete - t.datetime_start).total_seconds() - own[t.number] for t in trials)
    ideal = runs / args.jobs
    return (f"{name:<11} {len(rows):>3} trials  wall {wall:6.1f} s  trials' own time {runs:6.1f} s (training loop "
            f"alone {trains:6.1f} s)  wall / (own / {args.jobs}) = {wall / ideal:5.3f}, "
            f"{'meets' if wall / ideal <= 1.10 else 'misses'} 1.10\n"
            f"{'':<11} start-up to the first trial {first - began:5.1f} s, reports after the last {ended - last:4.1f} s, "
            f"storage and sampler inside the trials {1000 * inside / len(trials):4.0f} ms per trial, between the "
            f"first start and the last end {last - first - ideal:5.1f} s beyond own / {args.jobs} "
            f"(load average before: {load[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    args = parser.parse_args()
    lines = [f"flatmin sweep overhead: {args.trials} grid trials of the digits MLP, {args.epochs} epochs, 1 seed, "
             f"--jobs {args.jobs}; {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory(prefix="flatmin-bench-sweep-") as tmp:
        lines.append(measure("sqlite file", Path(tmp) / "sqlite", args, None))
        print(lines[-1], flush=True)
        with postgres() as url:
            if url is None:
                lines.append(f"postgresql  skipped: no server binaries in {PG_BIN}")
            else:
                lines.append(measure("postgresql", Path(tmp) / "postgresql", args, url))
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
