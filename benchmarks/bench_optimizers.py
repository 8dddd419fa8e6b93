"""What every flatmin method costs per update against plain SGD, measured in one run:

    python benchmarks/bench_optimizers.py                          # mlp, resnet18, vit on the CPU
    python benchmarks/bench_optimizers.py --models mlp --rounds 80
    python benchmarks/bench_optimizers.py --device cuda --json bench.json

Models (batch 128, base SGD lr 0.01, momentum 0.9, weight decay 5e-4, every method at its
defaults; the mixed methods take two batches, two forward/backward passes, per update):
    mlp       64-256-256-10 with BatchNorm on the 8x8 digits: 86k weights in 10 tensors
    resnet18  the CIFAR ResNet-18 on random 3x32x32 inputs: 11.2M weights in 62 tensors
    vit       a 12-layer transformer encoder (width 64) over the digits' 8 rows as tokens:
              0.6M weights in 152 tensors, as many as a ViT-B or a ResNet-50

Reported per method and model:
    xSGD      time per update over SGD's: rounds time every method once each, in an order rotated
              every round; the ratio is the median over rounds of (method / SGD of the same round)
    own us    the optimizer's own time per update: the same step with a closure that only writes
              stored gradients, minus SGD's step with that closure (median over rounds)
    own ops   ops the optimizer dispatches per update outside the closures (SGD: its own step)
    kernels   (CUDA only) GPU kernels launched per update, closures included, from torch.profiler
    extra     peak tensor memory over a new optimizer's first three updates, over SGD's, in MiB and in
              units of the largest tensor: what the optimizer keeps between updates and what an update
              needs on top (flatmin.diagnostics.StepTracker on the CPU, max_memory_allocated on CUDA);
              the memory target is checked on what is left beside three numbers per filter (the
              scales, ARWP's F, and the index that spreads a 1-D tensor's norm over its elements:
              1.8 % of the ResNet-18's largest tensor)

Targets (PASS/MISS) are checked where the issue that set them states them: the digits MLP
(RWP 1.40, ARWP 1.45, SAM 2.10, m-RWP 2.40, m-ARWP 2.45 x SGD) and the ResNet-18 (RWP and ARWP
1.05, the two-gradient methods 2.05; extra memory of RWP/ARWP at most the largest tensor).
Times depend on the machine and its load: the run warns when the load average before it started
says other processes were using the cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatmin
from flatmin.diagnostics import StepTracker
from flatmin.models import create_model

METHODS = ["sgd", "rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam"]
BASE = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
TIME_TARGETS = {
    "mlp": {"rwp": 1.40, "arwp": 1.45, "sam": 2.10, "m-rwp": 2.40, "m-arwp": 2.45},
    "resnet18": {"rwp": 1.05, "arwp": 1.05, "sam": 2.05, "asam": 2.05, "m-rwp": 2.05, "m-arwp": 2.05},
}
# Extra over SGD, x the largest tensor, beside the per-filter scales (and ARWP's per-filter statistics).
MEMORY_TARGETS = {"resnet18": {"rwp": 1.0, "arwp": 1.0}}
ROUNDS = {"mlp": (10, 60, 10), "vit": (3, 20, 3), "resnet18": (1, 6, 1)}  # warm-up, timed, steps per sample
MiB = float(2**20)
Batch = Tuple[Tensor, Tensor]


class TokenTransformer(nn.Module):
    """The digits' 8 rows of 8 pixels as 8 tokens through a transformer encoder, mean-pooled."""

    def __init__(self, width: int = 64, layers: int = 12, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(1, 8, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.position
        return self.head(self.norm(self.encoder(tokens).mean(1)))


def build(name: str, batch: int, device: torch.device) -> Tuple[nn.Module, List[Batch]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        model = create_model("resnet18", 10, (3, 32, 32))
        batches = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
                   for _ in range(2)]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=g)
        batches = [(x[index], y[index]) for index in order[: len(x) // batch * batch].view(-1, batch)]
        model = create_model("mlp", 10, (64,)) if name == "mlp" else TokenTransformer()
    return model.to(device).train(), [(x.to(device), y.to(device)) for x, y in batches]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(method: str, model: nn.Module, closures: Callable[[], Callable[[], Tensor]]) -> Callable[[], None]:
    """One update of ``method``, its closures taken from ``closures()``."""
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), **BASE)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            opt.step(closures())
        return step
    opt = flatmin.create(method, model, seed=0, **BASE)
    if opt.batches_per_step == 2:
        return lambda: opt.step(closures(), closures())
    return lambda: opt.step(closures())


def training_closures(model: nn.Module, batches: List[Batch], wrap: Callable = lambda f: f) -> Callable:
    """A cyclic stream of closures (forward, backward, return the loss) over ``batches``."""
    position = [0]

    def next_closure() -> Callable[[], Tensor]:
        x, y = batches[position[0] % len(batches)]
        position[0] += 1

        def closure() -> Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        return wrap(closure)
    return next_closure


def stored_gradient_closures(model: nn.Module) -> Callable:
    """Closures that only write a stored gradient into ``.grad``: what is left of a step is the
    optimizer's own work."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [1e-3 * torch.randn_like(p) for p in params]
    loss = torch.zeros((), device=params[0].device)

    def closure() -> Tensor:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return loss
    return lambda: closure


def interleaved(steps: Dict[str, Callable[[], None]], warmup: int, rounds: int, inner: int,
                device: torch.device) -> Dict[str, List[float]]:
    """Seconds per update of every step, ``rounds`` samples each, the order rotated every round."""
    names = list(steps)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            sync(device)
            if r >= warmup:
                samples[name].append((time.perf_counter() - start) / inner)
    return samples


def paired_ratio(samples: Dict[str, List[float]], name: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples["sgd"]))


def own_ops_and_memory(method: str, model: nn.Module, batches: List[Batch]) -> Tuple[int, int, int]:
    """(own ops of a steady-state update, peak bytes, own peak bytes) from a new optimizer's first three
    updates: the memory counts what the optimizer keeps between updates (momentum, statistics, buffers
    made once) as well as what an update needs while it runs."""
    tracker = StepTracker()
    step = make_step(method, model, training_closures(model, batches, wrap=tracker.closure))
    with tracker:
        step()
        step()  # momentum buffers and ARWP statistics exist: count the ops of the next update
        tracker.own_op_counts.clear()
        step()
    return tracker.own_ops, tracker.peak_bytes, tracker.own_peak_bytes


def cuda_peak_and_kernels(method: str, model: nn.Module, batches: List[Batch], device: torch.device) -> Tuple[int, int]:
    """(peak bytes over those allocated before a new optimizer's first three updates, kernels launched
    by the third)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(method, model, training_closures(model, batches))
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return torch.cuda.max_memory_allocated(device) - base, kernels


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model, batches = build(name, args.batch_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    largest = max(p.numel() * p.element_size() for p in params)
    warmup, rounds, inner = ROUNDS[name]
    rounds = args.rounds or rounds
    print(f"\n== {name}: {sum(p.numel() for p in params):,} weights in {len(params)} tensors, largest "
          f"{largest / MiB:.2f} MiB, batch {args.batch_size}; {warmup} warm-up + {rounds} rounds x {inner} "
          f"update(s)", flush=True)
    start = time.perf_counter()
    # One copy of the model per method: a method's step must not find another's gradient in .grad.
    models = {m: copy.deepcopy(model) for m in METHODS}
    timed = interleaved({m: make_step(m, models[m], training_closures(models[m], batches)) for m in METHODS},
                        warmup, rounds, inner, device)
    models = {m: copy.deepcopy(model) for m in METHODS}
    own = interleaved({m: make_step(m, models[m], stored_gradient_closures(models[m])) for m in METHODS},
                      warmup, rounds, inner, device)
    rows: Dict[str, dict] = {}
    for m in METHODS:
        ops, peak, own_peak = own_ops_and_memory(m, copy.deepcopy(model), batches)
        row = dict(ms=1e3 * statistics.median(timed[m]), ratio=paired_ratio(timed, m),
                   own_us=1e6 * statistics.median(a - b for a, b in zip(own[m], own["sgd"])), own_ops=ops,
                   peak_bytes=peak, own_peak_bytes=own_peak)
        if device.type == "cuda":
            row["peak_bytes"], row["kernels"] = cuda_peak_and_kernels(m, copy.deepcopy(model), batches, device)
        rows[m] = row
    # One number per filter of every tensor (per element of 1-D ones); three such buffers: the scales,
    # ARWP's F, and the index spreading 1-D norms over their elements.
    per_filter = sum((p.shape[0] if p.ndim >= 2 else p.numel()) * 4 for p in params)
    for m in METHODS:
        extra = rows[m]["peak_bytes"] - rows["sgd"]["peak_bytes"]
        rows[m]["extra_mib"] = extra / MiB
        rows[m]["extra_x_largest"] = extra / largest
        rows[m]["extra_beyond_filters_x_largest"] = (extra - 3 * per_filter) / largest
    result = dict(model=name, tensors=len(params), largest_mib=largest / MiB, rounds=rounds,
                  seconds=time.perf_counter() - start, methods=rows)
    print_table(result, device)
    return result


def verdict(value: float, target: float) -> str:
    return f"<={target:.2f} {'PASS' if value <= target else 'MISS'}"


def print_table(result: dict, device: torch.device) -> None:
    name, rows = result["model"], result["methods"]
    cuda = device.type == "cuda"
    head = (f"{'method':<7} {'ms':>9} {'xSGD':>6} {'target':>11} {'own us':>9} {'own ops':>8}"
            + (f" {'kernels':>8}" if cuda else "") + f" {'extra MiB':>10} {'x largest':>10} {'target':>9}")
    print(head)
    print("-" * len(head))
    for m, row in rows.items():
        time_target = TIME_TARGETS.get(name, {}).get(m)
        memory_target = MEMORY_TARGETS.get(name, {}).get(m)
        print(f"{m:<7} {row['ms']:9.2f} {row['ratio']:6.3f} "
              f"{verdict(row['ratio'], time_target) if time_target else '':>11} {row['own_us']:9.0f} "
              f"{row['own_ops']:8d}" + (f" {row['kernels']:8d}" if cuda else "")
              + f" {row['extra_mib']:10.2f} {row['extra_x_largest']:10.3f} "
              f"{verdict(row['extra_beyond_filters_x_largest'], memory_target) if memory_target else '':>9}")
    print(f"({result['tensors']} tensors, largest {result['largest_mib']:.2f} MiB; {result['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,vit,resnet18", help="comma-separated: mlp, vit, resnet18")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default: mlp 60, vit 20, resnet18 6)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ROUNDS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(ROUNDS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: it must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    meta = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                threads=torch.get_num_threads(), cpus=os.cpu_count(), load_before=load)
    print(f"torch {meta['torch']} | {meta['device']} ({meta['device_name']}) | {meta['threads']} threads of "
          f"{meta['cpus']} CPUs | load average {load:.2f}")
    report = dict(meta=meta, models={name: measure(name, args, device) for name in models})
    report["meta"]["load_after"] = os.getloadavg()[0]
    # The run itself keeps its threads busy; a load already there before it started is someone else's.
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} before the run on {os.cpu_count()} CPUs: other processes "
              "competed for the cores; the times are unreliable")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
