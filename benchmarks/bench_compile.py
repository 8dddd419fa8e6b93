"""What ``torch.compile(model)`` costs under each flatmin method: graphs, recompiles, compile time,
step time against eager, and how far the compiled run ends from the eager one.

The recipe compiles the model, not the optimizer step. A method that freezes BatchNorm's running
statistics for a pass (SAM/ASAM's second pass, the perturbed pass of m-RWP/m-ARWP, with
``model=``) flips ``track_running_stats`` on the BatchNorm modules, which Dynamo guards on: the
first such pass compiles a second graph, and from then on both graphs are reused.

    PYTHONPATH=src python benchmarks/bench_compile.py                       # cnn on digits, inductor
    PYTHONPATH=src python benchmarks/bench_compile.py --model mlp --backend aot_eager --steps 20
    PYTHONPATH=src python benchmarks/bench_compile.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F
from torch._dynamo.utils import counters, guard_failures

import flatmin
from flatmin.models import create_model

METHODS = ["sgd", "rwp", "arwp", "sam", "m-rwp", "m-arwp"]


def closure_on(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def step(opt, model, x, y) -> None:
    if not isinstance(opt, flatmin.optim.WrappedOptimizer):
        opt.zero_grad()
    opt.step(closure_on(model, x, y))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(opt, model, data, device: torch.device) -> list:
    times = []
    for x, y in data:
        sync(device)
        start = time.perf_counter()
        step(opt, model, x, y)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(method: str, args: argparse.Namespace, with_model: bool) -> dict:
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    torch.manual_seed(0)
    device = torch.device(args.device)
    eager = create_model(args.model, 10, (1, 8, 8)).to(device)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=args.backend)
    kw = {} if method == "sgd" else {"seed": 0}
    opt_eager = flatmin.create(method, eager, lr=0.05, momentum=0.9, **kw)
    opt_compiled = flatmin.create(method, compiled, lr=0.05, momentum=0.9, **kw)
    if not with_model and method != "sgd":
        opt_eager.model = opt_compiled.model = None  # every pass updates the running statistics
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch, 1, 8, 8, generator=g).to(device),
             torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(args.steps + 1)]
    first = timed(opt_compiled, compiled, data[:1], device)[0]
    compiled_times = timed(opt_compiled, compiled, data[1:], device)
    timed(opt_eager, eager, data[:1], device)
    eager_times = timed(opt_eager, eager, data[1:], device)
    diff = max((a.double() - b.double()).abs().max().item()
               for a, b in zip(eager.state_dict().values(), compiled_module.state_dict().values()))
    reasons = sorted({str(reason).split("#")[0].strip() for failures in guard_failures.values()
                      for reason in failures})
    return {"graphs": counters["stats"]["unique_graphs"], "recompiles": sum(map(len, guard_failures.values())),
            "first_s": first, "compiled_ms": 1e3 * statistics.median(compiled_times),
            "eager_ms": 1e3 * statistics.median(eager_times), "diff": diff, "reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", help="a flatmin model taking 1x8x8 inputs (default: cnn)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="updates timed after the first (default: 10)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    # Compile from scratch every time: Inductor's on-disk caches would make later methods look free.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    where = (f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {args.model}, batch {args.batch}, backend {args.backend}, "
          f"{where}; medians over {args.steps} updates after the first")
    print("1st update: its wall time, compilation of every graph it meets included; max |diff|: weights and "
          f"buffers, compiled vs eager, after {args.steps + 1} updates")
    print(f"{'method':<20} {'graphs':>6} {'recompiles':>10} {'1st update s':>12} {'compiled ms':>11} "
          f"{'eager ms':>9} {'max |diff|':>10}")
    for method in args.methods.split(","):
        for with_model in ((True, False) if method in ("sam", "m-rwp", "m-arwp") else (True,)):
            r = measure(method, args, with_model)
            label = method if with_model else f"{method} (no model=)"
            print(f"{label:<20} {r['graphs']:>6} {r['recompiles']:>10} {r['first_s']:>12.1f} "
                  f"{r['compiled_ms']:>11.1f} {r['eager_ms']:>9.1f} {r['diff']:>10.1e}")
            for reason in r["reasons"]:
                print(f"{'':<20} recompiled on: {reason}")


if __name__ == "__main__":
    main()
