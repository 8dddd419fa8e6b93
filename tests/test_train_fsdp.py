"""Training sharded models (FSDP2, ``fully_shard``): blocks, full-state checkpoints across world
sizes, and ``flatmin train --fsdp`` under torchrun. (tests/test_fsdp.py: the methods themselves.)

* API: workers (this file run as a script, on gloo) shard a conv + linear model whose dim 0 does not
  divide by the world size (biases sharded too), train with a flatmin optimizer on shards of the
  same global batches, and write a full-state checkpoint on 4 processes (one of them on a 2 x 2
  HSDP mesh); 2 processes resume from it. They must end on the weights and optimizer state of the uninterrupted 4-process run and of
  the unsharded one-process run (float64, so "equal" means 1e-10, far below any real difference).
* CLI: ``--fsdp`` on 2 processes writes summary.json, metrics.jsonl and checkpoint.pt with the keys
  and shapes of the DDP path (and here, for SGD, the DDP run's weights), evaluates through uneven
  shards without a deadlock, and ``--stop-after`` + ``--resume`` end on the uninterrupted weights.
"""
import copy
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin.models import create_model
from flatmin.optim.base import WrappedOptimizer
from flatmin.train import TrainConfig, train
from flatmin.train.checkpoint import load_checkpoint
from test_distributed import assert_close, assert_identical, shard
from test_fsdp import needs_fsdp2
from test_train_distributed import torchrun
from workers import launch, serve

STEPS, CUT = 4, 2  # updates in all, and the one after which the checkpoint is written
METHODS = ["sgd", "sam", "arwp", "m-arwp"]
# Each writes its checkpoint on 4 processes (one written on a 2 x 2 HSDP mesh) and resumes on 2.
CASES = [*METHODS, "m-arwp hsdp"]
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
ARWP = {"sigma": 0.05, "eta": 5.0, "beta": 0.9}


# ---------------------------------------------------------------- shared by workers and references

def make_model() -> nn.Module:
    torch.manual_seed(0)
    # dim 0 of 5, 7 and 3: uneven shards on 2 and 4 ranks (one rank holds no row of the head at 4).
    return nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(30, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def make_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **SGD)
    if method == "sam":  # over AdamW: a nested base state with a scalar (step) beside the per-weight tensors
        return flatmin.SAM(model.parameters(), torch.optim.AdamW, model=model, rho=0.05, lr=0.01, weight_decay=1e-3)
    # ARWP's F (one number per filter, per element of a bias) and the noise generator.
    return flatmin.create(method, model, seed=0, **SGD, **ARWP)


def global_batch(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 2, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def update(opt: torch.optim.Optimizer, model: nn.Module, t: int, rank: int = 0, world: int = 1) -> None:
    x, y = shard(global_batch(t), rank, world)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    if isinstance(opt, WrappedOptimizer):
        opt.step(*[closure] * opt.batches_per_step)
    else:
        opt.zero_grad(set_to_none=True)
        closure()
        opt.step()


# ---------------------------------------------------------------- what the workers run

def sharded(case: str):
    """The model and the optimizer of ``case`` (a method, with " hsdp": replicated over 2 groups of 2)."""
    from torch.distributed.device_mesh import init_device_mesh

    from flatmin.distributed.fsdp import process_group_mesh, shard_model

    hsdp = case.endswith(" hsdp")
    mesh = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else process_group_mesh(torch.device("cpu")))
    model = shard_model(make_model(), mesh)
    return model, make_optimizer(case.split()[0], model)


def full_weights(model: nn.Module):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def write_and_continue(case: str, env, out: Path):
    """Train to CUT, write a full-state checkpoint, train on to STEPS."""
    from flatmin.distributed.fsdp import full_model_state, full_optimizer_state

    model, opt = sharded(case)
    for t in range(CUT):
        update(opt, model, t, env.rank, env.world_size)
    checkpoint = {"model": full_model_state(model), "optimizer": full_optimizer_state(opt)}
    if env.rank == 0:
        torch.save(checkpoint, out / f"checkpoint-{case}.pt")
    for t in range(CUT, STEPS):
        update(opt, model, t, env.rank, env.world_size)
    return {"params": full_weights(model), "state": full_optimizer_state(opt), "checkpoint": checkpoint}


def resume(case: str, env, out: Path):
    """Load the checkpoint another launch wrote (in the parent folder) and train on to STEPS, on a
    1-D mesh whatever mesh wrote it."""
    from flatmin.distributed.fsdp import full_optimizer_state, load_full_model_state, load_full_optimizer_state

    model, opt = sharded(case.split()[0])
    checkpoint = torch.load(out.parent / f"checkpoint-{case}.pt", weights_only=True)
    load_full_model_state(model, checkpoint["model"])
    load_full_optimizer_state(opt, checkpoint["optimizer"])
    locals_ok = all(isinstance(s, torch.distributed.tensor.DTensor)
                    for entry in opt.state.values() for s in entry.values() if s.ndim > 0)
    if isinstance(opt, WrappedOptimizer):
        locals_ok = locals_ok and all(isinstance(s, torch.distributed.tensor.DTensor)
                                      for entry in opt.base_optimizer.state.values() for s in entry.values()
                                      if s.ndim > 0)
    for t in range(CUT, STEPS):
        update(opt, model, t, env.rank, env.world_size)
    return {"params": full_weights(model), "state": full_optimizer_state(opt), "sharded_state": locals_ok}


SCENARIOS = {**{f"write {c}": functools.partial(write_and_continue, c) for c in CASES},
             **{f"resume {c}": functools.partial(resume, c) for c in CASES}}


@pytest.fixture(scope="module")
def four_then_two(tmp_path_factory):
    """Rank 0's results of the 4-process run that writes the checkpoints and of the 2-process resume."""
    out = tmp_path_factory.mktemp("fsdp_four")
    written = launch(__file__, 4, [f"write {c}" for c in CASES], out)[0]
    (out / "resume").mkdir()
    resumed = launch(__file__, 2, [f"resume {c}" for c in CASES], out / "resume")[0]
    return written, resumed


def reference(method: str):
    """The unsharded model in one process on the whole global batches."""
    model = make_model()
    opt = make_optimizer(method, model)
    states = {}
    for t in range(STEPS):
        if t == CUT:
            states["checkpoint"] = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
        update(opt, model, t)
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict(), **states}


# ---------------------------------------------------------------- the tests

@needs_fsdp2
@pytest.mark.parametrize("case", CASES)
def test_resume_on_two_processes_from_four_ends_on_the_uninterrupted_weights(four_then_two, case):
    written, resumed = four_then_two
    written, resumed = written[f"write {case}"], resumed[f"resume {case}"]
    assert resumed["sharded_state"]  # the loaded state is sharded like the parameters, not whole
    assert_close(resumed["params"], written["params"], "params")
    assert_close(resumed["state"], written["state"])


@needs_fsdp2
@pytest.mark.parametrize("case", CASES)
def test_sharded_runs_and_their_checkpoint_equal_the_unsharded_run(four_then_two, case):
    # The checkpoint holds what an unsharded run's state_dict holds: same names, shapes and values.
    ref = reference(case.split()[0])
    written = four_then_two[0][f"write {case}"]
    assert_close(written["checkpoint"], ref["checkpoint"], "checkpoint")
    assert_close(written["params"], ref["params"], "params")
    assert_close(four_then_two[1][f"resume {case}"]["state"], ref["state"])


def test_blocks_are_the_repeated_units():
    from flatmin.distributed.fsdp import find_blocks
    from flatmin.models.resnet import BasicBlock

    resnet = create_model("resnet18", 10, (3, 32, 32))
    blocks = find_blocks(resnet)
    assert [type(b) for b in blocks] == [nn.Conv2d] + [BasicBlock] * 8 + [nn.Linear]  # stem conv, blocks, head
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))
    assert [type(b) for b in find_blocks(encoder)] == [nn.Linear, nn.TransformerEncoder]
    assert [type(b) for b in find_blocks(encoder[1])] == [nn.TransformerEncoderLayer] * 3
    # An MLP's Linear layers; BatchNorm alone is no block; a model without containers is one unit.
    assert [type(b) for b in find_blocks(create_model("mlp", 10, (64,)))] == [nn.Linear] * 3
    assert find_blocks(nn.Linear(3, 2)) == [] and find_blocks(resnet.stages[0][0]) == []


# ---------------------------------------------------------------- flatmin train --fsdp

QUICK = dict(data="digits", model="mlp", epochs=2, batch_size=128, progress="none")


def assert_same_run(a, b, atol):
    """Two checkpoints of one run: weights, buffers and optimizer state to ``atol``, the generator exactly."""
    torch.testing.assert_close(a["model"], b["model"], atol=atol, rtol=0)
    for section in (a["optimizer"], a["optimizer"].get("base_optimizer")):
        if section is not None:
            other = b["optimizer"] if section is a["optimizer"] else b["optimizer"]["base_optimizer"]
            torch.testing.assert_close(section["state"], other["state"], atol=atol, rtol=0)
    if "generator" in a["optimizer"]:
        assert torch.equal(a["optimizer"]["generator"], b["optimizer"]["generator"])


@needs_fsdp2
def test_one_process_fsdp_run_equals_the_plain_run_and_resumes_unsharded(tmp_path):
    plain = train(TrainConfig(**QUICK, method="arwp", flatness=1, out=str(tmp_path / "plain")))
    sharded_run = train(TrainConfig(**QUICK, method="arwp", fsdp=True, flatness=1, out=str(tmp_path / "fsdp")))
    for key in ("test_acc", "train_loss", "hessian_top", "hessian_trace"):  # the Hessian on a gathered copy
        assert sharded_run[key] == pytest.approx(plain[key], rel=1e-5), key
    plain_checkpoint = load_checkpoint(tmp_path / "plain")
    assert_same_run(load_checkpoint(tmp_path / "fsdp"), plain_checkpoint, atol=1e-6)
    # Stopped sharded, resumed unsharded: the checkpoint is the same either way.
    train(TrainConfig(**QUICK, method="arwp", fsdp=True, stop_after=1, out=str(tmp_path / "cut")))
    train(TrainConfig(**QUICK, method="arwp", out=str(tmp_path / "cut")), resume=str(tmp_path / "cut"))
    assert_same_run(load_checkpoint(tmp_path / "cut"), plain_checkpoint, atol=1e-6)


@needs_fsdp2
def test_one_process_fsdp_nrs_equals_the_plain_run(tmp_path):
    # Sharded, NRS backpropagates its two branches itself (at w + ε in place, then at w); the plain
    # run evaluates the neighbour functionally. Same loss, same noise: the same weights.
    for fsdp in (False, True):
        train(TrainConfig(**{**QUICK, "epochs": 1}, method="nrs", fsdp=fsdp, out=str(tmp_path / str(fsdp))))
    sharded_run, plain = load_checkpoint(tmp_path / "True"), load_checkpoint(tmp_path / "False")
    assert_same_run(sharded_run, plain, atol=1e-6)
    assert torch.equal(sharded_run["nrs"]["generator"], plain["nrs"]["generator"])


CLI_METHOD = "arwp"
# An evaluation batch of 673 splits the 1347 training samples 2 batches : 1 between the ranks, so the
# sharded evaluation must pad rank 1 with a forward (a deadlock otherwise).
CLI = ["--method", CLI_METHOD, "--epochs", "2", "--eval-batch-size", "673"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_cli") / "full"
    code, log = torchrun(*CLI, "--fsdp", "--out", str(out))
    assert code == 0, log
    return out


def shapes(obj):
    """The structure of a checkpoint entry with every tensor replaced by its dtype and shape."""
    if isinstance(obj, dict):
        return {key: shapes(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [shapes(value) for value in obj]
    return (obj.dtype, tuple(obj.shape)) if isinstance(obj, torch.Tensor) else type(obj)


@needs_fsdp2
def test_fsdp_cli_writes_the_ddp_format_and_ends_on_the_ddp_weights(fsdp_run, tmp_path):
    code, log = torchrun(*CLI, "--out", str(tmp_path / "ddp"))
    assert code == 0, log
    ddp = tmp_path / "ddp"
    summaries = [json.loads((run / "summary.json").read_text()) for run in (fsdp_run, ddp)]
    assert summaries[0].keys() == summaries[1].keys() and summaries[0]["completed"]
    assert (summaries[0]["config"]["fsdp"], summaries[1]["config"]["fsdp"]) == (True, False)
    assert summaries[0]["workers"] == 2
    # Every training and test sample counted once across the ranks, the padding forward not at all.
    assert abs(summaries[0]["train_acc"] * 1347 - round(summaries[0]["train_acc"] * 1347)) < 1e-6
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (fsdp_run, ddp)]
    assert [list(r) for r in rows[0]] == [list(r) for r in rows[1]] and len(rows[0]) == 2
    checkpoints = [load_checkpoint(run) for run in (fsdp_run, ddp)]
    assert shapes({k: v for k, v in checkpoints[0].items() if k != "config"}) == \
        shapes({k: v for k, v in checkpoints[1].items() if k != "config"})
    # The same noise and the same mean gradient either way, and both keep rank 0's running statistics.
    assert_same_run(checkpoints[0], checkpoints[1], atol=1e-5)


@needs_fsdp2
def test_fsdp_cli_stop_and_resume_ends_on_the_uninterrupted_weights(fsdp_run, tmp_path):
    cut = tmp_path / "cut"
    code, log = torchrun(*CLI, "--fsdp", "--stop-after", "1", "--out", str(cut))
    assert code == 0, log
    assert load_checkpoint(cut)["epoch"] == 1
    code, log = torchrun("--resume", str(cut / "checkpoint.pt"))
    assert code == 0, log
    full, resumed = load_checkpoint(fsdp_run), load_checkpoint(cut)
    assert_identical(resumed["model"], full["model"], "model")
    assert_identical(resumed["optimizer"], full["optimizer"], "optimizer")


if __name__ == "__main__":
    serve(lambda env, names: {name: SCENARIOS[name](env, Path(sys.argv[1])) for name in names})
