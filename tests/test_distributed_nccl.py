"""DDP over NCCL on the GPUs present: the CUDA counterpart of test_distributed.py's gloo tests.

NCCL refuses two ranks on one GPU, so the group has one worker per GPU, at most two: with one GPU
it is a group of one (DDP still all-reduces every bucket through NCCL), with two or more it is two
workers, and parallel m-ARWP (which needs an even number of workers) runs too. Each worker's
results are compared with the single-process method on the same GPU and the concatenated batch
(SAM: with the hand-written per-worker ascent of test_distributed.py). float64, so "equal" is to
1e-10 as there. Skipped without a CUDA GPU and NCCL.
"""
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flatmin
from flatmin.distributed import DistEnv, ParallelMixedStep
from test_distributed import (HPARAMS, RHO, STEPS, assert_close, batch, closure_on, make_model, mixed_optimizer,
                              reference_sam, shard)
from workers import launch, serve

CUDA = torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()
WORLD = min(2, torch.cuda.device_count()) if CUDA else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and NCCL")]


def on(device, xy):
    return tuple(t.to(device) for t in xy)


def cpu_snapshot(model, opt):
    def to_cpu(value):
        if isinstance(value, dict):
            return {k: to_cpu(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(to_cpu(v) for v in value)
        return value.cpu() if isinstance(value, torch.Tensor) else value

    return {"params": [p.detach().cpu() for p in model.parameters()], "state": to_cpu(opt.state_dict())}


def ddp_worker(method: str, env: DistEnv):
    model = make_model(bn=False).to(env.device)
    ddp = DDP(model, device_ids=[env.device])
    if method == "sam":
        opt = flatmin.SAM(model.parameters(), torch.optim.SGD, model=ddp, rho=RHO, **HPARAMS)
    elif method == "rwp":
        opt = flatmin.RWP(model.parameters(), torch.optim.SGD, model=ddp, sigma=0.05, seed=0, **HPARAMS)
    else:
        opt = mixed_optimizer(method, model, wrapper=ddp)
    for t in range(STEPS):
        b1 = on(env.device, shard(batch(t, "B1"), env.rank, env.world_size))
        if opt.batches_per_step == 2:
            b2 = on(env.device, shard(batch(t, "B2"), env.rank, env.world_size))
            opt.step(closure_on(ddp, *b1), closure_on(ddp, *b2))
        else:
            opt.step(closure_on(ddp, *b1))
    return cpu_snapshot(model, opt)


def parallel_worker(method: str, env: DistEnv):
    model = make_model(bn=False).to(env.device)
    opt = mixed_optimizer(method, model)
    parallel = ParallelMixedStep(opt)
    which = "B1" if env.rank % 2 == 0 else "B2"
    for t in range(STEPS):
        parallel.step(closure_on(model, *on(env.device, shard(batch(t, which), env.rank // 2, env.world_size // 2))))
    return cpu_snapshot(model, opt)


SCENARIOS = {
    "ddp rwp": lambda env: ddp_worker("rwp", env),
    "ddp sam": lambda env: ddp_worker("sam", env),
    "ddp m-arwp": lambda env: ddp_worker("m-arwp", env),
    "parallel m-arwp": lambda env: parallel_worker("m-arwp", env),
}
NAMES = ["ddp rwp", "ddp sam", "ddp m-arwp"] + (["parallel m-arwp"] if WORLD >= 2 else [])


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return launch(__file__, WORLD, NAMES, tmp_path_factory.mktemp("nccl_workers"))


def reference(method: str):
    """The single-process method on GPU 0 (whose generator draws the same noise as rank 0's)."""
    device = torch.device("cuda", 0)
    model = make_model(bn=False).to(device)
    if method == "rwp":
        opt = flatmin.RWP(model.parameters(), torch.optim.SGD, model=model, sigma=0.05, seed=0, **HPARAMS)
    else:
        opt = mixed_optimizer(method, model)
    for t in range(STEPS):
        closures = [closure_on(model, *on(device, batch(t, "B1")))]
        if opt.batches_per_step == 2:
            closures.append(closure_on(model, *on(device, batch(t, "B2"))))
        opt.step(*closures)
    return cpu_snapshot(model, opt)


@pytest.mark.parametrize("method", ["rwp", "m-arwp"])
def test_nccl_ddp_equals_single_process_on_the_concatenated_batch(workers, method):
    want = reference(method)
    for rank, result in enumerate(workers):
        got = result[f"ddp {method}"]
        assert_close(got["params"], want["params"], f"rank {rank} params")
        assert_close(got["state"], want["state"], f"rank {rank} state")


def test_nccl_ddp_sam_ascends_per_worker(workers):
    got = workers[0]["ddp sam"]["params"]
    assert_close(got, reference_sam(workers=WORLD), "params")


@pytest.mark.skipif(WORLD < 2, reason="parallel m-ARWP needs two GPUs (NCCL: one rank per GPU)")
def test_nccl_parallel_m_arwp_equals_single_process(workers):
    want = reference("m-arwp")
    got = workers[0]["parallel m-arwp"]
    assert_close(got["params"], want["params"], "params")
    assert_close(got["state"], want["state"])


if __name__ == "__main__":
    serve(lambda env, names: {name: SCENARIOS[name](env) for name in names}, parallel=False,
          timeout_s=60, device="cuda")
