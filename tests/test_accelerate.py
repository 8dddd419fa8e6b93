"""flatmin under Hugging Face Accelerate, the documented way (the model prepared, the flatmin optimizer
stepped itself, ``accelerator.backward`` in the closure, Accelerate's GradScaler as its
``grad_scaler``) and with the optimizer prepared too: the direct API's update for every method
(BatchNorm statistics included), also through the scaler, and in two real processes (torchrun,
gloo) the update of the whole batch, or for SAM the per-worker ascent.

Run as a script under torchrun this file is the worker of the two-process tests.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accelerate import Accelerator

from integration_common import (BATCH, HP, METHODS, assert_same_model, batches, create, direct, make_body,
                                docs_example)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TWO_PROCESS = ["sgd", "rwp", "m-arwp", "m-arwp scaler", "sam"]
LAUNCH_TIMEOUT_S = 180


def lend_cpu_scaler(accelerator: Accelerator) -> Accelerator:
    """fp16 on a GPU gives Accelerate a GradScaler; on the CPU Accelerate makes none (its fp16 is
    plain float32 there), so the tests lend it a CPU one: the scaler's code path is the same."""
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def accelerate_run(name, model, accelerator, steps, prepare_optimizer=False):
    """``steps`` updates of ``model`` under ``accelerator``; returns the plain model."""
    if prepare_optimizer:
        opt = create(name, model)
        model, opt = accelerator.prepare(model, opt)
    else:
        model = accelerator.prepare(model)
        opt = create(name, model, **({} if name == "sgd" else {"grad_scaler": accelerator.scaler}))
    for x, y in steps:
        def closure():
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        if name == "sgd":
            opt.zero_grad()
        opt.step(closure)
        if accelerator.scaler is not None:
            accelerator.scaler.update()
    return accelerator.unwrap_model(model)


@pytest.mark.parametrize("prepare_optimizer", [False, True], ids=["documented recipe", "optimizer prepared"])
@pytest.mark.parametrize("name", METHODS)
def test_each_update_equals_the_direct_update(name, prepare_optimizer):
    model = accelerate_run(name, make_body(), Accelerator(cpu=True), batches(2), prepare_optimizer)
    assert_same_model(model, direct(name, [[b] for b in batches(2)]))


@pytest.mark.parametrize("name", ["sam", "m-arwp"])
def test_accelerates_grad_scaler_gives_the_unscaled_update(name):
    accelerator = lend_cpu_scaler(Accelerator(cpu=True))
    model = accelerate_run(name, make_body(), accelerator, batches(2))
    assert_same_model(model, direct(name, [[b] for b in batches(2)]))
    assert accelerator.scaler.get_scale() == 2.0**10  # two updates, no overflow, no backoff


# ---------------------------------------------------------------- two processes


def plain_model() -> nn.Module:
    # No BatchNorm: each worker normalises its half batch with its own statistics.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def full_batches():
    return [(x.double(), y) for x, y in batches(2)]


def halves(batch):
    x, y = batch
    return [(x[:BATCH // 2], y[:BATCH // 2]), (x[BATCH // 2:], y[BATCH // 2:])]


def worker(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    mine = [halves(b)[rank] for b in full_batches()]
    results = {"world": accelerator.num_processes, "distributed": str(accelerator.distributed_type)}
    for scenario in TWO_PROCESS:
        name, *scaled = scenario.split()
        runner = lend_cpu_scaler(Accelerator(cpu=True)) if scaled else accelerator
        results[scenario] = accelerate_run(name, plain_model(), runner, mine).state_dict()
    namespace = {}
    exec(docs_example("accelerate"), namespace)
    results["readme"] = {k: v.detach().clone() for k, v in namespace["model"].named_parameters()}
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, str(out)]
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def sam_per_worker(model, steps):
    """SAM as flatmin runs it under DDP, computed by hand: each worker ascends along its own first
    gradient, ε_h = ρ·g0_h/||g0_h||, and the update averages the workers' second gradients."""
    base = torch.optim.SGD(model.parameters(), **HP)
    params = list(model.parameters())
    for batch in steps:
        second = []
        for x, y in halves(batch):
            g0 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            norm = torch.sqrt(sum((g * g).sum() for g in g0))
            eps = [0.05 * g / norm for g in g0]  # flatmin's default ρ
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            second.append(torch.autograd.grad(F.cross_entropy(model(x), y), params))
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        for p, a, b in zip(params, *second):
            p.grad = (a + b) / 2
        base.step()
    return model


@pytest.mark.parametrize("scenario", TWO_PROCESS)
def test_two_processes_give_the_single_process_update(two_processes, scenario):
    assert two_processes[0]["world"] == 2 and "MULTI_CPU" in two_processes[0]["distributed"]
    name = scenario.split()[0]
    if name == "sam":
        want = sam_per_worker(plain_model(), full_batches())
    else:
        want = plain_model()
        opt = create(name, want)
        for x, y in full_batches():
            def closure():
                loss = F.cross_entropy(want(x), y)
                loss.backward()
                return loss
            if name == "sgd":
                opt.zero_grad()
            opt.step(closure)
    for rank in range(2):
        got = plain_model()
        got.load_state_dict(two_processes[rank][scenario])
        assert_same_model(got, want, atol=1e-10)


def test_documented_accelerate_example_runs_in_two_processes(two_processes):
    # The weights stay identical on both workers (each keeps its own BatchNorm statistics, as in DDP).
    first, second = (result["readme"] for result in two_processes)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # past gloo's teardown, which can abort a finished worker
