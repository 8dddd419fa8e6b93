"""flatmin sweep: grid, random and TPE on a tiny model; every point exactly once on shared storages
(two processes on the default SQLite file, two on a real PostgreSQL server); a worker killed mid-trial
retried; the choice blind to the test labels; best.yaml repeating its trial; bad input in one line."""
import csv
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

optuna = pytest.importorskip("optuna", reason="flatmin sweep needs the sweep extra: pip install 'flatmin[sweep]'")

from flatmin.cli import main  # noqa: E402
from flatmin.data.mnist1d import load_mnist1d  # noqa: E402
from flatmin.train.sweep import choose, start_method, with_driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
# The digits MLP, one epoch of 4 updates per seed, validation on 20 % of the training set.
TINY = ["--data", "digits", "--model", "mlp", "--batch-size", "256", "--epochs", "1", "--progress", "none",
        "--methods", "rwp"]


def _pg_bin() -> Path:
    """The folder of PostgreSQL's initdb and pg_ctl: Debian's newest, or the one on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def read_trials(folder):
    with open(Path(folder) / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def study_trials(storage, name):
    """Every trial of the sweep's study (surplus ones, made when workers ask at once, left out)."""
    study = optuna.load_study(study_name=name, storage=with_driver(storage))
    return [t for t in study.get_trials() if not t.user_attrs.get("surplus")]


def spawn(argv):
    return subprocess.Popen([sys.executable, "-m", "flatmin", "sweep", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def assert_each_point_once(trials, values):
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert Counter(t.params["sigma"] for t in complete) == Counter({v: 1 for v in values})
    assert not [t for t in trials if not t.state.is_finished()]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    assert main(["sweep", *TINY, "--space", "sigma=0.005:0.05:log:3", "--seeds", "2", "--out", str(out)]) == 0
    return out


def test_grid_runs_every_point_once_and_chooses_by_validation(grid_sweep):
    rows = read_trials(grid_sweep)
    assert len(rows) == 6 and {r["state"] for r in rows} == {"complete"}
    sigmas = sorted({float(r["sigma"]) for r in rows})
    assert sigmas == pytest.approx(np.geomspace(0.005, 0.05, 3), rel=1e-5)
    # The rule recomputed from the table: the highest mean validation accuracy over the two seeds.
    means = {}
    for r in rows:
        means.setdefault(int(r["trial"]), []).append(float(r["val_acc"]))
    best = max(sorted(means), key=lambda t: np.mean(means[t]))
    best_sigma = float(next(r["sigma"] for r in rows if int(r["trial"]) == best))
    chosen = yaml.safe_load((grid_sweep / "rwp" / "best.yaml").read_text())
    assert chosen["method"] == "rwp" and chosen["sigma"] == pytest.approx(best_sigma)
    summary = json.loads((grid_sweep / "sweep.json").read_text())
    assert summary["chosen"]["rwp"]["trial"] == best
    assert summary["chosen"]["rwp"]["val_acc"] == pytest.approx(np.mean(means[best]))
    assert "Rule:" in (grid_sweep / "sweep.md").read_text()
    assert (grid_sweep / "sensitivity.png").stat().st_size > 0 and (grid_sweep / "tradeoff.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_draw_inside_the_range(tmp_path, sampler):
    argv = [*TINY, "--space", "sigma=0.001:0.1:log", "--space", "lr=0.02:0.1", "--sampler", sampler,
            "--trials", "4", "--seeds", "1", "--out", str(tmp_path)]
    assert main(["sweep", *argv]) == 0
    rows = read_trials(tmp_path)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    assert all(0.001 <= float(r["sigma"]) <= 0.1 and 0.02 <= float(r["lr"]) <= 0.1 for r in rows)
    assert len({r["sigma"] for r in rows}) == 4
    assert (tmp_path / "importances.png").stat().st_size > 0  # two settings, four trials: fANOVA runs
    trials = study_trials(f"sqlite:///{tmp_path / 'study.db'}", f"{tmp_path.name}/rwp")
    dist = trials[0].distributions["sigma"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    # Run again: the study is complete, nothing is trained twice.
    assert main(["sweep", *argv]) == 0
    assert len(read_trials(tmp_path)) == 4


def test_pruned_trials_are_recorded_as_pruned_and_never_chosen(tmp_path):
    # Four good learning rates complete first (the pruner's start-up); the two tiny ones then sit far
    # below their median validation accuracy after the second epoch.
    argv = [*TINY, "--epochs", "4", "--space", "lr=0.1,0.2,0.05,0.15,0.00001,0.00002", "--seeds", "1", "--prune",
            "--out", str(tmp_path)]
    assert main(["sweep", *argv]) == 0
    states = {float(r["lr"]): r["state"] for r in read_trials(tmp_path)}
    assert states[0.00001] == states[0.00002] == "pruned"
    assert [states[lr] for lr in (0.1, 0.2, 0.05, 0.15)] == ["complete"] * 4
    assert yaml.safe_load((tmp_path / "rwp" / "best.yaml").read_text())["lr"] >= 0.05


def test_the_rule_breaks_near_ties_toward_the_earliest_point():
    def record(trial, acc, retry_of=None, state="complete"):
        return {"method": "rwp", "trial": trial, "val_acc": acc, "retry_of": retry_of, "state": state}

    records = [record(0, 0.950), record(1, 0.951), record(2, 0.990, state="pruned"), record(4, 0.9515, retry_of=3)]
    assert choose(records, ["rwp"])["rwp"]["trial"] == 4  # the best mean; pruned trials are no candidates
    assert choose(records, ["rwp"], tie=0.002)["rwp"]["trial"] == 0  # within 0.002 of it: the first point
    assert choose(records, ["rwp"], tie=0.001)["rwp"]["trial"] == 1
    # A retry ranks as the trial it repeats: trial 4 (retry of 3) comes after trial 1, before trial 5.
    records = [record(4, 0.95, retry_of=3), record(5, 0.95), record(1, 0.94)]
    assert choose(records, ["rwp"], tie=0.02)["rwp"]["trial"] == 1
    assert choose([record(4, 0.95, retry_of=3), record(5, 0.95)], ["rwp"])["rwp"]["trial"] == 4


def test_two_processes_on_the_default_storage_run_each_point_once(tmp_path):
    values = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    argv = [*TINY, "--space", "sigma=" + ",".join(map(str, values)), "--seeds", "1", "--out", str(tmp_path)]
    procs = [spawn([*argv, "--jobs", str(jobs)]) for jobs in (1, 2)]  # three workers: one, and two
    for proc in procs:
        finish(proc)
    assert_each_point_once(study_trials(f"sqlite:///{tmp_path / 'study.db'}", f"{tmp_path.name}/rwp"), values)
    assert len(read_trials(tmp_path)) == len(values)


def test_workers_are_forked_on_linux_unless_trials_use_several_threads_and_spawned_ones_work_too(tmp_path):
    assert start_method(1) == ("fork" if sys.platform == "linux" else "spawn")
    assert start_method(2) == "spawn"  # GNU OpenMP's thread pool does not survive a fork
    values = [0.002, 0.01, 0.05]
    argv = [*TINY, "--space", "sigma=" + ",".join(map(str, values)), "--seeds", "1", "--threads", "2", "--jobs", "2",
            "--out", str(tmp_path)]
    assert main(["sweep", *argv]) == 0
    assert_each_point_once(study_trials(f"sqlite:///{tmp_path / 'study.db'}", f"{tmp_path.name}/rwp"), values)
    assert {r["state"] for r in read_trials(tmp_path)} == {"complete"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own in a temporary folder on a free port (as an unprivileged
    user when the tests run as root, which PostgreSQL refuses), stopped afterwards."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (Debian: apt-get install postgresql-15)")
    pytest.importorskip("psycopg2", reason="PostgreSQL storage needs psycopg2: pip install 'flatmin[sweep]'")
    root = Path(tempfile.mkdtemp(prefix="flatmin-pg-"))
    prefix = []
    if os.geteuid() == 0:
        user = next(u for u in ("postgres", "nobody") if _has_user(u))
        shutil.chown(root, user)
        prefix = ["runuser", "-u", user, "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_two_workers_on_postgresql_run_each_point_once(tmp_path, postgres):
    values = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    argv = [*TINY, "--space", "sigma=" + ",".join(map(str, values)), "--seeds", "1", "--storage", postgres,
            "--study", "pg-grid"]
    # Two "machines": separate output folders, one study; the first runs two workers (a forked one shares
    # nothing of its parent's connections).
    procs = [spawn([*argv, "--out", str(tmp_path / f"node{i}"), "--jobs", str(2 - i)]) for i in range(2)]
    for proc in procs:
        finish(proc)
    assert_each_point_once(study_trials(postgres, "pg-grid/rwp"), values)
    for i in range(2):  # each machine's report covers the whole study
        assert len(read_trials(tmp_path / f"node{i}")) == len(values)


def test_a_worker_killed_mid_trial_is_retried_and_every_point_measured(tmp_path):
    values = [0.005, 0.02]
    # Trials long enough (6 epochs of 67 updates) that the kill lands inside the first one.
    argv = ["--data", "digits", "--model", "mlp", "--batch-size", "16", "--epochs", "6", "--progress", "none",
            "--methods", "rwp", "--space", "sigma=" + ",".join(map(str, values)), "--seeds", "1",
            "--heartbeat", "1", "--out", str(tmp_path)]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = spawn(argv)
    deadline = time.monotonic() + 300
    # The first trial has begun training (its run opened metrics.jsonl): kill the command, worker and all.
    while not list(tmp_path.glob("rwp/trial*/seed0/metrics.jsonl")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no trial was seen training"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = [t for t in study_trials(storage, f"{tmp_path.name}/rwp") if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1, "the kill landed between trials"
    running = killed[0]
    finish(spawn(argv))
    trials = study_trials(storage, f"{tmp_path.name}/rwp")
    assert_each_point_once(trials, values)
    killed = next(t for t in trials if t.number == running.number)
    assert killed.state == optuna.trial.TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == running.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == running.params
    rows = read_trials(tmp_path)
    assert [r["retry_of"] for r in rows if r["trial"] == str(retry.number)] == [str(running.number)]


def test_the_test_labels_never_enter_the_choice(tmp_path):
    """The same sweep on MNIST-1D with the test labels shuffled: other test accuracies, same best.yaml."""
    load_mnist1d(tmp_path / "plain")  # writes the cache file the runs read
    with np.load(tmp_path / "plain" / "mnist1d.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y_test"] = np.random.default_rng(0).permutation(arrays["y_test"])
    (tmp_path / "shuffled").mkdir()
    np.savez(tmp_path / "shuffled" / "mnist1d.npz", **arrays)
    chosen, test_accs = [], []
    for name in ("plain", "shuffled"):
        out = tmp_path / f"sweep-{name}"
        assert main(["sweep", "--data", "mnist1d", "--data-dir", str(tmp_path / name), "--model", "mlp",
                     "--batch-size", "256", "--epochs", "2", "--progress", "none", "--methods", "rwp,sam",
                     "--space", "sigma=0.005,0.02,0.08", "--space", "rho=0.01,0.1", "--seeds", "1",
                     "--out", str(out)]) == 0
        best = {m: yaml.safe_load((out / m / "best.yaml").read_text()) for m in ("rwp", "sam")}
        for config in best.values():
            del config["out"], config["data_dir"]
        chosen.append(best)
        test_accs.append([r["test_acc"] for r in read_trials(out)])
    assert chosen[0] == chosen[1]
    assert test_accs[0] != test_accs[1]


def test_best_yaml_repeats_its_trial(grid_sweep, tmp_path, capsys):
    summary = json.loads((grid_sweep / "sweep.json").read_text())
    trial = summary["chosen"]["rwp"]["trial"]
    expected = next(float(r["val_acc"]) for r in read_trials(grid_sweep)
                    if int(r["trial"]) == trial and r["seed"] == "0")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(grid_sweep / "rwp" / "best.yaml"), "--progress", "none",
                     "--out", str(tmp_path / "again")]) == 0
    finally:
        torch.set_num_threads(threads)
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["val_acc"] == expected


def test_compare_takes_the_chosen_point(grid_sweep, tmp_path, capsys):
    summary = json.loads((grid_sweep / "sweep.json").read_text())
    assert main(["compare", "--data", "digits", "--model", "mlp", "--batch-size", "256", "--epochs", "1",
                 "--progress", "none", "--methods", "sgd,rwp", "--seeds", "1", "--tuned", str(grid_sweep),
                 "--out", str(tmp_path)]) == 0
    runs = {r["method"]: r for r in json.loads((tmp_path / "runs.json").read_text())}
    assert runs["rwp"]["hparams"]["sigma"] == pytest.approx(summary["chosen"]["rwp"]["params"]["sigma"])
    assert "tuned by the sweep" in capsys.readouterr().out
    code = main(["compare", "--data", "mnist1d", "--methods", "rwp", "--tuned", str(grid_sweep), "--out",
                 str(tmp_path / "other")])
    assert code == 2 and "was tuned on data 'digits', not 'mnist1d'" in capsys.readouterr().err


def one_line_error(capsys, argv, needle):
    code = main(["sweep", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("flatmin sweep: error: "), err
    assert needle in err, (needle, err)


@pytest.mark.parametrize("space, method, needle", [
    ("sigma=0.01,0.02", "sam", "--sigma does not apply to method 'sam' (its hyperparameters: rho)"),
    ("rwp.rho=0.1,0.2", "rwp", "--rho does not apply to method 'rwp'"),
    ("sigma=0.1:0.1:3", "rwp", "the range is empty"),
    ("sigma=0.2:0.1:3", "rwp", "the range is reversed"),
    ("lam=0.5:1.5:3", "m-rwp", "lam=1.5 is not allowed"),
    ("sigma=-0.1,0.1", "rwp", "sigma=-0.1 is not allowed"),
    ("sigma=0:0.1:log:3", "rwp", "a log range must lie above 0"),
    ("sigma=-0.1:0.1:log:3", "rwp", "a log range must lie above 0"),
])
def test_a_bad_space_is_one_line(tmp_path, capsys, space, method, needle):
    one_line_error(capsys, [*TINY[:-2], "--methods", method, "--space", space, "--out", str(tmp_path)], needle)
    assert not (tmp_path / "study.db").exists()


def test_a_study_name_reused_with_another_space_is_refused(tmp_path, capsys):
    argv = [*TINY, "--seeds", "1", "--out", str(tmp_path)]
    assert main(["sweep", *argv, "--space", "sigma=0.01,0.02"]) == 0
    one_line_error(capsys, [*argv, "--space", "sigma=0.01,0.03"], f"study '{tmp_path.name}' exists with another space")
    one_line_error(capsys, [*argv[:-2], "--methods", "m-rwp", "--space", "sigma=0.01,0.02", "--out", str(tmp_path)],
                   "exists with another methods")


def test_an_unreachable_storage_is_an_error_within_30_s(tmp_path, capsys):
    # A server that accepts connections and never answers: the client must give up on its own.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        one_line_error(capsys, [*TINY, "--space", "sigma=0.01,0.02", "--out", str(tmp_path), "--storage",
                                f"postgresql://nobody@127.0.0.1:{silent.getsockname()[1]}/db"], "storage")
        assert time.monotonic() - start < 30
