"""Training throughput of every method: images per second of a CIFAR-shaped ResNet-18 on synthetic
data, as a training loop sees it (forward, backward and update; the data already on the device).

    PYTHONPATH=src python benchmarks/bench_throughput.py --device cuda                  # batch 128
    PYTHONPATH=src python benchmarks/bench_throughput.py --device cuda --amp bf16
    PYTHONPATH=src python benchmarks/bench_throughput.py --batch-size 4 --steps 2 --warmup 1   # a CPU smoke run

Every method at its defaults over SGD (lr 0.01, momentum 0.9, weight decay 5e-4), with ``model=``;
the mixed methods take two batches per update, so their images per update are twice the batch.
Reported per method: milliseconds per update (median over ``--steps`` updates after ``--warmup``),
images per second (images per update / median time), gradient evaluations per second and the
images per second relative to SGD's. On CUDA every timed update ends in a synchronisation.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatmin
from flatmin.models import create_model

METHODS = ["sgd", "rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam"]
BASE = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_update(method: str, model: nn.Module, batches: List[Tuple[Tensor, Tensor]], device: torch.device,
                amp: str) -> Tuple[Callable[[], None], int, int]:
    """(one update, images it consumes, gradients it evaluates), the batches taken in turn."""
    dtype = AMP[amp]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    kw = {} if method == "sgd" else {"seed": 0, "grad_scaler": scaler}
    opt = flatmin.create(method, model, **BASE, **kw)
    turn = [0]

    def closure_on(x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss
        return closure

    def next_batch() -> Tuple[Tensor, Tensor]:
        turn[0] += 1
        return batches[turn[0] % len(batches)]

    passes = getattr(opt, "batches_per_step", 1)

    def update() -> None:
        if method == "sgd":
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                closure_on(*next_batch())()
                scaler.step(opt)
            else:
                opt.step(closure_on(*next_batch()))
        elif passes == 2:
            opt.step(closure_on(*next_batch()), closure_on(*next_batch()))
        else:
            opt.step(closure_on(*next_batch()))
        if scaler is not None:
            scaler.update()

    grads = 1 if method == "sgd" else opt.grads_per_step
    return update, passes * batches[0][1].shape[0], grads


def measure(method: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, 10, (3, args.image_size, args.image_size)).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.randint(0, 10, (args.batch_size,), generator=g).to(device)))
    update, images, grads = make_update(method, model, batches, device, args.amp)
    for _ in range(args.warmup):
        update()
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        update()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"{method}: the weights are not finite after {args.warmup + args.steps} updates")
    return dict(ms=1e3 * seconds, images_per_s=images / seconds, grads_per_s=grads / seconds,
                images=images, grads=grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="resnet18", help="a flatmin image model (default: resnet18)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="square RGB images of this side (default: 32)")
    parser.add_argument("--steps", type=int, default=30, help="timed updates per method (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="updates before timing (default: 5)")
    parser.add_argument("--amp", default="off", choices=list(AMP), help="autocast dtype (fp16 adds a GradScaler)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    for name in ("batch_size", "image_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: it must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: it must be at least 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__} | {device} ({name}) | {torch.get_num_threads()} threads of {os.cpu_count()} "
          f"CPUs | load average {load:.2f}")
    print(f"{args.model} on synthetic 3x{args.image_size}x{args.image_size} images, batch {args.batch_size}, "
          f"autocast {args.amp}{', channels_last' if args.channels_last else ''}; median of {args.steps} "
          f"updates after {args.warmup}")
    head = f"{'method':<7} {'ms/update':>10} {'images/s':>10} {'x SGD':>6} {'grads/s':>8} {'images/update':>13}"
    print(head)
    print("-" * len(head))
    sgd = None
    for method in methods:
        row = measure(method, args, device)
        sgd = row["images_per_s"] if method == "sgd" else sgd
        ratio = f"{row['images_per_s'] / sgd:6.3f}" if sgd else f"{'':>6}"
        print(f"{method:<7} {row['ms']:10.2f} {row['images_per_s']:10.1f} {ratio} {row['grads_per_s']:8.1f} "
              f"{row['images']:13d}", flush=True)
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} before the run on {os.cpu_count()} CPUs: the times are unreliable")


if __name__ == "__main__":
    main()
