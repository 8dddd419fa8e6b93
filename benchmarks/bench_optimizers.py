"""Step time and peak extra memory of every method, as ratios to a plain SGD step measured in the
same run (not a test: the numbers depend on the machine).

    PYTHONPATH=src python benchmarks/bench_optimizers.py                    # both models, CPU
    PYTHONPATH=src python benchmarks/bench_optimizers.py --models mlp --steps 200
    PYTHONPATH=src python benchmarks/bench_optimizers.py --device cuda

Models: a CIFAR-style ResNet-18 at batch 128 on random 3×32×32 inputs, and an MLP on the 8×8
digits (real data) at batch 128. Timing: methods are measured in interleaved rounds (SGD, SAM,
RWP, ... then again) so that drift of the CPU clock or of other load hits all of them alike; each
method's time is the median over rounds of the mean step time within a round. Memory: the peak of
live tensor storage during one step, tracked op by op through a TorchDispatchMode (CPU) or by
``torch.cuda.max_memory_allocated`` (CUDA), minus SGD's; reported in MiB and in units of the
largest parameter tensor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import flatmin
from flatmin.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from memtrack import peak_bytes  # noqa: E402  (the same tracker the memory test uses)

METHODS = ["sgd", "rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam"]
TARGET_TIME = {"rwp": 1.05, "arwp": 1.05, "m-rwp": 2.05, "m-arwp": 2.05, "sam": 2.05, "asam": 2.05}
ONE_TRANSIENT = {"rwp", "arwp", "m-rwp", "m-arwp"}


def problem(name: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    if name == "resnet18":
        model = create_model("resnet18", 10, (3, 32, 32))
        x = torch.randn(2 * batch, 3, 32, 32)
        y = torch.randint(0, 10, (2 * batch,))
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        model = create_model("mlp", 10, (1, 8, 8))
        x = torch.tensor(digits.images[: 2 * batch], dtype=torch.float32).unsqueeze(1) / 16
        y = torch.tensor(digits.target[: 2 * batch])
    model, x, y = model.to(device), x.to(device), y.to(device)
    batches = [(x[:batch], y[:batch]), (x[batch:], y[batch:])]
    return model, batches


def make_step(method: str, model: torch.nn.Module, batches) -> Callable[[], None]:
    def closure_on(x, y):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    (x1, y1), (x2, y2) = batches
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            closure_on(x1, y1)()
            opt.step()
        return step
    opt = flatmin.create(method, model, lr=0.01, momentum=0.9, weight_decay=5e-4, seed=0)
    if opt.batches_per_step == 2:
        return lambda: opt.step(closure_on(x1, y1), closure_on(x2, y2))
    return lambda: opt.step(closure_on(x1, y1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, batch: int, rounds: int, steps: int, device: torch.device) -> Dict[str, Dict]:
    model, batches = problem(model_name, batch, device)
    steppers = {m: make_step(m, model, batches) for m in METHODS}
    for step in steppers.values():  # warm-up: allocator, momentum buffers, ARWP statistics
        step()
        step()
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method, step in steppers.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[method].append((time.perf_counter() - start) / steps)
    peaks = {}
    for method, step in steppers.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            sync(device)
            peaks[method] = torch.cuda.max_memory_allocated(device) - base
        else:
            peaks[method] = peak_bytes(step)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    sgd_time, sgd_peak = statistics.median(times["sgd"]), peaks["sgd"]
    return {m: {"time_ms": 1e3 * statistics.median(times[m]), "ratio": statistics.median(times[m]) / sgd_time,
                "extra_mib": (peaks[m] - sgd_peak) / 2**20, "extra_largest": (peaks[m] - sgd_peak) / largest}
            for m in METHODS} | {"_largest_mib": largest / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mlp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all methods")
    parser.add_argument("--steps", type=int, default=0, help="steps per method per round (default: 2 resnet, 50 mlp)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}")
    for name in args.models.split(","):
        steps = args.steps or (2 if name == "resnet18" else 50)
        r = measure(name, args.batch_size, args.rounds, steps, device)
        print(f"\n{name}: {args.rounds} rounds × {steps} steps; largest parameter tensor {r['_largest_mib']:.2f} MiB")
        print(f"{'method':>8} {'step ms':>9} {'× SGD':>7} {'target':>8} {'extra MiB':>10} {'× largest':>10} {'target':>8}")
        for m in METHODS:
            row = r[m]
            t_target = TARGET_TIME.get(m)
            t_mark = "" if t_target is None else ("PASS" if row["ratio"] <= t_target else "MISS") + f"≤{t_target}"
            m_mark = ("PASS" if row["extra_largest"] <= 1.0 else "MISS") + "≤1" if m in ONE_TRANSIENT else ""
            print(f"{m:>8} {row['time_ms']:9.2f} {row['ratio']:7.3f} {t_mark:>8} {row['extra_mib']:10.2f} "
                  f"{row['extra_largest']:10.2f} {m_mark:>8}")


if __name__ == "__main__":
    main()
