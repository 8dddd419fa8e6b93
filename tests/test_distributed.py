"""torch.distributed on CPU: parallel m-(A)RWP and data-parallel SAM, RWP and m-ARWP under DDP.

Each group of workers is a set of real processes joined by gloo on 127.0.0.1 (this file, run as a
script with torchrun's variables set), started once per module for all of its scenarios; every
worker writes what it ended with and the tests compare that, in this process, with single-process
references:

* parallel m-RWP / m-ARWP with one clean and one perturbed worker (a model with BatchNorm) equal the
  single-process step on (B1, B2): weights, running statistics, optimizer state, F, generator;
* with four workers (k = 2: B1 split over ranks 0 and 2, B2 over 1 and 3, no BatchNorm, whose batch
  statistics would differ per shard) they equal the single-process step on the whole B1 and B2;
* every rank ends with bit-identical weights, buffers and optimizer state;
* SAM under DDP ascends per worker (its first pass inside ``no_sync``) and averages the second
  gradient, checked against a hand-written computation, also with ``gradient_as_bucket_view``; a
  non-finite g0 on one worker makes every worker skip the update instead of leaving the others
  waiting in the all-reduce;
* RWP and m-ARWP under DDP equal the single-process method on the concatenated batch, and so do
  m-RWP with a λ = 1 group and m-ARWP with a closure that zeroes gradients, both under
  ``gradient_as_bucket_view``.

Models and data are float64, so "equal" means to ~1e-10, far below any difference in the maths.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

import flatmin
from flatmin.distributed import DistEnv, DistributedError, ParallelMixedStep, init_distributed
from workers import launch, serve

STEPS = 4
HPARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
RHO = 0.1
COLLECTIVE_TIMEOUT_S = 30  # a worker waiting on a dead peer gives up after this
ATOL = 1e-10


# ---------------------------------------------------------------- shared by workers and references

def make_model(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(12)] if bn else []
    return nn.Sequential(nn.Linear(6, 12), *norm, nn.Tanh(), nn.Linear(12, 3)).double()


def batch(t: int, which: str, n: int = 16):
    """Batch ``which`` (B1 or B2) of update ``t``: the same tensors in every process."""
    g = torch.Generator().manual_seed(10 * t + (1 if which == "B1" else 2))
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def shard(xy, index: int, count: int):
    x, y = xy
    size = len(y) // count
    return x[index * size:(index + 1) * size], y[index * size:(index + 1) * size]


def closure_on(model, x, y, zeroing: bool = False):
    def closure():
        loss = F.cross_entropy(model(x), y)
        if zeroing:
            model.zero_grad(set_to_none=False)  # as Lightning's closure does, between forward and backward
        loss.backward()
        return loss.detach()
    return closure


def mixed_optimizer(method: str, model: nn.Module, wrapper=None, head_lam: float = 0.8):
    """m-RWP or m-ARWP with two groups (the head with its own λ) over ``model``'s parameters."""
    head = list(model[-1].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [{"params": body}, {"params": head, "lam": head_lam}]
    extra = {"eta": 5.0, "beta": 0.9} if method == "m-arwp" else {}
    cls = flatmin.MARWP if method == "m-arwp" else flatmin.MRWP
    return cls(groups, torch.optim.SGD, model=wrapper or model, sigma=0.05, lam=0.3, seed=0, **extra, **HPARAMS)


def snapshot(model, opt, losses):
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "state": opt.state_dict(), "losses": losses}


# ---------------------------------------------------------------- what the workers run

def parallel_mixed(method: str, bn: bool, env: DistEnv):
    model = make_model(bn)
    opt = mixed_optimizer(method, model)
    parallel = ParallelMixedStep(opt)
    k = env.world_size // 2
    which = "B1" if env.rank % 2 == 0 else "B2"
    losses = []
    for t in range(STEPS):
        x, y = shard(batch(t, which), env.rank // 2, k)
        losses.append(float(parallel.step(closure_on(model, x, y))))
    return snapshot(model, opt, losses)


def data_parallel(method: str, env: DistEnv, bucket_view: bool = False, poisoned: bool = False,
                  head_lam: float = 0.8, zeroing: bool = False):
    model = make_model(bn=False)
    ddp = DDP(model, gradient_as_bucket_view=bucket_view)
    if method == "sam":
        opt = flatmin.SAM(model.parameters(), torch.optim.SGD, model=ddp, rho=RHO, **HPARAMS)
    elif method == "rwp":
        opt = flatmin.RWP(model.parameters(), torch.optim.SGD, model=ddp, sigma=0.05, seed=0, **HPARAMS)
    else:
        opt = mixed_optimizer(method, model, wrapper=ddp, head_lam=head_lam)
    losses = []
    for t in range(STEPS):
        b1 = shard(batch(t, "B1"), env.rank, env.world_size)
        if poisoned and t == 0 and env.rank == 1:
            b1[0][0, 0] = math.inf  # a non-finite g0 on one worker only
        if opt.batches_per_step == 2:
            b2 = shard(batch(t, "B2"), env.rank, env.world_size)
            loss = opt.step(closure_on(ddp, *b1, zeroing), closure_on(ddp, *b2, zeroing))
        else:
            loss = opt.step(closure_on(ddp, *b1))
        losses.append(float(loss))
    return {**snapshot(model, opt, losses), "skipped": opt.skipped_steps}


SCENARIOS = {
    "parallel m-rwp bn": lambda env: parallel_mixed("m-rwp", True, env),
    "parallel m-arwp bn": lambda env: parallel_mixed("m-arwp", True, env),
    "parallel m-rwp": lambda env: parallel_mixed("m-rwp", False, env),
    "parallel m-arwp": lambda env: parallel_mixed("m-arwp", False, env),
    "ddp sam": lambda env: data_parallel("sam", env),
    "ddp sam bucket view": lambda env: data_parallel("sam", env, bucket_view=True),
    "ddp sam non-finite": lambda env: data_parallel("sam", env, poisoned=True),
    "ddp rwp": lambda env: data_parallel("rwp", env),
    "ddp m-arwp": lambda env: data_parallel("m-arwp", env),
    "ddp m-rwp head λ=1 bucket view": lambda env: data_parallel("m-rwp", env, bucket_view=True, head_lam=1.0),
    "ddp m-arwp zeroing bucket view": lambda env: data_parallel("m-arwp", env, bucket_view=True, zeroing=True),
}
TWO_WORKERS = ["parallel m-rwp bn", "parallel m-arwp bn", "ddp sam", "ddp sam bucket view", "ddp rwp", "ddp m-arwp",
               "ddp m-rwp head λ=1 bucket view", "ddp m-arwp zeroing bucket view"]
FOUR_WORKERS = ["parallel m-rwp", "parallel m-arwp"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    return launch(__file__, 2, TWO_WORKERS, tmp_path_factory.mktemp("two_workers"))


@pytest.fixture(scope="module")
def four_workers(tmp_path_factory):
    return launch(__file__, 4, FOUR_WORKERS, tmp_path_factory.mktemp("four_workers"))


# ---------------------------------------------------------------- references, in this process

def reference_mixed(method: str, bn: bool):
    """The single-process method on the whole B1 and B2 of every update."""
    model = make_model(bn)
    opt = mixed_optimizer(method, model)
    losses = [float(opt.step(closure_on(model, *batch(t, "B1")), closure_on(model, *batch(t, "B2"))))
              for t in range(STEPS)]
    return snapshot(model, opt, losses)


def reference_single(method: str, head_lam: float = 0.8):
    """The single-process method on the concatenated batch (the workers' shards together)."""
    model = make_model(bn=False)
    if method == "rwp":
        opt = flatmin.RWP(model.parameters(), torch.optim.SGD, model=model, sigma=0.05, seed=0, **HPARAMS)
    else:
        opt = mixed_optimizer(method, model, head_lam=head_lam)
    losses = []
    for t in range(STEPS):
        closures = [closure_on(model, *batch(t, "B1"))]
        if opt.batches_per_step == 2:
            closures.append(closure_on(model, *batch(t, "B2")))
        losses.append(float(opt.step(*closures)))
    return snapshot(model, opt, losses)


def reference_sam(workers: int):
    """SAM by hand with a per-worker ascent: worker r ascends along its own g0_r,
    ε_r = ρ · g0_r / ||g0_r||, takes g_r = ∇L(w + ε_r; shard r), and the step uses mean_r g_r."""
    model = make_model(bn=False)
    base = torch.optim.SGD(model.parameters(), **HPARAMS)
    names = [name for name, _ in model.named_parameters()]
    for t in range(STEPS):
        per_worker = []
        for r in range(workers):
            x, y = shard(batch(t, "B1"), r, workers)

            def loss_at(weights):
                return F.cross_entropy(functional_call(model, dict(zip(names, weights)), (x,)), y)

            w = [p.detach().requires_grad_() for p in model.parameters()]
            g0 = torch.autograd.grad(loss_at(w), w)
            norm = math.sqrt(sum(float((g * g).sum()) for g in g0))
            w_adv = [(p + RHO * g / norm).detach().requires_grad_() for p, g in zip(w, g0)]
            per_worker.append(torch.autograd.grad(loss_at(w_adv), w_adv))
        for p, *grads in zip(model.parameters(), *per_worker):
            p.grad = sum(grads) / workers
        base.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_close(actual, expected, path="state"):
    """Nested dicts/lists of tensors and numbers: floats to ATOL, everything else exactly."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor) and expected.is_floating_point():
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{path}: {m}")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), path
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=ATOL), path
    else:
        assert actual == expected, path


def assert_identical(a, b, path="result"):
    """Bit for bit."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in b:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(b, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("method", ["m-rwp", "m-arwp"])
def test_parallel_two_workers_equal_single_process_with_batchnorm(two_workers, method):
    ref = reference_mixed(method, bn=True)
    got = two_workers[0][f"parallel {method} bn"]
    assert_close(got["params"], ref["params"], "params")
    # Running statistics are rank 0's clean-pass ones, as the single-process clean pass leaves them.
    assert_close(got["buffers"], ref["buffers"], "buffers")
    # Momentum, F (m-ARWP) and the generator, which must be bit-identical.
    assert_close(got["state"], ref["state"])
    assert_close(got["losses"], ref["losses"], "clean losses of rank 0")
    if method == "m-arwp":
        assert all("F" in s for s in got["state"]["state"].values())


@pytest.mark.parametrize("method", ["m-rwp", "m-arwp"])
def test_parallel_four_workers_equal_single_process_on_whole_batches(four_workers, method):
    ref = reference_mixed(method, bn=False)
    got = four_workers[0][f"parallel {method}"]
    assert_close(got["params"], ref["params"], "params")
    assert_close(got["state"], ref["state"])


@pytest.mark.parametrize("workers, name", [("two_workers", name) for name in TWO_WORKERS]
                         + [("four_workers", name) for name in FOUR_WORKERS])
def test_every_rank_ends_identical(request, workers, name):
    # SAM: each worker shifts by its own ε, so subtracting it again would leave the workers a few ulp
    # apart (momentum and weight decay then carry it on); only an exact restore keeps them identical.
    def without_losses(result):  # each rank's loss is on its own batch
        return {key: value for key, value in result.items() if key != "losses"}

    results = request.getfixturevalue(workers)
    for rank, result in enumerate(results[1:], start=1):
        assert_identical(without_losses(result[name]), without_losses(results[0][name]), f"rank {rank}")


@pytest.mark.parametrize("scenario", ["ddp sam", "ddp sam bucket view"])
def test_ddp_sam_ascends_per_worker_and_averages_the_second_gradient(two_workers, scenario):
    # With gradient_as_bucket_view, .grad lives in DDP's buckets; ε (built in g0's memory) must
    # survive the second, all-reduced pass all the same.
    got = two_workers[0][scenario]["params"]
    assert_close(got, reference_sam(workers=2), "params")
    # The check can tell: one ascent along the all-reduced g0 ends elsewhere.
    shared_ascent = reference_sam(workers=1)
    assert max(float((a - b).abs().max()) for a, b in zip(got, shared_ascent)) > 1e-4


def test_ddp_sam_non_finite_g0_on_one_worker_skips_on_all(tmp_path):
    # The worker with the non-finite g0 must still reach the all-reduced second pass (else the others
    # wait there forever); the non-finite average then makes every worker skip the same update.
    ranks = launch(__file__, 2, ["ddp sam non-finite"], tmp_path)
    assert [r["ddp sam non-finite"]["skipped"] for r in ranks] == [1, 1]
    assert_identical(ranks[1]["ddp sam non-finite"]["params"], ranks[0]["ddp sam non-finite"]["params"])
    assert all(torch.isfinite(p).all() for p in ranks[0]["ddp sam non-finite"]["params"])


@pytest.mark.parametrize("method", ["rwp", "m-arwp"])
def test_ddp_equals_single_process_on_concatenated_batch(two_workers, method):
    # m-ARWP: the perturbed pass is all-reduced into an empty .grad, so F sees the mean ḡ2; the
    # clean pass accumulates on top and DDP all-reduces the accumulated .grad.
    ref = reference_single(method)
    got = two_workers[0][f"ddp {method}"]
    assert_close(got["params"], ref["params"], "params")
    assert_close(got["state"], ref["state"])


def test_ddp_mixed_method_with_a_closure_that_zeroes_gradients(two_workers):
    # The clean closure zeroes .grad under DDP with gradient_as_bucket_view: the perturbed term
    # lives in DDP's bucket and must reach the averaged update all the same.
    ref = reference_single("m-arwp")
    got = two_workers[0]["ddp m-arwp zeroing bucket view"]
    assert_close(got["params"], ref["params"], "params")
    assert_close(got["state"], ref["state"])


def test_ddp_lam_one_group_with_gradient_as_bucket_view(two_workers):
    # m-(A)RWP sets the perturbed gradient of a λ = 1 group aside during the clean pass; with
    # gradient_as_bucket_view it lives in DDP's bucket, which the clean pass must not overwrite.
    ref = reference_single("m-rwp", head_lam=1.0)
    got = two_workers[0]["ddp m-rwp head λ=1 bucket view"]
    assert_close(got["params"], ref["params"], "params")


# ---------------------------------------------------------------- the environment, in this process

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_without_torchrun_one_worker_and_nothing_initialised(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
    assert not torch.distributed.is_initialized()
    with pytest.raises(DistributedError, match="even number of workers"):
        init_distributed("cpu", parallel=True)


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "even number of workers.*WORLD_SIZE=3"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "incomplete torchrun environment.*LOCAL_RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "RANK=2 does not fit WORLD_SIZE=2"),
])
def test_bad_launch_fails_with_one_line(monkeypatch, variables, message):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match=message) as info:
        init_distributed("cpu", parallel=True)
    assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


def test_parallel_step_takes_only_mixed_methods():
    model = make_model(bn=False)
    with pytest.raises(TypeError, match="MRWP or flatmin.MARWP"):
        ParallelMixedStep(flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1))


if __name__ == "__main__":
    serve(lambda env, names: {name: SCENARIOS[name](env) for name in names}, parallel=True,
          timeout_s=COLLECTIVE_TIMEOUT_S)
