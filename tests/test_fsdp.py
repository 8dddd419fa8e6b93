"""Every method on a model sharded with FSDP2 (``fully_shard``), on 2 and 4 real processes (gloo).

The model has a conv and two linear layers whose dim 0 does not divide by the number of processes
(5, 7 and 3 rows), so shards are uneven and, on 4 processes, one is empty; the biases are sharded
1-D tensors. Each process takes its slice of every global batch; FSDP averages the gradients. After
several updates the full weights (``p.full_tensor()``) must equal a one-process run of the same
method with the same seed on the same global batches: the noise does not depend on the number of
processes, filter-wise scales and ARWP's statistics are right on every shard, SAM's norm is global.
Models and data are float64, so equal means to ~1e-12; the bar asserted is 1e-9.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin.distributed import fsdp
from workers import launch, serve

# flatmin refuses FSDP2 on a torch older than fsdp.FSDP2_SINCE (docs/install.md).
needs_fsdp2 = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < fsdp.FSDP2_SINCE,
                                 reason=f"flatmin's FSDP2 needs torch >= {fsdp.FSDP2_SINCE}")

STEPS = 3
BATCH = 8
BASE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
HPARAMS = {
    "rwp": {"sigma": 0.05},
    "arwp": {"sigma": 0.05, "eta": 5.0, "beta": 0.9},
    "m-rwp": {"sigma": 0.05, "lam": 0.3},
    "m-arwp": {"sigma": 0.05, "lam": 0.3, "eta": 5.0, "beta": 0.9},
    "sam": {"rho": 0.1},
    "asam": {"rho": 0.5},
}
METHODS = [*HPARAMS, "nrs"]
ATOL = 1e-9


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def batch(t: int, which: str):
    g = torch.Generator().manual_seed(10 * t + (1 if which == "B1" else 2))
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def run(method: str, model: nn.Module, part=lambda xy: xy):
    """``STEPS`` updates of ``method`` on ``model``, each process on ``part`` of every global batch."""
    def closure_on(x, y):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    if method == "nrs":
        nrs = flatmin.NRSLoss(alpha=1.0, sigma=0.05, seed=0)
        opt = torch.optim.SGD(model.parameters(), **BASE)
        for t in range(STEPS):
            opt.zero_grad()
            nrs.backward(model, *part(batch(t, "B1")))
            opt.step()
        return nrs, opt
    opt = flatmin.create(method, model, seed=0, **BASE, **HPARAMS[method])
    for t in range(STEPS):
        closures = [closure_on(*part(batch(t, "B1")))]
        if opt.batches_per_step == 2:
            closures.append(closure_on(*part(batch(t, "B2"))))
        opt.step(*closures)
    return opt, opt


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded_run(method: str, rank: int, world: int):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[3], model[5]):
        fully_shard(layer)
    fully_shard(model)
    size = BATCH // world
    noise_owner, opt = run(method, model, lambda xy: (xy[0][rank * size:(rank + 1) * size],
                                                      xy[1][rank * size:(rank + 1) * size]))
    params = [full(p).detach().clone() for p in model.parameters()]
    F_state = [full(opt.state[p]["F"]).clone() if "F" in opt.state[p] else None for p in model.parameters()]
    sharded_F = all(type(F_).__name__ == "DTensor" for p in model.parameters()
                    for F_ in [opt.state[p].get("F")] if F_ is not None)
    return {"params": params, "F": F_state, "generator": noise_owner.generator.get_state(), "F_is_dtensor": sharded_F}


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3)).double()


def bn_batches(rank: int, world: int):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(BATCH, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    size = BATCH // world
    return [(x[rank * size:(rank + 1) * size], torch.zeros(size, dtype=torch.long)) for x in xs]


def bn_step(method: str, model: nn.Module, parts):
    opt = flatmin.create(method, model, seed=0, **BASE, **HPARAMS[method])
    closures = []
    for x, y in parts[:opt.batches_per_step]:
        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        closures.append(closure)
    opt.step(*closures)
    return [b.clone() for b in model[1].buffers()]


def sharded_bn_run(method: str, rank: int, world: int):
    """One update on a model with BatchNorm: the running statistics each process keeps."""
    from torch.distributed.fsdp import fully_shard

    model = bn_model()
    fully_shard(model)
    return bn_step(method, model, bn_batches(rank, world))


def run_all(env, names):
    results = {name: sharded_run(name, env.rank, env.world_size) for name in names}
    results["bn"] = {method: sharded_bn_run(method, env.rank, env.world_size) for method in ("m-arwp", "sam", "rwp")}
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(__file__, 2, METHODS, tmp_path_factory.mktemp("fsdp2"))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(__file__, 4, METHODS, tmp_path_factory.mktemp("fsdp4"))


def reference(method: str):
    model = make_model()
    noise_owner, opt = run(method, model)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "F": [opt.state[p]["F"].clone() if "F" in opt.state[p] else None for p in model.parameters()],
            "generator": noise_owner.generator.get_state()}


@needs_fsdp2
@pytest.mark.parametrize("world", ["two", "four"])
@pytest.mark.parametrize("method", METHODS)
def test_sharded_run_equals_one_process(method, world, request):
    ranks = request.getfixturevalue(world)
    want = reference(method)
    for rank, result in enumerate(ranks):
        got = result[method]
        for a, b in zip(got["params"], want["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        for a, b in zip(got["F"], want["F"]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
        assert torch.equal(got["generator"], want["generator"]), f"rank {rank}: the noise generator moved otherwise"
        assert got["F_is_dtensor"], "ARWP's F of a sharded parameter must be sharded like it"


@needs_fsdp2
@pytest.mark.parametrize("method", ["m-arwp", "sam", "rwp"])
def test_running_statistics_follow_the_method_on_every_shard(method, two):
    # Each process's BatchNorm sees its own slice of the batch; only the pass the method names
    # (m-ARWP's clean pass, SAM's first pass, RWP's only pass) may update the running statistics.
    for rank, result in enumerate(two):
        want = bn_step(method, bn_model(), bn_batches(rank, 2))
        for a, b in zip(result["bn"][method], want):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_a_torch_older_than_the_fsdp2_bound_is_refused_in_one_line(monkeypatch, tmp_path):
    # On a torch from FSDP2_SINCE on, pretend the bound is higher: the same check refuses.
    if torch.torch_version.TorchVersion(torch.__version__) >= fsdp.FSDP2_SINCE:
        monkeypatch.setattr(fsdp, "FSDP2_SINCE", "99.0")
    one_line = (rf"^sharded training \(FSDP2\) needs torch >= {fsdp.FSDP2_SINCE}, this is torch "
                rf"{re.escape(torch.__version__)}: upgrade torch, or train without --fsdp \(DDP\)$")
    with pytest.raises(ValueError, match=one_line):
        fsdp.shard_model(make_model())
    assert not torch.distributed.is_initialized()  # refused before a process group was started
    with pytest.raises(ValueError, match=one_line):
        from flatmin.train import TrainConfig, train
        train(TrainConfig(data="digits", model="mlp", epochs=1, progress="none", fsdp=True, out=str(tmp_path)))


if __name__ == "__main__":
    serve(run_all)
