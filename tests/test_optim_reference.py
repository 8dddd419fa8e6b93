"""The maths of every method, checked against plain re-computations written in this file from
docs/algorithms.md (nothing here calls flatmin's own helpers such as ``filter_norms`` or ``gaussian_deltas``).

* noise statistics of RWP: per filter, ``ε / (σ·||W_i||)`` is standard normal; 1-D tensors use one
  scale ``σ·||W||``; an all-zero tensor is perturbed by (the floor times) zero, never NaN;
* ARWP: the per-filter statistic ``F`` and the shrunk noise ``σ·s·z / sqrt(1 + η·F)``;
* the update of RWP, ARWP, m-RWP, m-ARWP, SAM and ASAM against a hand-written reference built with
  ``torch.func.functional_call`` and ``torch.autograd.grad`` and a hand-written SGD / AdamW;
* the CosineInc σ schedule.

Behaviour around the maths (running statistics, exceptions, resuming, ...) is in
test_optim_behaviour.py.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import flatmin

FLOOR = 1e-16  # docs/algorithms.md, "Filter-wise scale": s is floored at 1e-16


# ------------------------------------------------------ plain re-computations of docs/algorithms.md

def ref_s(w):
    """s(W) from docs/algorithms.md: the 2-norm of each slice along dim 0 for ndim >= 2 (broadcast over the
    slice), one 2-norm of the whole tensor for ndim <= 1; floored at 1e-16."""
    w = w.detach()
    if w.dim() >= 2:
        rows = w.reshape(w.shape[0], -1)
        per_filter = torch.sqrt((rows * rows).sum(dim=1)).clamp(min=FLOOR)
        return per_filter.reshape([w.shape[0]] + [1] * (w.dim() - 1))
    return torch.sqrt((w * w).sum()).clamp(min=FLOOR)


def ref_sq_sums(g):
    """ARWP's per-step statistic, in float64: Σ_{j in filter i} g_j² for ndim >= 2 (one number per
    filter), g² elementwise for ndim <= 1."""
    g = g.detach().double()
    if g.dim() >= 2:
        return (g.reshape(g.shape[0], -1) ** 2).sum(dim=1)
    return g * g


def ref_shrink(F_, w):
    """sqrt(1 + η·F) laid out to broadcast over w (per filter for ndim >= 2, elementwise else);
    ``F_`` already multiplied by η."""
    root = torch.sqrt(1.0 + F_)
    if w.dim() >= 2:
        return root.reshape([w.shape[0]] + [1] * (w.dim() - 1))
    return root


def copy_generator(opt):
    """A fresh generator in the state the optimizer's generator has now (on its device): it draws the same z."""
    gen = torch.Generator(device=opt.generator.device)
    gen.set_state(opt.generator.get_state())
    return gen


def draw_z(gen, tensors):
    """z ~ N(0, I) for each tensor, as the optimizer draws them: the budget is the largest tensor's
    bytes but at least 1 MiB; the largest tensors that fit in it together (largest first) are kept
    and drawn last, after all the others; consecutive tensors of one dtype share one randn while
    their bytes fit in the budget, and a randn never mixes kept and other tensors."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    budget = max([2**20, *sizes])
    kept, room = set(), budget
    for i in sorted(range(len(tensors)), key=lambda i: -sizes[i]):
        if sizes[i] <= room:
            kept.add(i)
            room -= sizes[i]
    runs = []
    for i in [i for i in range(len(tensors)) if i not in kept] + sorted(kept):
        run = runs[-1] if runs else None
        if (run and (run[0] in kept) == (i in kept) and tensors[run[0]].dtype == tensors[i].dtype
                and sum(sizes[j] for j in run) + sizes[i] <= budget):
            run.append(i)
        else:
            runs.append([i])
    z = [None] * len(tensors)
    for run in runs:
        flat = torch.randn(sum(tensors[i].numel() for i in run), generator=gen, dtype=tensors[run[0]].dtype,
                           device=gen.device)
        for i, part in zip(run, flat.split([tensors[i].numel() for i in run])):
            z[i] = part.view(tensors[i].shape)
    return z


def eps_recorder(params, loss_fn, record):
    """A closure that stores ``p - w`` (the perturbation in force) and ``.grad`` of every param."""
    before = [p.detach().clone() for p in params]

    def closure():
        record["eps"] = [p.detach() - b for p, b in zip(params, before)]
        loss = loss_fn()
        loss.backward()
        record["grad"] = [None if p.grad is None else p.grad.detach().clone() for p in params]
        return loss

    return closure, before


# ---------------------------------------------------------------- 1. noise statistics of RWP

def test_rwp_noise_statistics_per_filter_and_per_tensor(device):
    gen = torch.Generator().manual_seed(123)
    # 64 filters whose norms span four orders of magnitude: a global (not filter-wise) scale, or
    # a scale by the wrong norm, puts most filters far off a unit std.
    target = torch.logspace(-2, 2, 64)
    conv = torch.randn(64, 16, 3, 3, generator=gen)
    conv = conv / conv.reshape(64, -1).norm(dim=1).reshape(64, 1, 1, 1) * target.reshape(64, 1, 1, 1)
    bias = torch.randn(64, generator=gen)
    bias = bias * (3.0 / bias.norm())                   # ||bias|| = 3
    norm_w = 1.0 + 0.2 * torch.randn(16, generator=gen)  # a BatchNorm-like weight
    zero_conv = torch.zeros(4, 3, 3, 3)
    zero_vec = torch.zeros(7)
    params = [nn.Parameter(t.to(device)) for t in (conv, bias, norm_w, zero_conv, zero_vec)]
    sigma = 0.05
    opt = flatmin.RWP(params, torch.optim.SGD, sigma=sigma, seed=0, lr=0.0)  # lr 0: w stays put

    def loss_fn():
        return sum((p * p).sum() for p in params)

    steps = 200
    normed = {0: [], 1: [], 2: []}
    zero_eps = []
    for _ in range(steps):
        record = {}
        closure, before = eps_recorder(params, loss_fn, record)
        opt.step(closure)
        eps = record["eps"]
        normed[0].append(eps[0] / (sigma * before[0].reshape(64, -1).norm(dim=1).reshape(64, 1, 1, 1)))
        normed[1].append(eps[1] / (sigma * before[1].norm()))
        normed[2].append(eps[2] / (sigma * before[2].norm()))
        zero_eps.append((eps[3], eps[4]))
        for p in params[3:]:
            assert torch.equal(p.detach(), torch.zeros_like(p))  # restored exactly, no NaN

    # Tolerances: for n i.i.d. N(0, 1) samples the sample mean has standard error 1/sqrt(n) and
    # the sample std has standard error ≈ 1/sqrt(2n); every check allows 5 standard errors.
    x = torch.stack(normed[0]).double()           # (steps, 64, 16, 3, 3)
    per_filter = x.transpose(0, 1).reshape(64, -1)  # (64 filters, n samples)
    n = per_filter.shape[1]                          # 200 * 144 = 28800
    std = per_filter.std(dim=1)
    mean = per_filter.mean(dim=1)
    assert (std - 1).abs().max() < 5 / math.sqrt(2 * n), std
    assert mean.abs().max() < 5 / math.sqrt(n), mean

    # Gaussian shape, pooled: P(|z| < 1) = 0.682689..., binomial standard error.
    pooled = per_filter.reshape(-1)
    p_in = 0.6826894921370859
    frac = (pooled.abs() < 1).double().mean().item()
    assert abs(frac - p_in) < 5 * math.sqrt(p_in * (1 - p_in) / pooled.numel()), frac

    # Fresh noise at every step: consecutive steps uncorrelated (standard error 1/sqrt(N)).
    a, b = x[:-1].reshape(-1), x[1:].reshape(-1)
    corr = ((a * b).mean() / (a.std() * b.std())).item()
    assert abs(corr) < 5 / math.sqrt(a.numel()), corr

    # 1-D tensors: one scale σ·||W|| for every element.
    for k in (1, 2):
        v = torch.stack(normed[k]).double().reshape(-1)
        n = v.numel()
        assert abs(v.std().item() - 1) < 5 / math.sqrt(2 * n), (k, v.std())
        assert abs(v.mean().item()) < 5 / math.sqrt(n), (k, v.mean())

    # All-zero tensors: s is floored at 1e-16, so ε = σ·1e-16·z — zero to within 1e-16 of the
    # standard-normal draw, finite, never NaN.
    for e3, e4 in zero_eps:
        for e in (e3, e4):
            assert torch.isfinite(e).all()
            assert e.abs().max().item() <= sigma * FLOOR * 10


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=4), min_size=1, max_size=4),
    sigmas=st.tuples(st.sampled_from([0.0, 1e-3, 0.05, 0.7]), st.sampled_from([1e-3, 0.05, 0.7])),
    zero_filter=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rwp_eps_is_sigma_times_filter_norm_times_the_drawn_z(shapes, sigmas, zero_filter, dtype, seed):
    """ε = σ·s(W)⊙z exactly, element by element, for any shape and two groups (one may have σ = 0,
    and then draws nothing); z re-drawn from a copy of the optimizer's generator."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen, dtype=dtype) * (1 + i) for i, shape in enumerate(shapes)]
    if zero_filter and tensors[0].dim() >= 2:
        tensors[0][0] = 0  # a dead filter next to live ones
    params = [nn.Parameter(t) for t in tensors]
    split = (len(params) + 1) // 2
    groups = [{"params": params[:split], "sigma": sigmas[0]}, {"params": params[split:], "sigma": sigmas[1]}]
    opt = flatmin.RWP(groups, torch.optim.SGD, sigma=0.1, seed=seed, lr=0.1)
    for _ in range(2):
        zgen = copy_generator(opt)
        perturbed = [p for grp in groups if grp["sigma"] > 0 for p in grp["params"]]
        z = dict(zip(map(id, perturbed), draw_z(zgen, perturbed)))
        record = {}
        closure, before = eps_recorder(params, lambda: sum((p * p).sum() for p in params), record)
        opt.step(closure)
        i = 0
        for grp in groups:
            for _p in grp["params"]:
                got, w = record["eps"][i], before[i]
                if grp["sigma"] == 0:
                    assert torch.equal(got, torch.zeros_like(got))
                else:
                    want = grp["sigma"] * ref_s(w) * z[id(_p)]
                    # got = (w + ε) - w carries one rounding of w + ε: ulp(|w| + |ε|).
                    tol = 4 * torch.finfo(dtype).eps * (w.abs() + want.abs())
                    assert torch.isfinite(got).all()
                    assert ((got - want).abs() <= tol).all(), (got, want)
                i += 1


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 4, (torch.float64, torch.float32, torch.float64, torch.float32)],
                         ids=["f32", "mixed"])
def test_rwp_eps_when_noise_is_redrawn_for_the_undo(dtypes, device):
    """Tensors above the 1 MiB floor: only the largest one's noise is kept, the others are drawn
    again for the undo. ε must still be σ·s(W)⊙z with z as documented, the weights must come back to
    a few ulp, and the generator must end where one draw of all the noise leaves it."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(520, 500), (600,), (600, 500), (10, 600)]
    params = [nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(device)) for shape, dtype in zip(shapes, dtypes)]
    opt = flatmin.RWP(params, torch.optim.SGD, sigma=0.05, seed=11, lr=0.0)
    for _ in range(2):
        zgen = copy_generator(opt)
        z = draw_z(zgen, params)
        record = {}
        closure, before = eps_recorder(params, lambda: sum((p.double() ** 2).sum() for p in params), record)
        opt.step(closure)
        for got, w, zi, p in zip(record["eps"], before, z, params):
            want = 0.05 * ref_s(w) * zi
            tol = 4 * torch.finfo(w.dtype).eps * (w.abs() + want.abs())
            assert ((got - want).abs() <= tol).all()
            assert ((p.detach() - w).abs() <= tol).all()  # restored up to the rounding of w + ε
        assert torch.equal(opt.generator.get_state(), zgen.get_state())


# ---------------------------------------------------------------- 2. ARWP's statistic and shrinkage

def small_convnet(dtype, seed=0):
    torch.manual_seed(seed)
    # 2x6x6 input -> conv 3x3 -> 4x4x4 -> linear: conv kernel (4, 2, 3, 3), bias (4), linear (3, 64), bias (3)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).to(dtype)


def small_mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(kind, dtype, n, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (10, 2, 6, 6) if kind == "conv" else (10, 5)
    return [(torch.randn(shape, generator=gen).to(device, dtype), torch.randint(0, 3, (10,), generator=gen).to(device))
            for _ in range(n)]


def make_model(kind, dtype, seed=0, device="cpu"):
    return (small_convnet(dtype, seed) if kind == "conv" else small_mlp(dtype, seed)).to(device)


# Per parameter of small_convnet (conv weight, conv bias, linear weight, linear bias): its group.
GROUPINGS = {
    "one": [{"sigma": 0.05, "eta": 200.0, "beta": 0.9}] * 4,
    # every hyperparameter differs between the two groups
    "two": [{"sigma": 0.05, "eta": 200.0, "beta": 0.9}, {"sigma": 0.02, "eta": 50.0, "beta": 0.5}] * 2,
    # the biases are not perturbed, but their F is kept all the same
    "unperturbed": [{"sigma": 0.05, "eta": 200.0, "beta": 0.9}, {"sigma": 0.0, "eta": 100.0, "beta": 0.8}] * 2,
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arwp_F_and_shrunk_noise_match_the_recorded_gradients(dtype, grouping, device):
    model = small_convnet(dtype).to(device)
    params = list(model.parameters())
    hp = GROUPINGS[grouping]
    groups = [{"params": [p for p, h in zip(params, hp) if h is g], **g} for g in {id(h): h for h in hp}.values()]
    opt = flatmin.ARWP(groups, torch.optim.SGD, seed=3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    order = [p for g in groups for p in g["params"]]  # the optimizer's order: group by group
    hp = [hp[next(i for i, q in enumerate(params) if q is p)] for p in order]
    params = order
    perturbed = [i for i, h in enumerate(hp) if h["sigma"] != 0]
    batches = make_batches("conv", dtype, 5, device=device)
    used_grads = []  # per step: the gradient the update used (.grad after the step)
    shrink_seen = 0.0
    for k, (x, y) in enumerate(batches):
        # F from the recorded gradients, in float64: F = Σ_t β^(k-t) Σ_{j in filter} g_t².
        F_ref = None
        if used_grads:
            F_ref = [sum(hp[i]["beta"] ** (len(used_grads) - 1 - t) * ref_sq_sums(gs[i])
                         for t, gs in enumerate(used_grads)) for i in range(len(params))]
        z = dict(zip(perturbed, draw_z(copy_generator(opt), [params[i] for i in perturbed])))
        record = {}
        closure, before = eps_recorder(params, lambda: F.cross_entropy(model(x), y), record)
        opt.step(closure)
        for i, p in enumerate(params):
            got = record["eps"][i].double()
            if i not in z:
                assert torch.equal(got, torch.zeros_like(got))
                continue
            want = hp[i]["sigma"] * ref_s(before[i]).double() * z[i].double()
            if F_ref is not None:
                shrink = ref_shrink(hp[i]["eta"] * F_ref[i], p)
                want = want / shrink
                shrink_seen = max(shrink_seen, float(shrink.max()))
            # F is kept in float32 by the implementation (~1e-7 relative) and, in float32,
            # got = (w + ε) - w carries one rounding of w + ε.
            tol = 1e-6 * want.abs() + 4 * torch.finfo(dtype).eps * before[i].abs().double()
            assert ((got - want).abs() <= tol).all(), (k, i, (got - want).abs().max())
        # The update used the perturbed gradient from the closure, unchanged.
        after = [p.grad.detach().clone() for p in params]
        for g_closure, g_after in zip(record["grad"], after):
            assert torch.equal(g_closure, g_after)
        used_grads.append(after)
        F_ref = [sum(hp[i]["beta"] ** (len(used_grads) - 1 - t) * ref_sq_sums(gs[i])
                     for t, gs in enumerate(used_grads)) for i in range(len(params))]
        for i, p in enumerate(params):
            F_opt = opt.state[p]["F"]
            expected_shape = (p.shape[0],) if p.dim() >= 2 else tuple(p.shape)
            assert tuple(F_opt.shape) == expected_shape  # one number per filter / per element
            torch.testing.assert_close(F_opt.double(), F_ref[i], rtol=1e-5, atol=0)
    # The test has teeth: the shrinkage was far from 1 and differs between filters.
    assert shrink_seen > 1.5, shrink_seen
    conv_F = opt.state[params[0]]["F"]
    assert conv_F.max() > 1.5 * conv_F.min(), conv_F


@pytest.mark.parametrize("method", ["rwp", "arwp"])
def test_the_perturbed_weights_are_bit_identical_to_a_tensor_by_tensor_computation(method, device):
    """flatmin keeps the per-filter numbers of all tensors in flat buffers; the arithmetic must be
    the same, op for op, as this plain float32 computation one tensor at a time (on CUDA the norms of
    1-D tensors come from one foreach call)."""
    model = small_convnet(torch.float32).to(device)
    params = list(model.parameters())
    sigma, eta, beta = 0.05, 200.0, 0.9
    kw = {"eta": eta, "beta": beta} if method == "arwp" else {}
    cls = flatmin.ARWP if method == "arwp" else flatmin.RWP
    opt = cls(params, torch.optim.SGD, sigma=sigma, seed=3, lr=0.1, momentum=0.9, **kw)
    F_hand = None
    for x, y in make_batches("conv", torch.float32, 4, device=device):
        z = draw_z(copy_generator(opt), params)
        want = []
        for i, p in enumerate(params):
            w = p.detach()
            dims = tuple(range(1, w.dim()))
            s = torch.linalg.vector_norm(w, dim=dims, keepdim=True) if w.dim() >= 2 else torch.linalg.vector_norm(w)
            scale = s.clamp_min(FLOOR) * sigma
            if F_hand is not None:
                shrink = (F_hand[i] * eta + 1.0).rsqrt()
                scale = scale * (shrink.reshape(scale.shape[0], *[1] * (w.dim() - 1)) if w.dim() >= 2 else shrink)
            want.append(w + z[i] * scale)
        seen = {}

        def closure():
            seen["w"] = [p.detach().clone() for p in params]
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        for got, expected in zip(seen["w"], want):
            assert torch.equal(got, expected)
        if method == "arwp":
            sums = []
            for p in params:
                g = p.grad
                if g.dim() >= 2:
                    n = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
                    sums.append(n * n)
                else:
                    sums.append(g * g)
            F_hand = sums if F_hand is None else [f * beta + q for f, q in zip(F_hand, sums)]
            for p, f in zip(params, F_hand):
                assert torch.equal(opt.state[p]["F"], f)


# ---------------------------------------------------------------- 3. the update, against a reference

SGD_HP = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
ADAMW_HP = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
METHOD_HP = {
    "rwp": {"sigma": 0.05},
    "arwp": {"sigma": 0.05, "eta": 50.0, "beta": 0.9},
    "m-rwp": {"sigma": 0.05, "lam": 0.3},
    "m-arwp": {"sigma": 0.05, "lam": 0.3, "eta": 50.0, "beta": 0.9},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
}


def build(method, params, base, seed=0, **overrides):
    hp = {**METHOD_HP[method], **overrides}
    base_cls, base_hp = (torch.optim.SGD, SGD_HP) if base == "sgd" else (torch.optim.AdamW, ADAMW_HP)
    cls = {"rwp": flatmin.RWP, "arwp": flatmin.ARWP, "m-rwp": flatmin.MRWP, "m-arwp": flatmin.MARWP,
           "sam": flatmin.SAM, "asam": flatmin.SAM}[method]
    if method == "asam":
        hp["adaptive"] = True
    return cls(params, base_cls, seed=seed, **hp, **base_hp), hp


class Reference:
    """The method re-computed by hand: weights as a dict of tensors, gradients by functional_call
    and autograd.grad, the base optimizer written out (SGD with momentum and weight decay, AdamW)."""

    def __init__(self, model, method, hp, base, wrong=None):
        self.model = copy.deepcopy(model).double()  # the reference is float64 whatever the model
        self.w = {n: p.detach().double() for n, p in model.named_parameters()}
        self.method, self.hp, self.base = method, hp, base
        self.wrong = wrong  # a deliberately wrong variant, only to show the comparison can fail
        self.F = {}            # ARWP: per-filter (or elementwise) EMA of Σ g², float64
        self.clean_hist, self.perturbed_hist = [], []  # m-(A)RWP: g(w; B1), g(w+ε; B2) per step
        self.buf = {}          # SGD momentum buffers
        self.m, self.v, self.t = {}, {}, 0  # AdamW moments

    def grad(self, w, batch):
        x, y = batch
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
        loss = F.cross_entropy(functional_call(self.model, leaves, (x.double(),)), y)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def random_eps(self, z):
        sigma, eps = self.hp["sigma"], {}
        for (n, w), zn in zip(self.w.items(), z):
            if self.wrong == "whole_tensor_scale":
                e = sigma * torch.sqrt((w * w).sum()) * zn.double()
            elif self.wrong == "unit_scale":
                e = sigma * zn.double()
            else:
                e = sigma * ref_s(w) * zn.double()
            if self.method in ("arwp", "m-arwp") and n in self.F and self.wrong != "no_shrink":
                e = e / ref_shrink(self.hp["eta"] * self.F[n], w)
            eps[n] = e
        return eps

    def observe(self, g):
        beta = self.hp["beta"]
        for n, gn in g.items():
            s = ref_sq_sums(gn)
            self.F[n] = s if n not in self.F else beta * self.F[n] + s

    def gradient(self, z, b1, b2):
        """The gradient the update uses (docs/algorithms.md), given the z the optimizer will draw."""
        plus = lambda eps: {n: self.w[n] + eps[n] for n in self.w}  # noqa: E731
        m = self.method
        if m in ("rwp", "arwp"):
            g = self.grad(plus(self.random_eps(z)), b1)
            if m == "arwp":
                self.observe(g)
            return g
        if m in ("m-rwp", "m-arwp"):
            lam = self.hp["lam"]
            g1 = self.grad(self.w, b1)
            if lam == 0:
                return g1
            g2 = self.grad(plus(self.random_eps(z)), b2)
            self.clean_hist.append(g1)
            self.perturbed_hist.append(g2)
            if m == "m-arwp":
                self.observe(g1 if self.wrong == "F_from_clean" else g2)
            if self.wrong == "swap_lam":
                return {n: lam * g1[n] + (1 - lam) * g2[n] for n in g1}
            return {n: (1 - lam) * g1[n] + lam * g2[n] for n in g1}
        # SAM / ASAM: one norm over all tensors together.
        rho = self.hp["rho"]
        g0 = self.grad(self.w, b1)
        if self.wrong == "per_tensor_norm":
            eps = {n: rho * g0[n] / torch.sqrt((g0[n] * g0[n]).sum()) for n in g0}
        elif m == "sam" or self.wrong == "no_T":
            norm = math.sqrt(sum(float((g * g).sum()) for g in g0.values()))
            eps = {n: rho * g0[n] / norm for n in g0}
        else:
            norm = math.sqrt(sum(float(((self.w[n].abs() * g0[n]) ** 2).sum()) for n in g0))
            eps = {n: rho * self.w[n] * self.w[n] * g0[n] / norm for n in g0}
        return self.grad(plus(eps), b1)

    def base_step(self, g):
        if self.base == "sgd":
            lr, mom, wd = SGD_HP["lr"], SGD_HP["momentum"], SGD_HP["weight_decay"]
            for n, w in self.w.items():
                d = g[n] + wd * w
                self.buf[n] = d.clone() if n not in self.buf else mom * self.buf[n] + d
                self.w[n] = w - lr * self.buf[n]
            return
        lr, (b1, b2), eps, wd = ADAMW_HP["lr"], ADAMW_HP["betas"], ADAMW_HP["eps"], ADAMW_HP["weight_decay"]
        self.t += 1
        for n, w in self.w.items():
            w = w * (1 - lr * wd)
            self.m[n] = (1 - b1) * g[n] if n not in self.m else b1 * self.m[n] + (1 - b1) * g[n]
            self.v[n] = (1 - b2) * g[n] ** 2 if n not in self.v else b2 * self.v[n] + (1 - b2) * g[n] ** 2
            m_hat = self.m[n] / (1 - b1 ** self.t)
            v_hat = self.v[n] / (1 - b2 ** self.t)
            self.w[n] = w - lr * m_hat / (torch.sqrt(v_hat) + eps)

    def step(self, z, b1, b2):
        self.base_step(self.gradient(z, b1, b2))


def closure_on(model, batch):
    x, y = batch

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def tolerance(method, dtype):
    """Allowed max|w − w_ref| / max|w_ref| per tensor, set from the rounding each setting carries
    (a wrong formula is off by ~1e-3 or more: test_the_reference_comparison_has_teeth).

    * float64, RWP / m-RWP: 1e-12 (only the in-place restore's few ulp; measured ~5e-16);
    * float64, SAM / ASAM / ARWP / m-ARWP: 1e-7, because the implementation computes SAM's global
      norm and ARWP's F in float32 (ε moves by ~1e-8 relative; measured ~3e-9 for SAM/ASAM);
    * float32 model: 2e-6 (float32 forward, backward and base step; measured ~3e-7).
    """
    if dtype == torch.float32:
        return 2e-6
    return 1e-7 if method in ("sam", "asam", "arwp", "m-arwp") else 1e-12


def max_rel_dev(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def run_against_reference(method, kind, base, dtype=torch.float64, steps=4, wrong=None, device="cpu", **overrides):
    """Run flatmin and the reference side by side for ``steps`` updates, comparing the weights
    (and ARWP's F) after every step. Returns the optimizer, the reference, the model and the
    largest deviation seen; with ``wrong`` (a deliberately wrong reference) nothing is asserted."""
    model = make_model(kind, dtype, device=device)
    params = list(model.parameters())
    opt, hp = build(method, params, base, **overrides)
    ref = Reference(model, method, hp, base, wrong=wrong)
    batches = make_batches(kind, dtype, 2 * steps, device=device)
    tol = tolerance(method, dtype)
    worst = 0.0
    for k in range(steps):
        b1, b2 = batches[2 * k], batches[2 * k + 1]
        z = draw_z(copy_generator(opt), params)
        ref.step(z, b1, b2)
        if method in ("m-rwp", "m-arwp"):
            opt.step(closure_on(model, b1), closure_on(model, b2))
        else:
            opt.step(closure_on(model, b1))
        for n, p in model.named_parameters():
            dev = max_rel_dev(p.detach(), ref.w[n])
            worst = max(worst, dev)
            if wrong is None:
                assert dev <= tol, f"{method} ({dtype}, {kind}, {base}) step {k}, {n}: deviation {dev:.3e} > {tol:.0e}"
        if method in ("arwp", "m-arwp") and ref.F and wrong is None:
            for n, p in model.named_parameters():
                # In float32 a filter whose gradient is orders of magnitude below the tensor's largest
                # carries float32 rounding of that largest scale: compare it at the tensor's scale.
                atol = 1e-5 * float(ref.F[n].abs().max()) if dtype == torch.float32 else 0.0
                torch.testing.assert_close(opt.state[p]["F"].double(), ref.F[n], rtol=1e-5, atol=atol)
    return opt, ref, model, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("method", list(METHOD_HP))
def test_update_matches_hand_written_reference(method, kind, base, dtype, device):
    run_against_reference(method, kind, base, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "method, wrong",
    [
        ("rwp", "whole_tensor_scale"),   # one norm per tensor instead of per filter
        ("rwp", "unit_scale"),           # ε = σ·z, no s(W)
        ("arwp", "no_shrink"),           # ARWP without the 1/sqrt(1 + ηF)
        ("m-rwp", "swap_lam"),           # λ on the clean term
        ("m-arwp", "F_from_clean"),      # F from g(w; B1)
        ("sam", "per_tensor_norm"),      # ε normalised tensor by tensor
        ("asam", "no_T"),                # ASAM computed as SAM
    ],
)
def test_the_reference_comparison_has_teeth(method, wrong):
    """The comparison above rejects each of these plausible mistakes by orders of magnitude."""
    *_, dev = run_against_reference(method, "conv", "sgd", dtype=torch.float32, wrong=wrong)
    assert dev > 100 * tolerance(method, torch.float32), dev


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method, dtype", [("m-rwp", torch.float64), ("m-arwp", torch.float32)])
def test_mixed_methods_lambda_edges_match_reference(method, dtype, lam, kind):
    opt, ref, model, _ = run_against_reference(method, kind, "sgd", dtype=dtype, lam=lam)
    if method != "m-arwp":
        return
    if lam == 0:
        # No perturbed pass, no perturbed gradient: F is never formed.
        assert all("F" not in opt.state[p] for p in model.parameters())
        return
    # F came from g(w+ε; B2) alone: the same EMA fed the clean gradient g(w; B1) or the mixed one
    # is far off (B1 ≠ B2).
    beta = ref.hp["beta"]

    def ema(grads, n):
        k = len(grads)
        return sum(beta ** (k - 1 - t) * ref_sq_sums(g[n]) for t, g in enumerate(grads))

    mixed = [{n: (1 - lam) * g1[n] + lam * g2[n] for n in g1} for g1, g2 in zip(ref.clean_hist, ref.perturbed_hist)]
    for n, p in model.named_parameters():
        F_opt = opt.state[p]["F"].double()
        torch.testing.assert_close(F_opt, ema(ref.perturbed_hist, n), rtol=1e-5, atol=0)
        assert not torch.allclose(F_opt, ema(ref.clean_hist, n), rtol=1e-3, atol=0), n
        if lam != 1:
            assert not torch.allclose(F_opt, ema(mixed, n), rtol=1e-3, atol=0), n


@settings(max_examples=8, deadline=None)
@given(lam=st.floats(0.0, 1.0), sigma=st.floats(0.0, 0.2), seed=st.integers(0, 1000))
def test_m_rwp_matches_reference_for_any_lambda_and_sigma(lam, sigma, seed):
    model = make_model("mlp", torch.float64, seed)
    params = list(model.parameters())
    opt, hp = build("m-rwp", params, "sgd", seed=seed, lam=lam, sigma=sigma)
    ref = Reference(model, "m-rwp", hp, "sgd")
    batches = make_batches("mlp", torch.float64, 4, seed=seed + 1)
    for k in range(2):
        z = draw_z(copy_generator(opt), params)
        ref.step(z, batches[2 * k], batches[2 * k + 1])
        opt.step(closure_on(model, batches[2 * k]), closure_on(model, batches[2 * k + 1]))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref.w[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["rwp", "arwp", "m-rwp", "m-arwp", "sam"])
def test_zero_radius_is_exactly_the_base_optimizer(method, device):
    """σ = 0 (ρ = 0 for SAM) gives bit for bit torch.optim.SGD's step; the mixed methods get the
    same batch twice with λ = 0.5, so (1 − λ)·g + λ·g = g exactly."""
    model = small_convnet(torch.float32).to(device)
    twin = copy.deepcopy(model)
    radius = {"rho": 0.0} if method == "sam" else {"sigma": 0.0}
    extra = {"lam": 0.5} if method.startswith("m-") else {}
    opt, _ = build(method, list(model.parameters()), "sgd", **radius, **extra)
    plain = torch.optim.SGD(twin.parameters(), **SGD_HP)
    for batch in make_batches("conv", torch.float32, 3, device=device):
        opt.step(closure_on(model, batch))
        plain.zero_grad()
        closure_on(twin, batch)()
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("method", ["rwp", "arwp"])
def test_single_pass_update_is_the_base_step_with_the_perturbed_gradient(method, exact, device):
    """Restore w, then one base step with g(w + ε): a twin model stepped by torch.optim.SGD with the
    gradient recorded inside the closure matches bit for bit with exact_restore=True, and to a
    few ulp when the shift is undone in place."""
    model = small_convnet(torch.float32).to(device)
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    opt, _ = build(method, params, "sgd", exact_restore=exact)
    plain = torch.optim.SGD(twin.parameters(), **SGD_HP)
    for x, y in make_batches("conv", torch.float32, 4, device=device):
        record = {}
        closure, _before = eps_recorder(params, lambda: F.cross_entropy(model(x), y), record)
        opt.step(closure)
        for q, g in zip(twin.parameters(), record["grad"]):
            q.grad = g.clone()
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            if exact:
                assert torch.equal(p, q)
            else:
                assert ((p - q).abs() <= 8 * torch.finfo(p.dtype).eps * q.abs().max()).all()
        with torch.no_grad():  # keep the twin on flatmin's weights so rounding does not accumulate
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)


# ---------------------------------------------------------------- 4. the σ schedule

@settings(max_examples=30, deadline=None)
@given(total=st.integers(1, 40), inc=st.floats(0.0, 20.0), s0=st.floats(1e-4, 1.0), s1=st.floats(1e-4, 1.0))
def test_cosine_inc_sigma_follows_the_formula(total, inc, s0, s1):
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = flatmin.RWP([{"params": [a], "sigma": s0}, {"params": [b], "sigma": s1}], torch.optim.SGD,
                      sigma=0.1, seed=0, lr=0.1)
    sched = flatmin.CosineIncSigma(opt, total_steps=total, inc=inc)
    for t in range(total + 1):
        for group, base in zip(opt.param_groups, (s0, s1)):
            want = base * (1 + inc * (1 - math.cos(math.pi * t / total)) / 2)
            assert group["sigma"] == pytest.approx(want, rel=1e-12)
        assert sched.get_last_sigma() == [g["sigma"] for g in opt.param_groups]
        if t < total:
            sched.step()
    for group, base in zip(opt.param_groups, (s0, s1)):
        assert group["sigma"] == pytest.approx(base * (1 + inc), rel=1e-12)


def test_rwp_draws_with_the_scheduled_sigma():
    """Update t perturbs with σ_t: ε = σ_t·s(W)⊙z at every step of the schedule."""
    model = small_convnet(torch.float64)
    params = list(model.parameters())
    sigma0, total, inc = 0.01, 6, 10.0
    opt = flatmin.RWP(params, torch.optim.SGD, sigma=sigma0, seed=1, lr=0.1, momentum=0.9)
    sched = flatmin.CosineIncSigma(opt, total_steps=total, inc=inc)
    for t, (x, y) in enumerate(make_batches("conv", torch.float64, total)):
        sigma_t = sigma0 * (1 + inc * (1 - math.cos(math.pi * t / total)) / 2)
        z = draw_z(copy_generator(opt), params)
        record = {}
        closure, before = eps_recorder(params, lambda: F.cross_entropy(model(x), y), record)
        opt.step(closure)
        sched.step()
        for w, zi, got in zip(before, z, record["eps"]):
            want = sigma_t * ref_s(w) * zi
            assert ((got - want).abs() <= 4e-16 * (w.abs() + want.abs())).all(), t
