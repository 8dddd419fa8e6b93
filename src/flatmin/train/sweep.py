"""Search hyperparameters on a validation split with Optuna, on one process or many machines.

One Optuna study per method (``STUDY/METHOD``) holds the trials; a trial is one point of the search
space, trained once per seed and scored by the mean validation accuracy over the seeds (with its
95 % t-interval). The test accuracy is recorded and never used to choose. A study named ``STUDY``
holds the sweep's description (data, model, methods, space, fixed settings), so that a rerun with
other settings is refused instead of mixed in.

Exactly once, on any number of workers: the process that creates the study enqueues every grid
point as a waiting trial, and a worker takes a waiting trial through ``study.ask()``, which the
storage hands to one worker only (Optuna's own ``GridSampler`` may run a point twice when workers
ask at once). Random and TPE sweeps draw fresh trials, and the first ``--trials`` of them by number
are the sweep's. A trial a worker asks for when the plan is already taken is marked failed with the
user attribute ``surplus`` before any training, and left out of every report. A worker killed
mid-trial stops its heartbeat; the trial goes stale, another worker (or the rerun) fails it and
Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shlex
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..analysis.plots import load_matplotlib
from .config import METHOD_DEFAULTS, METHOD_HPARAMS, ConfigError, TrainConfig, output_folder, own_hparams
from .space import Dimension, check_space, describe, grid_points, method_space, parse_space
from .stats import paired_t_interval

SAMPLERS = ("grid", "random", "tpe")
# Settings that say where and how a run executes, not what it computes: free to differ between
# the machines (and reruns) of one study.
RUNTIME_FIELDS = ("out", "progress", "threads", "device", "data_dir", "num_workers", "eval_batch_size", "log")


def rule(tie: float) -> str:
    """The choice in words (``choose`` implements it)."""
    ties = (f"trials within {tie:g} of the best mean count as tied, and the tie goes to the earliest of them "
            "(a grid's first point: list values from the weakest perturbation up)" if tie > 0 else
            "on an exact tie, the earlier trial")
    return (f"the completed trial with the highest mean validation accuracy over its seeds; {ties}. Test accuracy "
            "is never looked at; pruned and failed trials are not candidates.")
STORAGE_TIMEOUT_S = 20  # a storage that does not answer by then is an error, never a hang
MAX_RETRY = 3


class SweepError(ConfigError):
    """A sweep that cannot start or continue: its message names the study, storage or value."""


class Surplus(Exception):
    """A trial asked for after the plan was taken by other workers: failed before any training."""


@dataclass
class Plan:
    """Everything a worker needs, picklable: the sweep's settings and its storage."""

    base: TrainConfig
    methods: List[str]
    spaces: Dict[str, List[Dimension]]
    sampler: str
    trials: int  # fresh trials per method (random, TPE); 0 for a grid, whose points are enqueued
    seeds: int
    prune: bool
    study: str
    storage: str
    heartbeat: int
    out: str
    tie: float = 0.0

    def spec(self) -> Dict[str, Any]:
        """What the study's trials mean: refused in one line when a rerun differs."""
        fixed = {k: v for k, v in self.base.to_dict().items() if k not in RUNTIME_FIELDS + ("method",)}
        return {"methods": self.methods, "space": describe(self.spaces), "sampler": self.sampler, "tie": self.tie,
                "seeds": self.seeds, "settings": fixed}


# ---------------------------------------------------------------------------------------------- storage
def _quiet_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("flatmin sweep needs optuna, which is not installed: pip install 'flatmin[sweep]'") from None

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# What a database says to the later of two processes making a new storage's tables at once (SQLite,
# PostgreSQL): a table that already exists, or the schema version row already written.
CREATION_RACES = ("already exists", "UNIQUE constraint failed", "duplicate key value")


def storage_url(storage: Optional[str], out: Path) -> str:
    """``storage`` as given, or the default: an SQLite file in the sweep's folder."""
    return storage if storage else f"sqlite:///{(out / 'study.db').resolve()}"


def with_driver(url: str) -> str:
    """A PostgreSQL URL without a driver gets psycopg2 (the sweep extra's) where psycopg 3,
    SQLAlchemy's default driver, is not installed."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(url: str, heartbeat: int) -> Any:
    """Optuna's ``RDBStorage`` with a heartbeat (stale trials are failed and retried); a storage
    that cannot be reached is a ``SweepError`` within ``STORAGE_TIMEOUT_S`` seconds."""
    optuna = _quiet_optuna()
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    # The driver's own connect timeout, so that a silent server does not hold the engine forever.
    connect = {"sqlite": {"timeout": 60}, "postgresql": {"connect_timeout": STORAGE_TIMEOUT_S // 2},
               "mysql": {"connect_timeout": STORAGE_TIMEOUT_S // 2}}.get(scheme)
    if connect is None or "://" not in url:
        raise SweepError(f"storage={url!r} is not a database URL Optuna takes: use sqlite:///FILE, "
                         "postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    result: Dict[str, Any] = {}

    def connect_now() -> None:
        for attempt in range(5):
            try:
                result["storage"] = optuna.storages.RDBStorage(
                    with_driver(url), engine_kwargs={"connect_args": connect}, heartbeat_interval=heartbeat,
                    grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY))
                return
            except Exception as err:  # the driver's errors differ by database; each is reported in one line
                result["error"] = err
                # Two workers making the tables of a new database at once: the later one finds them
                # made (or their version row written) by the other, and its next attempt opens them.
                if not any(race in str(err) for race in CREATION_RACES):
                    return
                time.sleep(0.2 * (attempt + 1))

    # In a thread: a name lookup or a driver without a connect timeout cannot hang the sweep.
    thread = threading.Thread(target=connect_now, daemon=True)
    thread.start()
    thread.join(STORAGE_TIMEOUT_S)
    if thread.is_alive():
        raise SweepError(f"storage {_safe(url)} did not answer within {STORAGE_TIMEOUT_S} s")
    if "storage" in result and scheme == "sqlite":
        _fast_sqlite(result["storage"])
    if "storage" not in result:
        err = result["error"]
        if isinstance(err, ImportError):
            raise SweepError(f"cannot open storage {_safe(url)}: its database driver is not installed "
                             f"({err.__cause__ or err}); for PostgreSQL: pip install 'flatmin[sweep]'")
        first = (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0]
        raise SweepError(f"cannot open storage {_safe(url)}: {first}")
    return result["storage"]


def _fast_sqlite(storage: Any) -> None:
    """Write-ahead logging, synced at checkpoints: a commit costs no fsync of its own. Safe for the
    processes of one machine (SQLite's locks), as the default storage is meant for; a crash of the
    machine may lose the last commits, never corrupt the file."""
    import sqlalchemy

    def pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened before the listener reconnect with it


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        tail = f"{user}:***@{tail.split('@', 1)[1]}"
    return head + sep + tail


def _sampler(plan: Plan, method: str) -> Any:
    optuna = _quiet_optuna()
    dims = plan.spaces[method]
    if plan.sampler == "grid" and dims:
        return optuna.samplers.GridSampler({d.name: d.grid() for d in dims}, seed=plan.base.seed)
    if plan.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=None, multivariate=True)
    return optuna.samplers.RandomSampler()


def _pruner(plan: Plan) -> Any:
    optuna = _quiet_optuna()
    if not plan.prune:
        return optuna.pruners.NopPruner()
    # Against the median of earlier trials at the same epoch, once a few trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)


def load_studies(plan: Plan, storage: Any) -> Dict[str, Any]:
    optuna = _quiet_optuna()
    return {m: optuna.load_study(study_name=f"{plan.study}/{m}", storage=storage, sampler=_sampler(plan, m),
                                 pruner=_pruner(plan)) for m in plan.methods}


def prepare_study(plan: Plan, storage: Any, wait_s: float = 60.0) -> bool:
    """Create the sweep's studies, or check that the existing ones were made for this sweep.

    Creating the study ``plan.study`` is atomic in every storage: the one process that succeeds
    writes the description and enqueues the grid, then marks the study ready; every other process
    waits for that mark. Returns whether this process created it.
    """
    optuna = _quiet_optuna()
    spec = json.loads(json.dumps(plan.spec()))  # as the storage gives it back (tuples become lists)
    try:
        registry = optuna.create_study(study_name=plan.study, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        registry = optuna.load_study(study_name=plan.study, storage=storage)
        deadline = time.monotonic() + wait_s
        while "ready" not in registry.user_attrs:
            if "spec" not in registry.user_attrs and time.monotonic() > deadline:
                raise SweepError(f"study {plan.study!r} exists in the storage but is not a flatmin sweep (or the "
                                 "process creating it died): use another --study")
            if time.monotonic() > deadline:
                raise SweepError(f"study {plan.study!r} was left half-made by the process that created it: delete "
                                 f"it (optuna delete-study --study-name {plan.study}) or use another --study")
            time.sleep(0.2)
        _check_spec(plan.study, registry.user_attrs["spec"], spec)
        return False
    registry.set_user_attr("spec", spec)
    for method in plan.methods:
        study = optuna.create_study(study_name=f"{plan.study}/{method}", storage=storage, direction="maximize",
                                    sampler=_sampler(plan, method))
        if plan.sampler == "grid":
            for point in grid_points(plan.spaces[method]):
                study.enqueue_trial(point)
    registry.set_user_attr("ready", True)
    return True


def _check_spec(name: str, saved: Dict[str, Any], spec: Dict[str, Any]) -> None:
    for key in ("methods", "space", "sampler", "seeds", "tie"):
        if saved.get(key) != spec[key]:
            raise SweepError(f"study {name!r} exists with another {key}: {_short(saved.get(key))} (this sweep: "
                             f"{_short(spec[key])}); use another --study, or the study's own settings")
    for key, value in spec["settings"].items():
        if saved["settings"].get(key) != value:
            raise SweepError(f"study {name!r} exists with another {key}: {saved['settings'].get(key)!r} (this sweep: "
                             f"{value!r}); use another --study, or the study's own settings")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------- workers
def _is_fresh(trial: Any) -> bool:
    """A trial the sampler drew: neither an enqueued grid point nor a retry of a stale trial."""
    return "fixed_params" not in trial.system_attrs and "failed_trial" not in trial.system_attrs


def _is_surplus(trial: Any) -> bool:
    return bool(trial.user_attrs.get("surplus"))


def _suggest(trial: Any, dim: Dimension, grid: bool) -> Any:
    if grid or not dim.is_range:
        return trial.suggest_categorical(dim.name, dim.grid())
    if dim.integer:
        return trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)


def run_trial(plan: Plan, method: str, trial: Any, threads: int) -> float:
    """Train the trial's point once per seed; its value is the mean validation accuracy."""
    import optuna

    from .loop import train

    fresh = [t.number for t in trial.study.get_trials(deepcopy=False) if _is_fresh(t)]
    if trial.number in fresh and fresh.index(trial.number) >= plan.trials:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number}: the plan was taken by other workers")
    params = {d.name: _suggest(trial, d, plan.sampler == "grid") for d in plan.spaces[method]}
    runs: List[Dict[str, Any]] = []
    step = 0
    for seed in range(plan.base.seed, plan.base.seed + plan.seeds):
        cfg = dataclasses.replace(plan.base, method=method, seed=seed, progress="none", threads=threads,
                                  out=str(Path(plan.out) / method / f"trial{trial.number}" / f"seed{seed}"), **params)
        last: Dict[str, Any] = {}

        def report(row: Dict[str, Any]) -> None:
            nonlocal step
            last.update(row)
            if not plan.prune:  # a write to the storage per epoch only where a pruner reads it
                return
            trial.report(row["val_acc"], step)
            step += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {row['epoch']}: validation accuracy {row['val_acc']:.4f}")

        start = time.perf_counter()
        try:
            summary = train(cfg, on_epoch=report)
        except optuna.TrialPruned:
            runs.append({"seed": seed, "state": "pruned", "val_acc": last.get("val_acc"),
                         "test_acc": last.get("test_acc"), "epochs_done": last.get("epoch"),
                         "run_time_s": time.perf_counter() - start, "train_time_s": last.get("train_time_s")})
            trial.set_user_attr("runs", runs)
            raise
        runs.append({"seed": seed, "state": "complete", **{k: summary.get(k) for k in (
            "val_acc", "test_acc", "train_acc", "train_loss", "val_loss", "gap", "epochs_done", "updates",
            "grad_evals", "train_time_s")}, "val_gap": summary["train_acc"] - summary["val_acc"],
            "run_time_s": time.perf_counter() - start, "hparams": summary["hparams"], "threads": threads})
        trial.set_user_attr("runs", runs)  # after every seed: a killed trial keeps what it finished
    return statistics.fmean(r["val_acc"] for r in runs)


def _interval(runs: List[Dict[str, Any]]) -> Optional[float]:
    """Half-width of the 95 % t-interval of the mean validation accuracy over a trial's seeds."""
    accs = [r["val_acc"] for r in runs if r.get("state") == "complete" and r.get("val_acc") is not None]
    return paired_t_interval(accs, 0.95)[1] if accs else None


def _next(plan: Plan, study: Any) -> str:
    """What a worker does next in this study: ``run`` a trial, ``wait`` for running ones (they may
    go stale and come back as retries), or nothing left: ``done``."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    fresh = sum(_is_fresh(t) for t in trials)
    if any(t.state == TrialState.WAITING for t in trials) or fresh < plan.trials:
        return "run"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def work(plan: Plan, threads: int, messages: Any, worker: int = 0, storage: Any = None,
         wake: Optional[threading.Event] = None) -> None:
    """One worker: take trials from the studies, method by method in turn, until none is left.
    ``messages``: a queue (a worker process) or a callable (the sweep's own process), given
    ``(kind, worker, text)`` for each finished trial, an error, and the end. ``storage``: the
    sweep's own (its study made), or the parent's in a forked worker; a spawned worker opens its
    own. ``wake``: set when another worker ends a trial, so that a worker waiting for the last ones
    looks at once."""
    import torch

    spawned = hasattr(messages, "put")
    send = messages.put if spawned else messages
    if spawned:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its workers on Ctrl-C
    optuna = _quiet_optuna()
    torch.set_num_threads(threads)
    current: Dict[str, Any] = {}
    wake = wake or threading.Event()  # none given: nobody sets it, and waiting on it is a sleep
    try:
        if storage is None:
            storage = open_storage(plan.storage, plan.heartbeat)
            prepare_study(plan, storage)  # made by whichever process comes first; the others wait for it
        studies = load_studies(plan, storage)
        pending = list(plan.methods)
        while pending:
            wake.clear()
            ran = False
            for method in list(pending):
                study = studies[method]
                state = _next(plan, study)
                if state == "done":
                    pending.remove(method)
                    continue
                if state == "wait":
                    continue
                ran = True

                def objective(trial: Any, method: str = method) -> float:
                    current["number"] = trial.number
                    return run_trial(plan, method, trial, threads)

                def finished(study: Any, frozen: Any, method: str = method) -> None:
                    if not _is_surplus(frozen):
                        send(("trial", worker, _trial_line(method, frozen)))

                try:
                    study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[finished],
                                   gc_after_trial=False)
                except KeyboardInterrupt:
                    # Optuna failed the interrupted trial; enqueue it again, as for a stale one.
                    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == current.get("number"))
                    if not _is_surplus(frozen):
                        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, frozen)
                    raise
            if pending and not ran:  # trials running elsewhere: look again when one ends (or one may go stale)
                wake.wait(0.5)
    except Exception as err:  # a worker process's error, reported by the sweep in one line
        if not spawned:
            raise
        send(("error", worker, f"{type(err).__name__}: {err}".splitlines()[0]))
        raise SystemExit(1)
    finally:
        send(("done", worker, ""))


def _trial_line(method: str, t: Any) -> str:
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) or "(defaults)"
    runs = t.user_attrs.get("runs", [])
    state = t.state.name.lower()
    if state == "complete":
        half = _interval(runs)
        score = f"val acc {t.value:.4f}" + (f" ± {half:.4f}" if half is not None else "")
    elif state == "pruned":
        score = f"pruned after {sum(r.get('epochs_done') or 0 for r in runs)} epochs"
    else:
        score = "failed: " + str(t.system_attrs.get("fail_reason", "")).strip().splitlines()[-1:][0] \
            if t.system_attrs.get("fail_reason") else "failed"
    spent = sum(r.get("run_time_s") or 0.0 for r in runs)
    return f"{method:>7} trial {t.number}: {params}  {score}  ({len(runs)} seed runs, {spent:.1f} s)"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- sweep
def make_plan(base: TrainConfig, methods: Sequence[str], space: Sequence[str], sampler: str = "grid",
              trials: Optional[int] = None, seeds: int = 2, prune: bool = False, study: Optional[str] = None,
              storage: Optional[str] = None, heartbeat: int = 10, tie: float = 0.0) -> Plan:
    """Check every setting of a sweep before anything runs; a ``ConfigError`` naming the bad one."""
    from .loop import Trainer

    _quiet_optuna()  # installed? (the sweep extra)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    for name, value in (("seeds", seeds), ("heartbeat", heartbeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
    if isinstance(tie, bool) or not isinstance(tie, (int, float)) or not 0 <= tie < 1:
        raise ConfigError(f"tie={tie!r} is not allowed: it must be a number in [0, 1) (of validation accuracy)")
    if sampler == "grid" and trials is not None:
        raise ConfigError(f"trials={trials} is not allowed with the grid sampler: a grid runs each of its points "
                          "once (use --sampler random or tpe for a number of trials)")
    if trials is None:
        trials = 20
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials={trials!r} is not allowed: it must be an integer >= 1")
    if study is not None and (not study or "/" in study):
        raise ConfigError(f"study={study!r} is not allowed: give a name without '/'")
    methods = list(methods)
    if not methods:
        raise ConfigError(f"--methods names no method: choose from {', '.join(METHOD_DEFAULTS)}")
    for method in methods:
        if method not in METHOD_DEFAULTS:
            raise ConfigError(f"unknown method {method!r} in --methods: choose from {', '.join(METHOD_DEFAULTS)}")
        if methods.count(method) > 1:
            raise ConfigError(f"--methods names {method!r} twice")
    if base.stop_after is not None:
        raise ConfigError(f"stop_after={base.stop_after} is not allowed in a sweep: every run trains to the end")
    configs = {}
    for method in methods:
        # The fixed settings, as compare applies them: a method hyperparameter to the methods having it.
        configs[method] = dataclasses.replace(base, method=method, **own_hparams(base, method)).validate()
    if base.data == "imagefolder":
        raise ConfigError("data='imagefolder' cannot be swept: its val/ folder is the test split and no validation "
                          "split is held out of its training set; a sweep never scores on the test set")
    if base.val_fraction <= 0:
        raise ConfigError(f"val_fraction={base.val_fraction!r} is not allowed in a sweep: every point is scored on "
                          "a validation split held out of the training set (give e.g. --val-fraction 0.2)")
    dims = parse_space(space)
    if not dims:
        raise ConfigError("--space names nothing to search: give NAME=VALUES (e.g. --space sigma=0.01,0.02,0.05) "
                          "or a YAML file")
    spaces = method_space(dims, methods)
    check_space(base, spaces, grid=sampler == "grid")
    out = output_folder(base.out, "out")
    # Every method's first point built once here (data, model, optimizer): an error that only
    # building shows (a data folder, a batch too large) is one line now, not a failed trial later.
    for method in methods:
        point = grid_points(spaces[method])[0] if sampler == "grid" else {
            d.name: d.grid()[0] if not d.is_range else d.low for d in spaces[method]}
        probe = dataclasses.replace(configs[method], progress="none", out=str(out / ".probe"), **point)
        _probe(Trainer, probe)
    return Plan(base=base, methods=methods, spaces=spaces, sampler=sampler,
                trials=0 if sampler == "grid" else trials, seeds=seeds, prune=prune,
                study=study or out.resolve().name, storage=storage_url(storage, out), heartbeat=heartbeat,
                out=str(out), tie=float(tie))


def _probe(trainer: Any, cfg: TrainConfig) -> None:
    import shutil

    try:
        trainer(cfg)
    finally:
        shutil.rmtree(cfg.out, ignore_errors=True)


def sweep(plan: Plan, jobs: int = 1, log: Any = print, progress: bool = True) -> Dict[str, Any]:
    """Run the sweep with ``jobs`` workers (this process and ``jobs - 1`` worker processes, every
    trial on ``plan.base.threads`` threads, 1 unless given) until every trial of its plan is
    finished, by these workers or any other on the same storage; then write the reports into
    ``plan.out``. Returns what ``sweep.json`` holds."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} is not allowed: it must be an integer >= 1")
    import queue

    import torch
    from tqdm import tqdm

    storage = open_storage(plan.storage, plan.heartbeat)
    # Every trial on --threads CPU threads (1 unless given), as compare runs: a run's numbers depend on
    # its thread count, so fixing it makes a point's score independent of --jobs and of the machine.
    threads = plan.base.threads or 1
    method = start_method(threads)
    context = multiprocessing.get_context(method)
    messages = context.Queue()
    fork = method == "fork"
    helpers = []
    try:
        if fork:
            # A forked worker starts with this process's imports (torch, Optuna, the data set's
            # readers: seconds that a spawned one pays again) and its storage, so the study is
            # made first and the worker begins its first trial at once.
            prepare_study(plan, storage)
            # No database connection may cross the fork: a child closing its copy of an SQLite
            # connection drops the file locks of its own (SQLite's warning), and two processes on one
            # PostgreSQL socket mix their replies. The pool reconnects on its next use, here and there.
            storage.engine.dispose()
            sys.stdout.flush()  # else a worker would write this process's buffered output again
            sys.stderr.flush()
        # Spawned workers start before the study is made: their imports overlap the making of it.
        helpers = [context.Process(target=work, args=(plan, threads, messages, i, storage if fork else None))
                   for i in range(1, jobs)]
        for w in helpers:
            w.start()
        if not fork:
            prepare_study(plan, storage)
        if helpers:
            # The reports' plotting library loads while the helpers train, not after the last trial.
            load_matplotlib()
    except BaseException:
        for w in helpers:
            w.kill()
            w.join()
        raise
    studies = load_studies(plan, storage)
    total = _planned(plan)
    bar = tqdm(total=total, initial=min(_finished(studies), total), desc="trials", unit="trial", dynamic_ncols=True,
               disable=not progress)
    errors: List[str] = []
    lock = threading.Lock()
    wake = threading.Event()

    def show(message: Tuple[str, int, str]) -> None:
        kind, worker, text = message
        wake.set()
        with lock:
            if kind == "trial" and progress:
                bar.n = min(_finished(studies), total)  # of every worker on the storage: a read of the study
                bar.refresh()
                bar.write(text)
            elif kind == "trial":
                log(text)
            elif kind == "error":
                errors.append(f"worker {worker}: {text}")

    stop = threading.Event()

    def monitor() -> None:
        while not (stop.is_set() and messages.empty()):
            try:
                show(messages.get(timeout=0.2))
            except queue.Empty:
                continue

    watcher = threading.Thread(target=monitor, daemon=True)
    own_threads = torch.get_num_threads()
    try:
        watcher.start()
        work(plan, threads, show, worker=0, storage=storage, wake=wake)
        # Every trial is finished when work() returns: the reports need not wait for the helpers to exit.
        summary = write_reports(plan, studies)
        for w in helpers:
            w.join()
    except KeyboardInterrupt:
        # The helpers' running trials stop where they are: their heartbeat ends, and the next run of
        # the same command retries them (this process's own trial is re-enqueued by work()).
        for w in helpers:
            if w.is_alive():
                w.kill()
        for w in helpers:
            w.join()
        raise
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        bar.close()
        torch.set_num_threads(own_threads)
    if errors:
        raise SweepError("; ".join(errors))
    return summary


def start_method(threads: int) -> str:
    """How the sweep starts its worker processes: ``fork`` on Linux, where a worker then shares this
    process's imports, unless CUDA is in use here (a forked child cannot use it) or the trials run on
    several threads (a child of a process that has run GNU OpenMP's thread pool can hang in its
    first parallel region); else ``spawn``."""
    import torch

    if sys.platform == "linux" and threads == 1 and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _planned(plan: Plan) -> int:
    if plan.sampler == "grid":
        return sum(len(grid_points(plan.spaces[m])) for m in plan.methods)
    return plan.trials * len(plan.methods)


def _finished(studies: Dict[str, Any]) -> int:
    """Trials that end a point: completed or pruned (failed ones come back as retries)."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               for s in studies.values() for t in s.get_trials(deepcopy=False) if not _is_surplus(t))


# ---------------------------------------------------------------------------------------------- reports
def trial_records(plan: Plan, studies: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One record per trial (surplus ones left out): its point, state, seed runs and score."""
    records = []
    for method in plan.methods:
        for t in studies[method].get_trials(deepcopy=False):
            if _is_surplus(t) or t.state.name in ("WAITING", "RUNNING"):
                continue
            runs = t.user_attrs.get("runs", [])
            accs = [r["val_acc"] for r in runs if r.get("state") == "complete" and r.get("val_acc") is not None]
            records.append({
                "method": method, "trial": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                "retry_of": t.system_attrs.get("failed_trial"), "runs": runs,
                "val_acc": t.value if t.state.name == "COMPLETE" else None,
                "val_acc_ci95": _interval(runs), "seeds_done": len(accs),
            })
    return records


def choose(records: List[Dict[str, Any]], methods: Sequence[str], tie: float = 0.0) -> Dict[str, Dict[str, Any]]:
    """Each method's chosen trial by ``rule(tie)``: among the completed trials whose mean validation
    accuracy is within ``tie`` of the best, the earliest (a retry ranks as the trial it repeats).
    Only the validation score enters."""
    chosen = {}
    for method in methods:
        done = [r for r in records if r["method"] == method and r["state"] == "complete"]
        if done:
            top = max(r["val_acc"] for r in done)
            order = (lambda r: (r["retry_of"] if r["retry_of"] is not None else r["trial"], r["trial"]))
            chosen[method] = min((r for r in done if r["val_acc"] >= top - tie), key=order)
    return chosen


def best_config(plan: Plan, record: Dict[str, Any]) -> Dict[str, Any]:
    """The run settings of a chosen trial's first seed: ``flatmin train --config`` repeats it."""
    first = record["runs"][0]
    cfg = dataclasses.replace(plan.base, method=record["method"], seed=plan.base.seed, progress="auto",
                              threads=first.get("threads"), out=str(Path(plan.out) / record["method"] / "best"),
                              **record["params"])
    own = set(METHOD_DEFAULTS[record["method"]])
    values = cfg.to_dict()
    # The method's hyperparameters as the trial ran them (recipe defaults included); others dropped.
    for name in METHOD_HPARAMS:
        values[name] = first["hparams"].get(name) if name in own else None
    return {k: v for k, v in values.items() if v is not None}


def write_reports(plan: Plan, studies: Dict[str, Any]) -> Dict[str, Any]:
    """``trials.csv``, ``sweep.md``, ``sweep.json``, ``METHOD/best.yaml`` and the plots."""
    import yaml

    from . import sweep_plots

    out = Path(plan.out)
    records = trial_records(plan, studies)
    chosen = choose(records, plan.methods, plan.tie)
    write_csv(records, plan, out / "trials.csv")
    for method, record in chosen.items():
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        header = (f"# flatmin sweep {plan.study}: {method} trial {record['trial']}, mean validation accuracy "
                  f"{record['val_acc']:.4f} over {record['seeds_done']} seeds\n# chosen by: {rule(plan.tie)}\n"
                  f"# This is its seed-{plan.base.seed} run: flatmin train --config {folder / 'best.yaml'}\n")
        (folder / "best.yaml").write_text(header + yaml.safe_dump(best_config(plan, record), sort_keys=False))
    plots = sweep_plots.plot_all(records, plan, studies, out)
    summary = {"study": plan.study, "storage": _safe(plan.storage), "spec": plan.spec(),
               "command": _command(), "rule": rule(plan.tie),
               "chosen": {m: {"trial": r["trial"], "params": r["params"], "val_acc": r["val_acc"],
                              "val_acc_ci95": r["val_acc_ci95"], "best_yaml": str(out / m / "best.yaml")}
                          for m, r in chosen.items()},
               "planned": _planned(plan), "finished": sum(r["state"] in ("complete", "pruned") for r in records),
               "plots": plots}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "sweep.md").write_text(markdown_report(plan, records, chosen, summary))
    return summary


def _command() -> str:
    return "flatmin " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith(
        ("flatmin", "__main__.py")) else ""


RUN_COLUMNS = ("val_acc", "test_acc", "train_acc", "train_loss", "val_loss", "gap", "val_gap", "epochs_done",
               "updates", "grad_evals", "train_time_s", "run_time_s")


def write_csv(records: List[Dict[str, Any]], plan: Plan, path: Path) -> None:
    """One row per trial and seed (a failed trial with no finished seed: one row without numbers)."""
    import csv

    params = list(dict.fromkeys([*METHOD_HPARAMS, *(d.name for dims in plan.spaces.values() for d in dims)]))
    fields = ["method", "trial", "state", "retry_of", "seed", *params, *RUN_COLUMNS]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in records:
            for run in r["runs"] or [{}]:
                hp = {**run.get("hparams", {}), **r["params"]}
                row = {"method": r["method"], "trial": r["trial"], "retry_of": r["retry_of"],
                       "state": run.get("state", r["state"]) if r["state"] == "complete" else r["state"],
                       "seed": run.get("seed"), **{p: hp.get(p) for p in params},
                       **{c: run.get(c) for c in RUN_COLUMNS}}
                writer.writerow(row)


def markdown_report(plan: Plan, records: List[Dict[str, Any]], chosen: Dict[str, Dict[str, Any]],
                    summary: Dict[str, Any]) -> str:
    base = plan.base
    lines = [f"# Sweep {plan.study}", "",
             f"{base.data}, {base.model}, budget {base.budget} ({base.epochs} epochs of SGD), {plan.seeds} seed"
             f"{'s' if plan.seeds != 1 else ''} per point from {base.seed}, scored on a validation split of "
             f"{base.val_fraction:g} of the training set. Sampler: {plan.sampler}"
             + (f", {plan.trials} trials per method" if plan.sampler != "grid" else "")
             + f"{', median pruning' if plan.prune else ''}. {summary['finished']} of {summary['planned']} "
             f"trials finished.", ""]
    if summary["command"]:
        lines += ["```", summary["command"], "```", ""]
    lines += [f"Rule: {rule(plan.tie)}", "", "## Chosen", "", "| method | trial | point | val acc (mean ± 95 %) |",
              "|---|---|---|---|"]
    for method in plan.methods:
        r = chosen.get(method)
        if r is None:
            lines.append(f"| {method} | – | no completed trial | – |")
        else:
            lines.append(f"| {method} | {r['trial']} | {_point(r['params'])} | {_score(r)} |")
    lines += ["", "## Trials", "", "| method | trial | point | state | val acc (mean ± 95 %) | test acc | train loss "
              "| gap | epochs | updates | time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        done = [run for run in r["runs"] if run.get("state") == "complete"]
        mean = (lambda key: statistics.fmean(run[key] for run in done) if done else None)
        cells = [r["method"], str(r["trial"]), _point(r["params"]), r["state"] + (
            f" (retry of {r['retry_of']})" if r["retry_of"] is not None else ""), _score(r),
            _num(mean("test_acc")), _num(mean("train_loss")), _num(mean("gap"), "+.4f"),
            str(done[0]["epochs_done"]) if done else "–", str(done[0]["updates"]) if done else "–",
            f"{sum(run.get('run_time_s') or 0 for run in r['runs']):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "test acc and the gap (train acc − test acc) are recorded, never used to choose.", ""]
    if summary["plots"]:
        lines += ["## Plots", ""] + [f"![{name}]({Path(p).name})" for name, p in summary["plots"].items()] + [""]
    return "\n".join(lines)


def _point(params: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "defaults"


def _score(r: Dict[str, Any]) -> str:
    if r["val_acc"] is None:
        return "–"
    half = r["val_acc_ci95"]
    return f"{100 * r['val_acc']:.2f}" + (f" ± {100 * half:.2f} %" if half is not None else " %")


def _num(value: Optional[float], fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def tuned_hparams(folder: str, methods: Sequence[str], base: TrainConfig) -> Tuple[Dict[str, Dict[str, Any]], str]:
    """Each method's chosen point from a finished sweep in ``folder`` (its ``sweep.json``), and a
    line saying what was taken; a ``ConfigError`` if the sweep was run on other data or model."""
    path = Path(folder) / "sweep.json"
    try:
        summary = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"tuned={folder!r}: no sweep found (no {path}); give the --out folder of flatmin "
                          "sweep") from None
    except ValueError:
        raise ConfigError(f"tuned={folder!r}: {path} is damaged (not JSON)") from None
    if not isinstance(summary, dict) or "chosen" not in summary or "spec" not in summary:
        raise ConfigError(f"tuned={folder!r}: {path} is not a flatmin sweep's summary")
    settings = summary["spec"]["settings"]
    for key in ("data", "model"):
        if settings.get(key) != getattr(base, key):
            raise ConfigError(f"tuned={folder!r} was tuned on {key} {settings.get(key)!r}, not {getattr(base, key)!r}: "
                              f"compare on the sweep's {key}")
    tuned = {m: dict(summary["chosen"][m]["params"]) for m in methods if m in summary["chosen"]}
    untuned = [m for m in methods if m not in tuned]
    text = "tuned by the sweep in " + folder + ": " + "; ".join(
        f"{m} {_point(p)}" for m, p in tuned.items()) + (f" (defaults: {', '.join(untuned)})" if untuned else "")
    return tuned, text
