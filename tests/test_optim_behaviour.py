"""Behaviour of the optimizers around the maths: running statistics, exceptions, non-finite
gradients, validation, resuming, AMP, accumulation, base optimizers and state size.
The maths itself is checked against plain re-computations in test_optim_reference.py."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin.diagnostics import StepTracker

ALL = ["sgd", "sam", "asam", "rwp", "arwp", "m-rwp", "m-arwp"]
PERTURBING = ALL[1:]
HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def make_model(seed: int = 0, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(device)


def batches(n: int, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=g).to(device), torch.randint(0, 3, (12,), generator=g).to(device))
            for _ in range(n)]


def closure_on(model, x, y, log=None):
    def closure():
        if log is not None:
            log.append(x)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def run_step(opt, model, b1, b2=None):
    if getattr(opt, "batches_per_step", 1) == 2:
        return opt.step(closure_on(model, *b1), closure_on(model, *(b2 or b1)))
    if isinstance(opt, flatmin.optim.WrappedOptimizer):
        return opt.step(closure_on(model, *b1))
    opt.zero_grad()
    return opt.step(closure_on(model, *b1))


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def make(name, model, **kw):
    extra = {} if name == "sgd" else {"seed": 0}
    return flatmin.create(name, model, **HP, **extra, **kw)


# ---------------------------------------------------------------- running statistics

def bn_of(model):
    return model[1]


def reference_stats(model, xs):
    """Running statistics after clean train-mode forwards of ``xs`` on a copy of the model."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for x in xs:
            ref(x)
    return bn_of(ref)


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_mixed_methods_update_running_stats_in_the_clean_pass_only(name):
    model = make_model()
    (b1, b2) = batches(2)
    expected = reference_stats(model, [b1[0]])
    opt = make(name, model)
    opt.step(closure_on(model, *b1), closure_on(model, *b2))
    bn = bn_of(model)
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_updates_running_stats_in_the_first_pass_only(name):
    model = make_model()
    (b1,) = batches(1)
    expected = reference_stats(model, [b1[0]])
    opt = make(name, model)
    opt.step(closure_on(model, *b1))
    torch.testing.assert_close(bn_of(model).running_mean, expected.running_mean)
    assert int(bn_of(model).num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["rwp", "arwp"])
def test_single_pass_methods_update_running_stats_once(name):
    model = make_model()
    (b1,) = batches(1)
    before = bn_of(model).running_mean.clone()
    make(name, model).step(closure_on(model, *b1))
    assert int(bn_of(model).num_batches_tracked) == 1
    assert not torch.equal(bn_of(model).running_mean, before)


def test_without_model_the_perturbed_pass_also_updates_running_stats():
    """Documented: without model= the optimizer cannot see the normalisation layers."""
    model = make_model()
    b1, b2 = batches(2)
    opt = flatmin.MRWP(model.parameters(), torch.optim.SGD, lr=0.1, seed=0)
    opt.step(closure_on(model, *b1), closure_on(model, *b2))
    assert int(bn_of(model).num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_mixed_methods_use_two_batches_when_given_two_and_one_when_given_one(name):
    model = make_model()
    b1, b2 = batches(2)
    opt = make(name, model)
    seen = []
    opt.step(closure_on(model, *b1, log=seen), closure_on(model, *b2, log=seen))
    assert len(seen) == 2 and {id(x) for x in seen} == {id(b1[0]), id(b2[0])}
    seen.clear()
    opt.step(closure_on(model, *b1, log=seen))
    assert len(seen) == 2 and all(x is b1[0] for x in seen)


def test_frozen_norm_stats_restores_instance_norm_buffers_and_batchnorm_flags():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True), nn.BatchNorm1d(4))
    x = torch.randn(5, 2, 9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with flatmin.frozen_norm_stats(model):
        model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[2].track_running_stats and model[1].track_running_stats
    model(x)
    assert not torch.equal(model[2].running_mean, before["2.running_mean"])


# ---------------------------------------------------------------- exceptions

class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", PERTURBING)
def test_exception_in_a_closure_leaves_weights_unperturbed_and_optimizer_usable(name, exact, device):
    model = make_model(device=device)
    b1, b2 = batches(2, device=device)
    opt = make(name, model, exact_restore=exact)
    run_step(opt, model, b1, b2)  # non-trivial state (momentum, ARWP statistics)
    before = weights(model)
    calls = []

    def failing():
        calls.append(1)
        loss = F.cross_entropy(model(b2[0]), b2[1])
        loss.backward()
        # Fail in the second pass (perturbed for SAM, clean for the mixed methods) or the only one.
        if len(calls) == opt.grads_per_step:
            raise Boom("closure failed")
        return loss

    with pytest.raises(Boom):
        if opt.batches_per_step == 2:
            opt.step(failing, failing)
        else:
            opt.step(failing)
    for p, w in zip(model.parameters(), before):
        if exact:
            assert torch.equal(p, w)
        else:
            torch.testing.assert_close(p, w, rtol=0, atol=1e-6)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            assert module.track_running_stats
    for p in model.parameters():
        assert not p._backward_hooks
    run_step(opt, model, b1, b2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), before))


@pytest.mark.parametrize("name", PERTURBING)
def test_exception_in_the_first_pass_leaves_weights_bit_identical(name):
    model = make_model()
    (b1,) = batches(1)
    opt = make(name, model)
    before = weights(model)

    def failing():
        raise Boom("before backward")

    with pytest.raises(Boom):
        opt.step(failing)
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- non-finite

@pytest.mark.parametrize("name", PERTURBING)
def test_non_finite_gradient_skips_the_update_with_a_warning(name, device):
    model = make_model(device=device)
    b1, b2 = batches(2, device=device)
    opt = make(name, model)
    run_step(opt, model, b1, b2)
    before = weights(model)
    base_state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    own_state = copy.deepcopy(opt.state_dict()["state"])

    def nan_closure():
        loss = F.cross_entropy(model(b1[0]), b1[1]) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        if opt.batches_per_step == 2:
            opt.step(nan_closure, nan_closure)
        else:
            opt.step(nan_closure)
    assert opt.skipped_steps == 1
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)
    after_base = opt.base_optimizer.state_dict()["state"]
    for k, v in base_state.items():
        for name_, t in v.items():
            assert torch.equal(after_base[k][name_], t)
    after_own = opt.state_dict()["state"]
    for k, v in own_state.items():
        assert torch.equal(after_own[k]["F"], v["F"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_step(opt, model, b1, b2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (flatmin.RWP, {"sigma": -0.1}, "sigma=-0.1"),
        (flatmin.RWP, {"sigma": float("nan")}, "sigma=nan"),
        (flatmin.ARWP, {"eta": -1.0}, "eta=-1.0"),
        (flatmin.ARWP, {"beta": 1.0}, "beta=1.0"),
        (flatmin.ARWP, {"beta": -0.5}, "beta=-0.5"),
        (flatmin.MRWP, {"lam": 1.5}, "lam=1.5"),
        (flatmin.MARWP, {"lam": -0.1}, "lam=-0.1"),
        (flatmin.MARWP, {"beta": 2}, "beta=2"),
        (flatmin.SAM, {"rho": -0.05}, "rho=-0.05"),
    ],
)
def test_invalid_hyperparameters_name_the_value_and_the_range(cls, kwargs, needle):
    model = make_model()
    with pytest.raises(ValueError) as info:
        cls(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    assert needle in str(info.value) and ("[" in str(info.value) or "(" in str(info.value))


def test_invalid_values_in_a_later_param_group_are_rejected():
    model = make_model()
    opt = flatmin.ARWP(list(model.parameters())[:2], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="beta=1.5"):
        opt.add_param_group({"params": list(model.parameters())[2:], "beta": 1.5})


def test_add_param_group_reaches_the_base_optimizer():
    model = make_model()
    params = list(model.parameters())
    opt = flatmin.RWP(params[:2], torch.optim.SGD, lr=0.1, momentum=0.9, seed=0)
    opt.add_param_group({"params": params[2:], "sigma": 0.0, "lr": 0.01})
    assert opt.base_optimizer.param_groups is opt.param_groups
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["dampening"] == 0
    (b1,) = batches(1)
    opt.step(closure_on(model, *b1))
    assert opt.base_optimizer.state[params[-1]]["momentum_buffer"] is not None


def test_create_rejects_unknown_names_and_foreign_hyperparameters():
    model = make_model()
    with pytest.raises(ValueError, match="unknown method 'sgdd'.*m-arwp"):
        flatmin.create("sgdd", model, lr=0.1)
    with pytest.raises(ValueError, match="unknown base optimizer 'lbfgs2'"):
        flatmin.create("rwp", model, base="lbfgs2", lr=0.1)
    with pytest.raises(ValueError, match="'rwp' takes no rho"):
        flatmin.create("rwp", model, lr=0.1, rho=0.1)
    with pytest.raises(ValueError, match="'sgd' takes no sigma"):
        flatmin.create("sgd", model, lr=0.1, sigma=0.1)


def test_create_builds_each_method():
    model = make_model()
    kinds = {name: type(flatmin.create(name, model, lr=0.1)).__name__ for name in ALL}
    assert kinds == {"sgd": "SGD", "sam": "SAM", "asam": "SAM", "rwp": "RWP", "arwp": "ARWP",
                     "m-rwp": "MRWP", "m-arwp": "MARWP"}
    assert flatmin.create("asam", model, lr=0.1).param_groups[0]["adaptive"] is True
    assert flatmin.create("sam", model, lr=0.1).param_groups[0]["adaptive"] is False
    assert isinstance(flatmin.create("rwp", model, base="adamw", lr=1e-3).base_optimizer, torch.optim.AdamW)


def test_create_sgd_takes_seed_and_generator_and_draws_nothing():
    """Plain SGD has no noise: seed= and generator= are accepted (one call builds any method) and
    change nothing, neither the update nor torch's global random state."""
    updates = []
    for extra in [{}, {"seed": 0}, {"generator": torch.Generator().manual_seed(5)}]:
        model = make_model()
        torch.manual_seed(7)
        opt = flatmin.create("sgd", model, **HP, **extra)
        assert type(opt) is torch.optim.SGD and "seed" not in opt.defaults
        run_step(opt, model, batches(1)[0])
        updates.append((weights(model), torch.rand(3)))
    for w, after in updates[1:]:
        assert all(torch.equal(a, b) for a, b in zip(w, updates[0][0]))
        assert torch.equal(after, updates[0][1])
    with pytest.raises(ValueError, match="either seed= or generator="):
        flatmin.create("sgd", make_model(), lr=0.1, seed=1, generator=torch.Generator())


def test_bad_constructor_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer class"):
        flatmin.RWP(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="seed= or generator="):
        flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="closure is required"):
        flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1).step()


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("name", PERTURBING)
def test_resume_from_state_dict_continues_bit_identically(name, device):
    data = batches(12, seed=3, device=device)

    def train(model, opt, sched, pairs):
        for b1, b2 in pairs:
            run_step(opt, model, b1, b2)
            if sched is not None:
                sched.step()

    def build():
        model = make_model(device=device)
        opt = make(name, model)
        sched = flatmin.CosineIncSigma(opt, total_steps=6, inc=10) if "sigma" in opt.param_groups[0] else None
        return model, opt, sched

    pairs = list(zip(data[0::2], data[1::2]))
    model_a, opt_a, sched_a = build()
    train(model_a, opt_a, sched_a, pairs)

    model_b, opt_b, sched_b = build()
    train(model_b, opt_b, sched_b, pairs[:3])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                "sched": sched_b.state_dict() if sched_b else None}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True, map_location=device)

    model_c = make_model(seed=99, device=device)  # different init: everything must come from the checkpoint
    opt_c = flatmin.create(name, model_c, **HP, seed=12345)
    sched_c = flatmin.CosineIncSigma(opt_c, total_steps=6, inc=10) if sched_b else None
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    if sched_c:
        sched_c.load_state_dict(saved["sched"])
    train(model_c, opt_c, sched_c, pairs[3:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    if name in ("arwp", "m-arwp"):
        for p, q in zip(model_a.parameters(), model_c.parameters()):
            assert torch.equal(opt_a.state[p]["F"], opt_c.state[q]["F"])


def test_load_state_dict_rejects_a_plain_optimizer_state():
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not a RWP state_dict"):
        flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1).load_state_dict(plain)


@pytest.mark.parametrize("saved, loaded", [("rwp", "arwp"), ("arwp", "m-arwp"), ("m-rwp", "rwp"),
                                           ("sam", "asam"), ("asam", "sam"), ("m-arwp", "sam")])
def test_load_state_dict_refuses_another_methods_state(saved, loaded):
    model = make_model()
    source = make(saved, model)
    run_step(source, model, *batches(2))
    target = make(loaded, model)
    before = target.state_dict()
    with pytest.raises(ValueError, match=f"saved by method '{saved}'; it cannot be loaded into .*'{loaded}'"):
        target.load_state_dict(source.state_dict())
    assert target.state_dict()["param_groups"] == before["param_groups"]  # nothing was loaded


@pytest.mark.parametrize("name", PERTURBING)
def test_a_state_dict_without_the_method_entry_still_loads(name):
    """Checkpoints written before the method was saved in the state_dict."""
    model = make_model()
    opt = make(name, model)
    run_step(opt, model, *batches(2))
    state = opt.state_dict()
    assert state.pop("method") == name
    other = make(name, make_model())
    other.load_state_dict(state)
    assert other.state_dict()["generator"].equal(state["generator"])


@pytest.mark.parametrize("name", ["arwp", "m-arwp"])
def test_loading_a_state_into_a_running_optimizer_replaces_its_statistics(name):
    """ARWP keeps F in one buffer that state["F"] views: a state loaded mid-run must replace it, so
    that the next updates equal those of a fresh optimizer given the same state."""
    data = batches(10, seed=5)
    pairs = list(zip(data[0::2], data[1::2]))
    model_a = make_model()
    opt_a = make(name, model_a)
    for b1, b2 in pairs[:2]:
        run_step(opt_a, model_a, b1, b2)
    saved_model, saved_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(opt_a.state_dict())
    for b1, b2 in pairs[2:4]:  # F moves on
        run_step(opt_a, model_a, b1, b2)
    # torch's load_state_dict keeps the given tensors: each optimizer gets its own copy
    model_a.load_state_dict(saved_model)
    opt_a.load_state_dict(copy.deepcopy(saved_opt))
    model_b = make_model(seed=7)
    opt_b = make(name, model_b)
    model_b.load_state_dict(saved_model)
    opt_b.load_state_dict(copy.deepcopy(saved_opt))
    for b1, b2 in pairs[2:]:
        run_step(opt_a, model_a, b1, b2)
        run_step(opt_b, model_b, b1, b2)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["F"], opt_b.state[q]["F"])


@pytest.mark.parametrize("name", PERTURBING)
def test_step_hooks_run_once_per_update(name):
    """Global and per-optimizer step hooks run once per update, around it, as torch.optim's do;
    the base optimizer's step is part of the update, not a second one, unless hooks were put on it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = make_model()
    opt = make(name, model)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", type(o).__name__))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", a[0] is opt))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[0] is opt))),
    ]
    try:
        b1, b2 = batches(2)
        run_step(opt, model, b1, b2)
        owner = type(opt).__name__
        assert calls[:2] == [("global pre", owner), ("pre", True)]
        assert calls[-2:] == [("post", True), ("global post", owner)]
        assert len(calls) == 4
        base_calls = []
        opt.base_optimizer.register_step_post_hook(lambda o, a, k: base_calls.append(type(o).__name__))
        calls.clear()
        run_step(opt, model, b1, b2)
        assert base_calls == ["SGD"]  # hooks on the base optimizer itself still run
        assert ("global post", "SGD") in calls
    finally:
        for handle in handles:
            handle.remove()


def test_a_pre_hook_may_replace_the_closure():
    model = make_model()
    opt = make("rwp", model)
    (b1,) = batches(1)
    seen = []

    def replace(o, args, kwargs):
        def closure():
            seen.append(True)
            return closure_on(model, *b1)()
        return (args[0], closure), kwargs

    opt.register_step_pre_hook(replace)
    opt.step(lambda: pytest.fail("the hook's closure should run instead"))
    assert seen == [True]


def test_the_profiler_sees_the_step_by_name_and_nothing_labels_it_otherwise():
    from torch.profiler import ProfilerActivity, profile

    model = make_model()
    opt = make("arwp", model)
    (b1,) = batches(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(closure_on(model, *b1))
    names = [event.name for event in prof.events()]
    assert names.count("Optimizer.step#ARWP.step") == 1


def test_lr_scheduler_on_the_base_optimizer_sees_its_steps():
    model = make_model()
    opt = flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    (b1,) = batches(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be an error
        opt.step(closure_on(model, *b1))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_lr_scheduler_on_the_wrapper_reaches_the_base_optimizer():
    model = make_model()
    opt = flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    (b1,) = batches(1)
    opt.step(closure_on(model, *b1))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# ---------------------------------------------------------------- AMP and accumulation

@pytest.mark.parametrize("name", ["rwp", "arwp", "m-arwp", "sam", "asam"])
def test_grad_scaler_gives_the_unscaled_update(name, device):
    """A GradScaler only changes the representation of the gradient: the update, and ARWP's
    statistics, match a run without it (the scale is a power of two, so up to rounding)."""
    b1, b2 = batches(2, device=device)
    results = []
    for use_scaler in (False, True):
        model = make_model(device=device)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if use_scaler else None
        opt = make(name, model, grad_scaler=scaler)

        def closure_for(x, y):
            def closure():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
                    loss = F.cross_entropy(model(x), y)
                (scaler.scale(loss) if scaler else loss).backward()
                return loss
            return closure

        for _ in range(3):
            if opt.batches_per_step == 2:
                opt.step(closure_for(*b1), closure_for(*b2))
            else:
                opt.step(closure_for(*b1))
            if scaler:
                scaler.update()
        results.append((weights(model), [opt.state[p].get("F") for p in model.parameters()]))
    for w, v in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)
    for f, g in zip(results[0][1], results[1][1]):
        if f is not None:
            torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-10)


def test_grad_scaler_overflow_is_skipped_silently_and_lowers_the_scale():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = flatmin.ARWP(model.parameters(), torch.optim.SGD, lr=0.1, seed=0, grad_scaler=scaler)
    before = weights(model)
    (b1,) = batches(1)

    def closure():
        loss = F.cross_entropy(model(b1[0]), b1[1])
        scaler.scale(loss * float("inf")).backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)
    assert all("F" not in opt.state[p] for p in model.parameters())


def test_autocast_bfloat16_closure_trains(device):
    model = make_model(device=device)
    opt = flatmin.create("m-arwp", model, lr=0.1, momentum=0.9, seed=0)
    b1, b2 = batches(2, device=device)

    def closure_for(x, y):
        def closure():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    first = float(opt.step(closure_for(*b1), closure_for(*b2)).detach())
    for _ in range(20):
        last = float(opt.step(closure_for(*b1), closure_for(*b2)).detach())
    assert last < first


@pytest.mark.parametrize("zeroing", [False, True], ids=["plain", "zeroing first"])
@pytest.mark.parametrize("name", ["rwp", "m-rwp", "m-arwp", "sam"])
def test_gradient_accumulation_inside_the_closure_matches_the_full_batch(name, zeroing):
    # Several backward calls in one closure sum their micro-batches; a closure may also zero the
    # gradients once before them (the mixed methods hold their perturbed term meanwhile).
    (b1,) = batches(1)
    x, y = b1
    results = []
    for chunks in (1, 3):
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))  # no BN: chunking changes BN
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        extra = {"lam": 0.6} if name.startswith("m-") else {}
        opt = flatmin.create(name, model, lr=0.1, momentum=0.9, seed=0, **extra)

        def closure():
            if zeroing and chunks > 1:
                model.zero_grad(set_to_none=False)
            total = 0.0
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
                loss = F.cross_entropy(model(xc), yc, reduction="sum") / len(x)
                loss.backward()
                total += loss.detach()
            return total

        for _ in range(3):
            opt.step(closure)
        results.append(weights(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


ZEROING = {
    "opt.zero_grad()": lambda opt, model: opt.zero_grad(),
    "opt.zero_grad(set_to_none=False)": lambda opt, model: opt.zero_grad(set_to_none=False),
    "model.zero_grad()": lambda opt, model: model.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda opt, model: model.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("how", list(ZEROING))
@pytest.mark.parametrize("name", PERTURBING)
def test_a_closure_that_zeroes_gradients_gives_the_same_update(name, how):
    # Lightning's closure zeroes .grad between its forward and its backward; so do hand-written
    # loops. The mixed methods hold the perturbed term while the clean closure runs: it must survive.
    zero = ZEROING[how]
    results = []
    for zeroing in (False, True):
        model = make_model()
        opt = make(name, model, lam=0.7) if name.startswith("m-") else make(name, model)

        def closure_for(x, y):
            def closure():
                loss = F.cross_entropy(model(x), y)
                if zeroing:
                    zero(opt, model)
                loss.backward()
                return loss
            return closure

        for b1, b2 in zip(batches(3, seed=1), batches(3, seed=2)):
            if opt.batches_per_step == 2:
                opt.step(closure_for(*b1), closure_for(*b2))
            else:
                opt.step(closure_for(*b1))
        results.append((weights(model), [b.clone() for b in model.buffers()], opt.state_dict()))
    (w_plain, b_plain, s_plain), (w_zero, b_zero, s_zero) = results
    for a, b in zip(w_plain + b_plain, w_zero + b_zero):
        assert torch.equal(a, b)
    torch.testing.assert_close(s_zero["state"], s_plain["state"], rtol=0, atol=0)


def mixed_run(build, backward, steps=3):
    """The weights after ``steps`` mixed updates of ``build(model)`` on the usual batches, with
    closures whose backward is ``backward(model, opt, loss)``."""
    model = make_model()
    opt = build(model)

    def closure_for(x, y):
        def closure():
            loss = F.cross_entropy(model(x), y)
            backward(model, opt, loss)
            return loss
        return closure

    for b1, b2 in zip(batches(steps, seed=1), batches(steps, seed=2)):
        opt.step(closure_for(*b1), closure_for(*b2))
    return weights(model)


def plain_backward(model, opt, loss):
    loss.backward()


def assigned_backward(model, opt, loss):
    params = list(model.parameters())
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g


def zeroing_backward(model, opt, loss):
    opt.zero_grad()
    loss.backward()


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_mixed_update_when_the_closure_assigns_grad_itself(name):
    # Some frameworks (sharded data parallelism, hand-written loops) set .grad without autograd's
    # accumulation, so no accumulation hook runs: the perturbed term must still be added.
    def build(model):
        return make(name, model, lam=0.3)

    for a, b in zip(mixed_run(build, plain_backward), mixed_run(build, assigned_backward)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_mixed_update_with_a_lam_one_group_and_a_zeroing_closure(name):
    # A group with λ = 1 drops its clean gradient; a zeroing closure must not change that either.
    def build(model):
        head = list(model[3].parameters())
        body = [p for p in model.parameters() if all(p is not h for h in head)]
        cls = flatmin.MARWP if name == "m-arwp" else flatmin.MRWP
        return cls([{"params": body}, {"params": head, "lam": 1.0}], torch.optim.SGD, model=model, seed=0,
                   lam=0.4, **HP)

    for a, b in zip(mixed_run(build, plain_backward, steps=2), mixed_run(build, zeroing_backward, steps=2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", PERTURBING)
def test_a_gradient_computed_outside_step_is_refused_not_discarded(name):
    # A backward before step() (Lightning's accumulating batches) would be thrown away by the step.
    model = make_model()
    opt = make(name, model)
    (x, y), = batches(1)
    before = weights(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"\.grad holds a gradient computed outside step\(\)"):
        run_step(opt, model, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    # zero_grad first, or touching only what the last step left, is fine; so is a failed step.
    opt.zero_grad()
    run_step(opt, model, (x, y))
    opt.zero_grad(set_to_none=False)
    run_step(opt, model, (x, y))
    for p in model.parameters():
        p.grad.mul_(2.0)  # e.g. a scaler unscaling, a logger clipping: the same tensors
    run_step(opt, model, (x, y))

    def failing():
        F.cross_entropy(model(x), y).backward()
        raise KeyError("boom")
    with pytest.raises(KeyError):
        opt.step(failing, failing) if opt.batches_per_step == 2 else opt.step(failing)
    run_step(opt, model, (x, y))


def test_a_step_without_closure_names_the_trainer_integrations():
    opt = make("rwp", make_model())
    with pytest.raises(ValueError, match=r"closure is required.*FlatminTrainer for Hugging Face"):
        opt.step()


def test_create_takes_parameter_groups():
    model = make_model()
    head = list(model[3].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = flatmin.create("m-arwp", model, params=[{"params": body}, {"params": head, "sigma": 0.0}], seed=0, lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [len(body), len(head)]
    assert [g["sigma"] for g in opt.param_groups] == [0.015, 0.0] and opt.model is model


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_with_sgd_and_adamw(name, base, device):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    x, y = x.to(device), y.to(device)
    model = make_model(device=device)
    lr = 0.1 if base == "sgd" else 0.01
    extra = {} if name == "sgd" else {"seed": 0}
    opt = flatmin.create(name, model, base=base, lr=lr, **extra)
    losses = [float(run_step(opt, model, (x, y)).detach()) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- state size

def test_arwp_state_is_one_number_per_filter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    opt = flatmin.MARWP(model.parameters(), torch.optim.SGD, model=model, lr=0.1, seed=0)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    opt.step(closure_on(model, x, y))
    for p in model.parameters():
        assert set(opt.state[p]) == {"F"}
        expected = p.shape[0] if p.ndim >= 2 else p.numel()
        assert opt.state[p]["F"].shape == (expected,)


@pytest.mark.parametrize("name", PERTURBING)
def test_no_weight_copy_or_gradient_buffer_is_kept_between_steps(name):
    model = make_model()
    b1, b2 = batches(2)
    opt = make(name, model)
    run_step(opt, model, b1, b2)
    param_sizes = {p.numel() for p in model.parameters() if p.ndim >= 2}
    for p in model.parameters():
        for value in opt.state[p].values():
            if p.ndim >= 2:
                assert value.numel() not in param_sizes or value.numel() == p.shape[0]


# ---------------------------------------------------------------- transient memory

def _memory_model():
    torch.manual_seed(0)
    # One dominant tensor (1024x1024, 4 MiB) so "one transient of the largest tensor" is sharp.
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.BatchNorm1d(1024),
                         nn.ReLU(), nn.Linear(1024, 10))


def _step_peak(name, passes=1, **kw):
    model = _memory_model()
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            for _ in range(passes):  # passes=2: plain gradient accumulation over two batches
                closure()
            opt.step()
    else:
        opt = flatmin.create(name, model, lr=0.01, momentum=0.9, seed=0, **kw)

        def step():
            opt.step(closure, closure) if opt.batches_per_step == 2 else opt.step(closure)

    step()
    step()  # momentum buffers and ARWP state exist: measure a steady-state step
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tracker = StepTracker()
    with tracker:
        step()
    return tracker.peak_bytes, largest, total


def test_transient_memory_of_each_method():
    """Peak live memory of one step over plain SGD's, measured op by op (flatmin.diagnostics)."""
    sgd, largest, total = _step_peak("sgd")
    sgd_two_batches, _, _ = _step_peak("sgd", passes=2)
    slack = 64 * 1024  # per-filter scales, norms and ARWP statistics: a few KiB here
    for name in ("rwp", "arwp"):
        peak, _, _ = _step_peak(name)
        assert peak - sgd <= largest + slack, (name, peak - sgd, largest)
    for name in ("m-rwp", "m-arwp"):
        # Two passes accumulate into .grad as plain gradient accumulation does; beyond that, only
        # the transient noise: no buffer for either gradient, no copy of the weights.
        peak, _, _ = _step_peak(name)
        assert peak - sgd_two_batches <= largest + slack, (name, peak - sgd_two_batches, largest)
    for name in ("sam", "asam"):
        peak, _, _ = _step_peak(name)
        assert peak - sgd <= total + slack, (name, peak - sgd, total)  # one buffer: ε
    # The tracker does see a copy of the weights: exact_restore keeps one.
    peak, _, _ = _step_peak("rwp", exact_restore=True)
    assert peak - sgd >= total
