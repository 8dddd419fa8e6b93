"""Memory per rank of every method on a model sharded with FSDP2 (fully_shard), against FSDP-SGD:

    python benchmarks/bench_fsdp.py                           # wide MLP, 1 (unsharded), 2 and 4 processes
    python benchmarks/bench_fsdp.py --model resnet18 --worlds 1,2 --batch-size 4
    python benchmarks/bench_fsdp.py --methods sgd,rwp,sam --json fsdp.json

Every world size is a group of real processes on this machine, joined by gloo on 127.0.0.1 (this
script started again with torchrun's variables set); world 1 is the unsharded model in one process,
for comparison. Each rank takes its own batch of ``--batch-size`` random samples; base optimizer SGD
(lr 0.01, momentum 0.9, weight decay 5e-4), every method at its defaults (NRS: the loss, plain SGD).

Models:
    mlp       1024-2048-2048-2048-10 with BatchNorm: 10.5M weights (40 MiB), largest tensor 16 MiB
    resnet18  the CIFAR ResNet-18 on random 3x32x32 inputs: 11.2M weights (43 MiB), largest 9 MiB

Measured per rank, for a steady-state update (after two warm-up updates), as the rise of the
process's resident memory above its level before the update, at the update's peak (Linux: the peak
VmHWM is reset through /proc/self/clear_refs; glibc returns every block of 64 KiB or more to the
system when it is freed, so resident memory follows the live tensors); the least of 3 updates:
    step      the update's peak over FSDP-SGD's: forward, backward, all-gathers, optimizer
    own       the same with closures that only write stored gradients (no forward, no backward):
              what the optimizer itself holds at its peak (not for NRS, whose cost is its forward)
both in MiB, in units of the largest unsharded tensor, and in units of the rank's local gradient
shard (the bytes of its slices of every gradient). The worst rank is shown; --json has every rank.
Everything the process touches counts: temporaries inside ops, gloo's buffers, other threads.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatmin
from flatmin.distributed import free_port, init_distributed
from flatmin.models import create_model
from flatmin.sharding import local

METHODS = ["sgd", "rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam", "nrs"]
BASE = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
MiB = float(2**20)
REPEATS = 3  # measured updates per method; the least peak is kept (a stray allocation can only add)
Step = Callable[[], None]


def build(name: str, batch: int, rank: int) -> Tuple[nn.Module, Tuple[Tensor, Tensor]]:
    """The model (the same weights on every rank) and this rank's batch."""
    torch.manual_seed(0)
    if name == "resnet18":
        model, shape = create_model("resnet18", 10, (3, 32, 32)), (3, 32, 32)
    else:
        model, shape = create_model("mlp", 10, (1024,), hidden=(2048, 2048, 2048)), (1024,)
    g = torch.Generator().manual_seed(1 + rank)
    return model.train(), (torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))


def make_step(method: str, model: nn.Module, closure: Callable[[], Tensor]) -> Step:
    """One update of ``method`` with ``closure`` (both batches of the mixed methods are the same)."""
    if method in ("sgd", "nrs"):
        opt = torch.optim.SGD(model.parameters(), **BASE)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
        return step
    opt = flatmin.create(method, model, seed=0, **BASE)
    if opt.batches_per_step == 2:
        return lambda: opt.step(closure, closure)
    return lambda: opt.step(closure)


def training_closure(method: str, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    x, y = batch
    nrs = flatmin.NRSLoss(seed=0) if method == "nrs" else None

    def closure() -> Tensor:
        if nrs is not None:  # NRS backpropagates itself (a sharded model's in two passes)
            return nrs.backward(model, x, y)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()
    return closure


def stored_gradient_closure(model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    """A closure that writes the gradient of one real pass, stored once, into ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    loss = torch.zeros(())

    def closure() -> Tensor:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return loss
    return closure


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this measurement needs Linux")


def peak_over_start(step: Step) -> int:
    """How far the resident memory rose above its level before ``step()`` at the peak of the step."""
    gc.collect()
    start = resident_bytes()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from the current resident memory
    step()
    return resident_bytes("VmHWM") - start


def check_measurement() -> None:
    """The measurement on a case known by hand: 64 MiB made, written and dropped, then 16 MiB kept."""
    kept: List[Tensor] = []

    def step() -> None:
        torch.ones(16 * 2**20)
        kept.append(torch.ones(4 * 2**20))
    step()  # the first call of an op sets things up once
    peak = peak_over_start(step)
    if abs(peak - 64 * 2**20) > 2**20:
        raise RuntimeError(f"memory check: measured a peak of {peak / MiB:.2f} MiB where 64 MiB were in use; "
                           f"is MALLOC_MMAP_THRESHOLD_ set (large blocks must go back to the system when freed)?")


def measure(args: argparse.Namespace, rank: int, world: int) -> Dict[str, dict]:
    """Every method's peaks on this rank (world 1: the unsharded model)."""
    rows: Dict[str, dict] = {}
    for method in args.methods:
        model, batch = build(args.model, args.batch_size, rank)
        if world > 1:
            from flatmin.distributed.fsdp import process_group_mesh, shard_model

            shard_model(model, process_group_mesh(torch.device("cpu")))
        params = [p for p in model.parameters() if p.requires_grad]
        step = make_step(method, model, training_closure(method, model, batch))
        step()
        step()  # momentum buffers and ARWP statistics exist: a steady-state update
        row = {"step": min(peak_over_start(step) for _ in range(REPEATS)),
               "largest": max(p.numel() * p.element_size() for p in params),
               "local_grad": sum(local(p).numel() * p.element_size() for p in params)}
        if method != "nrs":
            stored = make_step(method, model, stored_gradient_closure(model, batch))
            stored()
            row["own"] = min(peak_over_start(stored) for _ in range(REPEATS))
        rows[method] = row
        del model, params, step
        gc.collect()
    return rows


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    check_measurement()
    env = init_distributed("cpu")
    try:
        rows = measure(args, env.rank, env.world_size)
        Path(args.worker, f"rank{env.rank}.json").write_text(json.dumps(rows))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, world: int, folder: Path) -> List[Dict[str, dict]]:
    """Run the measurement on ``world`` processes (world 1: one process, unsharded); every rank's rows."""
    port = free_port()
    command = [sys.executable, __file__, "--worker", str(folder), "--model", args.model,
               "--batch-size", str(args.batch_size), "--methods", ",".join(args.methods)]
    procs = []
    for rank in range(world):
        # Blocks of 64 KiB and more are mapped and unmapped one by one, so the resident memory follows the
        # live tensors (glibc's default keeps freed blocks of up to 32 MiB in the heap).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=env))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"{world} processes: exit codes {codes}")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def table(results: Dict[int, List[Dict[str, dict]]], methods: List[str]) -> str:
    """Extra over SGD per rank (the worst rank), in MiB and in units of the largest tensor and of
    the rank's local gradient shard."""
    head = (f"{'procs':>5} {'method':<7} {'step MiB':>9} {'x largest':>9} {'x shard':>8} "
            f"{'own MiB':>8} {'x largest':>9} {'x shard':>8}")
    lines = [head, "-" * len(head)]
    for world, ranks in results.items():
        for method in methods:
            cells = []
            for kind in ("step", "own"):
                extras = [(r[method][kind] - r["sgd"][kind], r[method]) for r in ranks if kind in r[method]]
                if not extras:
                    cells.append(f"{'-':>9} {'-':>9} {'-':>8}" if kind == "step" else f"{'-':>8} {'-':>9} {'-':>8}")
                    continue
                extra, row = max(extras, key=lambda e: e[0])
                width = 9 if kind == "step" else 8
                cells.append(f"{extra / MiB:{width}.2f} {extra / row['largest']:9.3f} {extra / row['local_grad']:8.3f}")
            lines.append(f"{world if world > 1 else '1*':>5} {method:<7} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=("mlp", "resnet18"))
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts (1: unsharded)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per rank (default: 32)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--json", default=None, help="also write every rank's numbers to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if "sgd" not in args.methods:
        args.methods.insert(0, "sgd")  # the baseline
    if args.worker and "RANK" in os.environ:
        return worker(args)
    if args.worker:  # world 1: one process, unsharded
        check_measurement()
        Path(args.worker, "rank0.json").write_text(json.dumps(measure(args, 0, 1)))
        return
    try:
        worlds = sorted({int(w) for w in args.worlds.split(",")})
    except ValueError:
        parser.error(f"--worlds {args.worlds!r}: give process counts such as 1,2,4")
    if not worlds or worlds[0] < 1:
        parser.error(f"--worlds {args.worlds!r}: every count must be at least 1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            folder = Path(tmp, f"world{world}")
            folder.mkdir()
            results[world] = launch(args, world, folder)
    print(f"{args.model}, batch {args.batch_size} per rank, torch {torch.__version__}, gloo on CPU "
          f"(1*: one process, unsharded)")
    print(table(results, args.methods))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch_size": args.batch_size,
                                               "ranks": {str(w): r for w, r in results.items()}}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
