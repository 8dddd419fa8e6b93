"""Step time and peak extra memory of every flatmin method against a plain SGD step measured in the
same run. A benchmark, not a test: the numbers depend on the machine and its load.

    PYTHONPATH=src python benchmarks/bench_optimizers.py                       # both models, CPU
    PYTHONPATH=src python benchmarks/bench_optimizers.py --models mlp --steps 100
    PYTHONPATH=src python benchmarks/bench_optimizers.py --models resnet18 --warmup 1 --steps 5
    PYTHONPATH=src python benchmarks/bench_optimizers.py --device cuda --json out.json

Problems
    resnet18  CIFAR-style ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2,2,2,2], widths 64..512,
              BatchNorm), batch 128 of random 3x32x32 inputs and random labels. Taken from
              ``flatmin.models.create_model("resnet18", 10, (3, 32, 32))`` when that imports, else
              from the plain definition in this file.
    mlp       64 -> 256 -> 256 -> 10 MLP with BatchNorm1d on sklearn's 8x8 digits (real data, pixels
              / 16, shuffled once), batch 128, cycling through the data set.

Every method uses the base SGD(lr=0.01, momentum=0.9, weight_decay=5e-4) and its own defaults;
the mixed methods (m-rwp, m-arwp) take two consecutive batches per update, as in the papers' recipe,
so their step is two forward/backward passes; their ratio is reported per update, as is.

Timing
    All methods share one model. A run is ``--warmup`` + ``--steps`` rounds; in each round every
    method is timed once on a sample of ``--inner`` consecutive steps (a fresh wall-clock
    ``perf_counter`` pair around the sample, with a device sync on CUDA). The order of methods is
    rotated by one position every round, so no method always runs first or right after the same
    neighbour, and slow drift (CPU clock, other load on the machine) is spread over all of them.
    Warm-up rounds are discarded (they create momentum buffers, ARWP statistics, allocator pools).
    Reported: ``ms/step`` = median over timed rounds of the per-step time of the sample;
    ``xSGD`` = that median over SGD's median (the number the targets are checked on);
    ``paired`` = median over rounds of the ratio to the SGD sample of the same round (robust to
    drift between rounds); ``min`` = fastest sample over SGD's fastest (least disturbed by other
    load on a shared machine).

Memory (peak extra over SGD, for one step after warm-up)
    CPU, two independent trackers:
      * ``profiler``: ``torch.profiler`` with ``profile_memory=True``; the peak of the running sum
        of every allocation/free event the allocator reports during the step (op-internal
        temporaries included), measured from the state before the step.
      * ``dispatch``: a ``TorchDispatchMode`` that records each op output's storage as allocated
        and frees it when no tensor on it is alive any more (weak references); it also attributes
        every allocation to the user closures (forward/backward) or to the optimizer's own code,
        and reports ``own``: the peak of live bytes the optimizer allocated outside the closures.
        It cannot see memory made without a dispatched op (e.g. ``Generator.get_state()``, 5056
        bytes per CPU generator state) nor op-internal temporaries; the profiler sees both, so the
        PASS/MISS verdicts use the profiler on CPU.
    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step (plus the
    dispatch tracker's attribution).
    Both CPU trackers are checked first on cases computable by hand (``--no-validate`` skips this).
    Extra memory is reported in MiB and in units of the largest parameter tensor.

Targets (printed beside the numbers, PASS/MISS, strict comparison):
    time:   rwp, arwp <= 1.05 x SGD;   sam, asam, m-rwp, m-arwp <= 2.05 x SGD  (ResNet-18 only;
            shown for the MLP for information)
    memory: rwp, arwp, m-rwp, m-arwp peak extra over SGD <= 1 x the largest parameter tensor

``--profile-rwp`` (on by default) times the phases of an RWP and an ARWP step (noise scales, noise
draw + shift, forward/backward, restore, ARWP statistics, base update) next to the phases of an
SGD step, plus isolated costs of one full Gaussian draw, the filter norms and the finite check.
It reads private methods of the optimizers (``_perturbed``, ``_update``), so it is skipped with a
note if those change.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flatmin

ALL_METHODS = ["sgd", "rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam"]
TIME_TARGET = {"rwp": 1.05, "arwp": 1.05, "sam": 2.05, "asam": 2.05, "m-rwp": 2.05, "m-arwp": 2.05}
TIME_TARGET_MODELS = {"resnet18"}  # where the time targets are stated; elsewhere shown as info
MEM_TARGET = {"rwp": 1.0, "arwp": 1.0, "m-rwp": 1.0, "m-arwp": 1.0}  # x largest parameter tensor
BASE_HPARAMS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
DEFAULTS = {  # per model: warm-up rounds, timed rounds, steps per timed sample, phase-profile reps
    "resnet18": dict(warmup=1, steps=3, inner=1, profile_reps=2),
    "mlp": dict(warmup=5, steps=40, inner=10, profile_reps=50),
}
MiB = float(2**20)


# ----------------------------------------------------------------------------------------- models
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _CifarResNet18(nn.Module):
    """Fallback when ``flatmin.models`` is not importable: 3x3 stem, no max-pool, [2, 2, 2, 2]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(_BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _inline_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                         nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Linear(256, 10))


def build_model(name: str) -> Tuple[nn.Module, str]:
    try:
        from flatmin.models import create_model
        shape = (3, 32, 32) if name == "resnet18" else (64,)
        return create_model(name, 10, shape), "flatmin.models.create_model"
    except Exception as err:  # noqa: BLE001  (any failure: fall back to the plain definition)
        model = _CifarResNet18() if name == "resnet18" else _inline_mlp()
        return model, f"inline definition (flatmin.models unavailable: {type(err).__name__})"


def build_batches(name: str, batch: int, device: torch.device) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        return [(torch.randn(batch, 3, 32, 32, generator=g).to(device),
                 torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(2)]
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n = len(x) // batch
    if n < 2:
        raise SystemExit(f"batch {batch} is too large for the digits data set ({len(x)} samples)")
    return [(x[i * batch:(i + 1) * batch].to(device), y[i * batch:(i + 1) * batch].to(device)) for i in range(n)]


# ----------------------------------------------------------------------------------------- steps
class Closures:
    """Closures that count when the code runs inside them (for the memory attribution)."""

    depth = 0

    @classmethod
    def make(cls, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            cls.depth += 1
            try:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss.detach()
            finally:
                cls.depth -= 1
        return closure


def make_stepper(method: str, model: nn.Module, batches: List[Tuple[Tensor, Tensor]]) -> Tuple[Callable[[], None], torch.optim.Optimizer]:
    """``step()`` runs one update of ``method`` on the next batch(es) of a cyclic stream."""
    position = [0]

    def next_closure() -> Callable[[], Tensor]:
        x, y = batches[position[0] % len(batches)]
        position[0] += 1
        return Closures.make(model, x, y)

    if method == "sgd":
        opt = flatmin.create("sgd", model, **BASE_HPARAMS)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            next_closure()()
            opt.step()
        return step, opt
    opt = flatmin.create(method, model, seed=0, **BASE_HPARAMS)
    if getattr(opt, "batches_per_step", 1) == 2:
        return (lambda: opt.step(next_closure(), next_closure())), opt
    return (lambda: opt.step(next_closure())), opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- memory
class LiveBytes(TorchDispatchMode):
    """Peak of live tensor storage created while active, op by op (see the module docstring).

    A storage counts from the op that first returns a tensor on it (and not on any input's
    storage: in-place ops and views allocate nothing) until no tensor recorded on it is alive.
    Allocations made while a ``Closures`` closure runs are attributed to the closure, all others
    to the optimizer (``own``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, list] = {}  # storage data_ptr -> [nbytes, own?, [weakrefs]]
        self.current = 0
        self.current_own = 0
        self.peak = 0
        self.peak_own = 0

    def _purge(self) -> None:
        dead = [ptr for ptr, (_, _, refs) in self.live.items() if all(r() is None for r in refs)]
        for ptr in dead:
            nbytes, own, _ = self.live.pop(ptr)
            self.current -= nbytes
            if own:
                self.current_own -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live:
                self.live[ptr][2].append(weakref.ref(t))
            elif ptr not in inputs and storage.nbytes() > 0:
                own = Closures.depth == 0
                self.live[ptr] = [storage.nbytes(), own, [weakref.ref(t)]]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                if own:
                    self.current_own += storage.nbytes()
                    self.peak_own = max(self.peak_own, self.current_own)
        return out


def dispatch_peak(fn: Callable[[], None]) -> Tuple[int, int]:
    """(peak live bytes, peak live bytes allocated outside the closures) while ``fn()`` runs."""
    with LiveBytes() as tracker:
        fn()
    return tracker.peak, tracker.peak_own


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's own log lines on file descriptor 2 (kineto writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiler_peak(fn: Callable[[], None]) -> int:
    """Peak of the running sum of the CPU allocator's memory events (bytes) during one ``fn()``.

    ``fn`` runs twice under the profiler and only the second run is measured: the allocator reports
    a free only for memory it saw allocated while profiling was on, so without the first run the
    frees of the previous step's tensors (the old ``.grad``) would be missing and the peak too high.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("bench::measured"):
            fn()
    events = prof.profiler.kineto_results.events()
    marks = [e for e in events if e.name() == "bench::measured"]
    if len(marks) != 1:
        raise RuntimeError(f"profiler: expected one measured range, found {len(marks)}")
    start, end = marks[0].start_ns(), marks[0].start_ns() + marks[0].duration_ns()
    memory = sorted((e for e in events if e.name() == "[memory]" and start <= e.start_ns() <= end
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    running = peak = 0
    for e in memory:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def cuda_peak(fn: Callable[[], None], device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def validate_trackers(device: torch.device) -> List[dict]:
    """Cases with a peak known by hand; each tracker must hit it (to the byte where exact)."""
    checks = []

    def record(name: str, expected: float, got: Dict[str, float], tol: float) -> None:
        for tracker, value in got.items():
            checks.append(dict(case=name, tracker=tracker, expected=expected, got=value,
                               ok=abs(value - expected) <= tol))

    # 1. 1 MiB, then 2 MiB, free the first, then 0.5 MiB: peak 3 MiB.
    def allocs() -> None:
        a = torch.ones(1 << 18)
        b = torch.ones(1 << 19)
        del a
        c = torch.ones(1 << 17)
        del b, c

    got = {"dispatch": dispatch_peak(allocs)[0] / MiB}
    if device.type == "cpu":
        got["profiler"] = profiler_peak(allocs) / MiB
    record("1 MiB, 2 MiB, free 1, 0.5 MiB -> peak 3 MiB", 3.0, got, 1e-9)

    # 2. An SGD step on the digits MLP, then the same step holding one extra tensor of the size of
    #    the largest parameter across the whole step, once allocated inside the closure and once
    #    outside it: the peak grows by exactly 1.00 x largest; 'own' sees only the outside one.
    torch.manual_seed(0)
    model, _ = build_model("mlp")
    model = model.to(device)
    batches = build_batches("mlp", 128, device)
    opt = torch.optim.SGD(model.parameters(), **BASE_HPARAMS)
    largest = max(p.numel() for p in model.parameters())
    x, y = batches[0]

    def sgd_step(extra: str = "") -> None:
        opt.zero_grad(set_to_none=True)
        held = torch.zeros(largest, device=device) if extra == "outside" else None
        closure = Closures.make(model, x, y)
        if extra == "inside":
            def closure(inner=closure):  # noqa: E306
                Closures.depth += 1
                try:
                    keep = torch.zeros(largest, device=device)
                    inner()
                    return keep
                finally:
                    Closures.depth -= 1
            kept = closure()
        else:
            closure()
        opt.step()
        del held
        if extra == "inside":
            del kept

    for _ in range(2):
        sgd_step()
    unit = largest * 4
    for extra in ("inside", "outside"):
        base_d, base_own = dispatch_peak(sgd_step)
        with_d, with_own = dispatch_peak(lambda: sgd_step(extra))
        got = {"dispatch": (with_d - base_d) / unit}
        if device.type == "cpu":
            got["profiler"] = (profiler_peak(lambda: sgd_step(extra)) - profiler_peak(sgd_step)) / unit
        record(f"SGD step + 1 tensor of the largest size held {extra} the closure -> +1.00 x largest",
               1.0, got, 1e-6)
        record(f"  ... 'own' (optimizer-side) peak with the tensor {extra} the closure",
               1.0 if extra == "outside" else 0.0, {"dispatch own": (with_own - base_own) / unit}, 1e-6)
    return checks


# --------------------------------------------------------------------------------------- measure
def measure(name: str, methods: List[str], args: argparse.Namespace, device: torch.device) -> dict:
    d = DEFAULTS[name]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    rounds = d["steps"] if args.steps is None else args.steps
    inner = d["inner"] if args.inner is None else args.inner
    torch.manual_seed(0)
    model, source = build_model(name)
    model = model.to(device).train()
    batches = build_batches(name, args.batch_size, device)
    steppers = {m: make_stepper(m, model, batches)[0] for m in methods}
    params = list(model.parameters())
    largest = max(p.numel() * p.element_size() for p in params)
    info = dict(model=name, model_source=source, batch_size=args.batch_size, params=sum(p.numel() for p in params),
                param_mib=sum(p.numel() * p.element_size() for p in params) / MiB, largest_param_mib=largest / MiB,
                warmup_rounds=warmup, timed_rounds=rounds, steps_per_sample=inner,
                order="rotated by one method per round", loadavg_before=_loadavg())
    print(f"\n== {name}: {source}; {info['params']:,} parameters ({info['param_mib']:.1f} MiB), largest "
          f"tensor {largest / MiB:.2f} MiB; batch {args.batch_size}; {warmup} warm-up + {rounds} timed rounds "
          f"x {inner} step(s) per method, order rotated each round", flush=True)

    times: Dict[str, List[float]] = {m: [] for m in methods}
    paired: Dict[str, List[float]] = {m: [] for m in methods}
    start_all = time.perf_counter()
    for r in range(warmup + rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        sample = {}
        for m in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                steppers[m]()
            sync(device)
            sample[m] = (time.perf_counter() - t0) / inner
        if r >= warmup:
            for m in methods:
                times[m].append(sample[m])
                if "sgd" in sample:
                    paired[m].append(sample[m] / sample["sgd"])
        if args.verbose or name == "resnet18":
            tag = "warm-up" if r < warmup else "timed"
            print(f"   round {r + 1}/{warmup + rounds} ({tag}): " +
                  " ".join(f"{m}={1e3 * sample[m]:.0f}ms" for m in order), flush=True)
    info["timing_wall_s"] = time.perf_counter() - start_all

    peaks: Dict[str, dict] = {}
    t0 = time.perf_counter()
    for m in methods:
        entry = {}
        if device.type == "cpu":
            entry["profiler"] = profiler_peak(steppers[m])
        else:
            entry["cuda"] = cuda_peak(steppers[m], device)
        entry["dispatch"], entry["own"] = dispatch_peak(steppers[m])
        peaks[m] = entry
    info["memory_wall_s"] = time.perf_counter() - t0
    main_tracker = "profiler" if device.type == "cpu" else "cuda"

    rows = {}
    sgd_med = statistics.median(times["sgd"]) if "sgd" in times else float("nan")
    for m in methods:
        med = statistics.median(times[m])
        row = dict(ms_per_step=1e3 * med, ratio=med / sgd_med, paired_ratio=statistics.median(paired[m]) if paired[m] else float("nan"),
                   min_ratio=min(times[m]) / min(times["sgd"]) if "sgd" in times else float("nan"),
                   ms_min=1e3 * min(times[m]), ms_max=1e3 * max(times[m]), samples_ms=[1e3 * t for t in times[m]])
        if "sgd" in peaks:
            for tracker in (main_tracker, "dispatch"):
                extra = peaks[m][tracker] - peaks["sgd"][tracker]
                row[f"extra_{tracker}_mib"] = extra / MiB
                row[f"extra_{tracker}_x_largest"] = extra / largest
            row["own_mib"] = peaks[m]["own"] / MiB
            row["own_x_largest"] = peaks[m]["own"] / largest
        row["peak_bytes"] = peaks[m]
        target = TIME_TARGET.get(m)
        if target is not None:
            row["time_target"] = target
            row["time_pass"] = row["ratio"] <= target
            row["time_target_applies"] = name in TIME_TARGET_MODELS
        if m in MEM_TARGET and "sgd" in peaks:
            row["mem_target_x_largest"] = MEM_TARGET[m]
            row["mem_pass"] = row[f"extra_{main_tracker}_x_largest"] <= MEM_TARGET[m]
            row["mem_pass_dispatch"] = row["extra_dispatch_x_largest"] <= MEM_TARGET[m]
        rows[m] = row
    info["loadavg_after"] = _loadavg()
    result = dict(info=info, main_memory_tracker=main_tracker, methods=rows)
    print_table(result)
    if args.profile_rwp and device.type in ("cpu", "cuda"):
        reps = d["profile_reps"] if args.profile_reps is None else args.profile_reps
        result["phases"] = profile_phases(model, batches, [m for m in ("rwp", "arwp") if m in methods], reps, device)
    return result


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(result: dict) -> None:
    info, rows, tracker = result["info"], result["methods"], result["main_memory_tracker"]
    name = info["model"]
    head = (f"{'method':<7} {'ms/step':>9} {'min..max ms':>15} {'xSGD':>6} {'paired':>6} {'min':>6} {'time target':>14} | "
            f"{'extra MiB':>9} {'xlargest':>8} {'dispatch':>8} {'own':>6} {'mem target':>12}")
    print(f"\n{name}: time = median over timed rounds; memory = peak extra over SGD for one step "
          f"({tracker} tracker; 'dispatch' = same in the dispatch tracker, x largest; 'own' = optimizer-side "
          f"allocations outside the closures, x largest)")
    print(head)
    print("-" * len(head))
    for m, row in rows.items():
        if "time_target" in row:
            label = f"<={row['time_target']:.2f} {_mark(row['time_pass'])}"
            if not row["time_target_applies"]:
                label = f"({label.lower()})"
        else:
            label = ""
        mem = ""
        if "mem_target_x_largest" in row:
            mem = f"<={row['mem_target_x_largest']:.0f}x {_mark(row['mem_pass'])}"
        extra_mib = row.get(f"extra_{tracker}_mib", float("nan"))
        extra_x = row.get(f"extra_{tracker}_x_largest", float("nan"))
        print(f"{m:<7} {row['ms_per_step']:9.1f} {row['ms_min']:7.1f}..{row['ms_max']:<7.1f} {row['ratio']:6.3f} "
              f"{row['paired_ratio']:6.3f} {row['min_ratio']:6.3f} {label:>14} | {extra_mib:9.2f} {extra_x:8.3f} "
              f"{row.get('extra_dispatch_x_largest', float('nan')):8.3f} {row.get('own_x_largest', float('nan')):6.3f} "
              f"{mem:>12}")
    print(f"(largest parameter tensor {info['largest_param_mib']:.2f} MiB; all parameters {info['param_mib']:.2f} MiB; "
          f"timing took {info['timing_wall_s']:.0f} s, memory {info['memory_wall_s']:.0f} s; load average "
          f"{info['loadavg_before']} -> {info['loadavg_after']})")
    busy = [load[0] for load in (info["loadavg_before"], info["loadavg_after"]) if load]  # 1-minute averages
    if busy and max(busy) > 1.25 * (os.cpu_count() or 1):
        print(f"WARNING: the machine was busy (1-minute load average {busy} on {os.cpu_count()} CPUs): other "
              f"processes competed for the cores, so the times and ratios above are unreliable; rerun when idle")
    if name not in TIME_TARGET_MODELS:
        print("(time targets are stated for the ResNet-18; shown in parentheses here for information only)")


# ---------------------------------------------------------------------------------------- phases
def profile_phases(model: nn.Module, batches: list, methods: List[str], reps: int, device: torch.device) -> dict:
    """Median wall time of each phase of RWP/ARWP and SGD steps, plus isolated micro-costs."""
    out: dict = {}
    try:
        for method in ["sgd"] + methods:
            opt = flatmin.create(method, model, seed=0, **BASE_HPARAMS) if method != "sgd" else \
                flatmin.create("sgd", model, **BASE_HPARAMS)
            phases: Dict[str, List[float]] = {}
            for r in range(reps + 1):  # the first rep warms up the state
                x, y = batches[r % len(batches)]
                closure = Closures.make(model, x, y)
                marks = [("start", _now(device))]
                if method == "sgd":
                    opt.zero_grad(set_to_none=True)
                    marks.append(("zero_grad", _now(device)))
                    closure()
                    marks.append(("forward+backward", _now(device)))
                    opt.step()
                    marks.append(("base step", _now(device)))
                else:  # the body of RWP.step, split (flatmin/optim/rwp.py)
                    opt.zero_grad(set_to_none=True)
                    marks.append(("zero_grad", _now(device)))
                    with torch.no_grad():
                        ctx = opt._perturbed()
                    marks.append(("noise scales s(W)*sigma", _now(device)))
                    ctx.__enter__()
                    marks.append(("draw noise + shift w", _now(device)))
                    try:
                        with torch.enable_grad():
                            closure()
                        marks.append(("forward+backward", _now(device)))
                    finally:
                        ctx.__exit__(None, None, None)
                    marks.append(("restore w (sub kept + redraw)", _now(device)))
                    pending = opt._perturbed_stats()
                    marks.append(("ARWP stats (filter sums of g^2)", _now(device)))
                    grads = opt._grads()
                    opt._all_finite(grads)
                    marks.append(("finite check (norm of grads)", _now(device)))
                    opt._update(pending)  # repeats the finite check: subtract it below
                    marks.append(("_update (finite check + base step)", _now(device)))
                if r == 0:
                    continue
                for (_, t_prev), (label, t) in zip(marks, marks[1:]):
                    phases.setdefault(label, []).append(t - t_prev)
            med = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
            if method != "sgd":
                med["base step (= _update - finite check)"] = med["_update (finite check + base step)"] - \
                    med["finite check (norm of grads)"]
            out[method] = med
        out["isolated"] = isolated_costs(model, reps, device)
    except (AttributeError, TypeError) as err:
        print(f"\n(phase profile skipped: the optimizers' private API changed: {err})")
        return {"skipped": str(err)}
    print_phases(out)
    return out


def _now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def isolated_costs(model: nn.Module, reps: int, device: torch.device) -> Dict[str, float]:
    from flatmin.perturb import filter_norms

    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=params[0].device).manual_seed(0)
    grads = [torch.randn_like(p) for p in params]

    def draw_all() -> None:
        for p in params:
            torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def draw_scale_add_sub() -> None:
        with torch.no_grad():
            for p in params:
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                p.add_(z)
                p.sub_(z)

    def norms() -> None:
        with torch.no_grad():
            for p in params:
                filter_norms(p)

    def foreach_norm() -> None:
        torch._foreach_norm(grads)

    def copy_all() -> None:
        for p in params:
            p.detach().clone()

    costs = {}
    n = max(3, min(reps, 20))
    for label, fn in [("one Gaussian draw of all weights (randn only)", draw_all),
                      ("randn + add_ + sub_ of all weights", draw_scale_add_sub),
                      ("filter norms s(W) of all weights", norms),
                      ("_foreach_norm of all grads (finite check)", foreach_norm),
                      ("clone of all weights (for scale)", copy_all)]:
        fn()
        samples = []
        for _ in range(n):
            t0 = _now(device)
            fn()
            samples.append(_now(device) - t0)
        costs[label] = 1e3 * statistics.median(samples)
    return costs


def print_phases(out: dict) -> None:
    print("\nphases of one step, median ms (RWP.step body split by hand; the finite check runs twice in the "
          "split, once alone and once inside _update)")
    sgd = out.get("sgd", {})
    labels = []
    for method in out:
        if method == "isolated":
            continue
        for k in out[method]:
            if k not in labels:
                labels.append(k)
    methods = [m for m in out if m != "isolated"]
    print(f"{'phase':<40}" + "".join(f"{m:>10}" for m in methods))
    for k in labels:
        print(f"{k:<40}" + "".join(f"{out[m][k]:10.2f}" if k in out[m] else f"{'':>10}" for m in methods))
    for m in methods:
        if m == "sgd":
            continue
        phases = out[m]
        overhead = sum(v for k, v in phases.items() if k not in ("forward+backward", "zero_grad", "_update (finite check + base step)", "finite check (norm of grads)"))
        overhead += phases.get("finite check (norm of grads)", 0.0)
        sgd_total = sum(sgd.values())
        print(f"{m}: work beyond forward+backward and zero_grad = {overhead:.2f} ms "
              f"(SGD's base step {sgd.get('base step', float('nan')):.2f} ms; SGD step total {sgd_total:.2f} ms, "
              f"so the overhead is {overhead - sgd.get('base step', 0.0):.2f} ms = "
              f"{100 * (overhead - sgd.get('base step', 0.0)) / sgd_total:.1f}% of an SGD step)")
    print("isolated costs, median ms:")
    for k, v in out["isolated"].items():
        print(f"  {k:<48} {v:9.2f}")


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mlp", help="comma-separated: resnet18, mlp")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="comma-separated subset of " + ",".join(ALL_METHODS) + " (sgd is always added)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds per model (default: resnet18 3, mlp 40)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: resnet18 1, mlp 5)")
    parser.add_argument("--inner", type=int, default=None,
                        help="steps per timed sample (default: resnet18 1, mlp 10)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the hand-computable checks of the memory trackers")
    parser.add_argument("--no-profile-rwp", dest="profile_rwp", action="store_false",
                        help="skip the phase breakdown of the RWP/ARWP step")
    parser.add_argument("--profile-reps", type=int, default=None,
                        help="steps per method in the phase breakdown (default: resnet18 2, mlp 50)")
    parser.add_argument("--verbose", action="store_true", help="print every round's samples for every model")
    args = parser.parse_args()

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in DEFAULTS:
            parser.error(f"unknown model {m!r}: choose from {', '.join(DEFAULTS)}")
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            parser.error(f"unknown method {m!r}: choose from {', '.join(ALL_METHODS)}")
    methods = ["sgd"] + [m for m in methods if m != "sgd"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    meta = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), flatmin=getattr(flatmin, "__version__", "?"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), loadavg=_loadavg())
    print(f"torch {meta['torch']} | python {meta['python']} | device {meta['device']} ({meta['device_name']}) | "
          f"torch threads {meta['threads']} of {meta['cpu_count']} CPUs | load average {meta['loadavg']}")
    print(f"methods: {', '.join(methods)}; base SGD {BASE_HPARAMS}; method hyperparameters at their defaults")

    report: dict = dict(meta=meta, models={})
    if args.validate:
        checks = validate_trackers(device)
        report["tracker_validation"] = checks
        print("\nmemory tracker validation (hand-computable cases):")
        for c in checks:
            print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['case']:<86} {c['tracker']:>13}: "
                  f"expected {c['expected']:.4f}, got {c['got']:.4f}")
        if not all(c["ok"] for c in checks):
            print("  WARNING: a tracker failed its check; read its numbers below with care")

    for name in models:
        report["models"][name] = measure(name, methods, args, device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
