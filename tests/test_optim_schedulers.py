"""Every learning-rate scheduler of torch.optim.lr_scheduler on every method: the sequence of
learning rates, momenta and betas equals the one the same scheduler gives the plain base
optimizer, and the scheduled values reach the base step (at σ = 0, ρ = 0 or λ = 0, where the
method's update is the plain update exactly)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as S

import flatmin

STEPS = 7
METHODS = {  # each method with the hyperparameter that makes its update the base optimizer's own
    "rwp": {"sigma": 0.0},
    "arwp": {"sigma": 0.0},
    "m-rwp": {"lam": 0.0},
    "m-arwp": {"lam": 0.0},
    "sam": {"rho": 0.0},
    "asam": {"rho": 0.0},
}
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),  # momentum not passed: SGD's default 0 is still a momentum
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
}
SCHEDULERS = {
    "LambdaLR": lambda opt: S.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    "MultiplicativeLR": lambda opt: S.MultiplicativeLR(opt, lambda t: 0.9),
    "StepLR": lambda opt: S.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: S.MultiStepLR(opt, milestones=[1, 4], gamma=0.3),
    "ConstantLR": lambda opt: S.ConstantLR(opt, factor=0.5, total_iters=3),
    "LinearLR": lambda opt: S.LinearLR(opt, start_factor=0.2, total_iters=4),
    "ExponentialLR": lambda opt: S.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt: S.PolynomialLR(opt, total_iters=5, power=2.0),
    "CosineAnnealingLR": lambda opt: S.CosineAnnealingLR(opt, T_max=5),
    "CosineAnnealingWarmRestarts": lambda opt: S.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2),
    "CyclicLR": lambda opt: S.CyclicLR(opt, base_lr=0.001, max_lr=0.05, step_size_up=2, cycle_momentum=True),
    "OneCycleLR": lambda opt: S.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS, cycle_momentum=True),
    "OneCycleLR-no-momentum": lambda opt: S.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS, cycle_momentum=False),
    "ReduceLROnPlateau": lambda opt: S.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    "SequentialLR": lambda opt: S.SequentialLR(
        opt, [S.LinearLR(opt, start_factor=0.5, total_iters=2), S.ExponentialLR(opt, gamma=0.7)], milestones=[3]),
    "ChainedScheduler": lambda opt: S.ChainedScheduler(
        [S.ConstantLR(opt, factor=0.5, total_iters=2), S.ExponentialLR(opt, gamma=0.9)], optimizer=opt),
}


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))


def closure_on(model, batch):
    def closure():
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss
    return closure


def scheduled(opt):
    """What a scheduler may set, per group."""
    return [(g["lr"], g.get("momentum"), g.get("betas")) for g in opt.param_groups]


def run(build, scheduler, method):
    """(per step: the scheduled values; the weights at the end) of ``STEPS`` updates."""
    model, batch = model_and_batch()
    opt = build(model)
    sched = SCHEDULERS[scheduler](opt)
    seen = []
    for step in range(STEPS):
        seen.append(scheduled(opt))
        if method is None:
            opt.zero_grad()
            opt.step(closure_on(model, batch))
        elif opt.batches_per_step == 2:
            opt.step(closure_on(model, batch), closure_on(model, batch))
        else:
            opt.step(closure_on(model, batch))
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(1.0)  # a metric that never improves: the learning rate drops every other step
        else:
            sched.step()
    return seen, [p.detach().clone() for p in model.parameters()]


# The schedulers that read momentum or betas on every base; the others each on one base, in turn.
CASES = [(scheduler, base) for k, scheduler in enumerate(SCHEDULERS)
         for base in (BASES if scheduler.startswith(("CyclicLR", "OneCycleLR")) else [list(BASES)[k % len(BASES)]])]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("scheduler, base", CASES)
def test_every_scheduler_schedules_every_method_as_it_does_the_base_optimizer(scheduler, method, base):
    cls, hp = BASES[base]
    want_seen, want_w = run(lambda m: cls(m.parameters(), **hp), scheduler, None)
    got_seen, got_w = run(lambda m: flatmin.create(method, m, base=cls, seed=0, **METHODS[method], **hp),
                          scheduler, method)
    assert got_seen == want_seen
    assert len({s[0][0] for s in want_seen}) > 1  # the scheduler did change the learning rate
    for got, want in zip(got_w, want_w):
        assert torch.equal(got, want)  # the scheduled values reached the base step, exactly


@pytest.mark.parametrize("method", list(METHODS))
def test_the_wrapper_defaults_hold_the_base_optimizers_defaults(method):
    model, _ = model_and_batch()
    for cls, hp in BASES.values():
        opt = flatmin.create(method, model, base=cls, seed=0, **hp)
        plain = cls(model.parameters(), **hp)
        for name, value in plain.defaults.items():
            assert opt.defaults[name] == value
            assert opt.param_groups[0][name] == plain.param_groups[0][name]
        assert set(METHODS[method]) <= set(opt.defaults)
        assert "momentum" not in repr(opt) or "momentum" in hp  # repr shows what was passed


def test_one_cycle_over_adamw_cycles_beta1_of_the_base_step():
    """The issue's example: OneCycleLR over RWP(AdamW) with momentum cycling."""
    model, batch = model_and_batch()
    opt = flatmin.RWP(model.parameters(), torch.optim.AdamW, lr=1e-3, seed=0)
    sched = S.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    beta1 = []
    for _ in range(5):
        opt.step(closure_on(model, batch))
        sched.step()
        beta1.append(opt.base_optimizer.param_groups[0]["betas"][0])
    assert len(set(beta1)) == 5 and max(beta1) < 0.95
