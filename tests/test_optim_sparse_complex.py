"""Complex parameters and sparse gradients on every method
(docs/algorithms.md, "Complex parameters and sparse gradients").

Complex: each method against a plain re-computation written here, complex element by complex
element (a complex weight is a pair of reals: its noise has real and imaginary parts each
N(0, σ²s²), its filter norm and ARWP's sums use |w| and |g|). Sparse: every method on a model
with nn.Embedding(sparse=True) against the same model with a dense embedding, whose updates
test_optim_reference.py checks against its own reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin.filters import FilterSlots

SIGMA, ETA, BETA, LR, RHO = 0.05, 0.3, 0.9, 0.1, 0.2


# ---------------------------------------------------------------- complex parameters

def complex_problem(seed=0):
    """A complex linear map and bias, fitted to complex targets: L = mean |x Wᵀ + b − y|²."""
    g = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(3, 4, dtype=torch.complex128, generator=g))
    b = nn.Parameter(torch.randn(3, dtype=torch.complex128, generator=g))
    batches = [(torch.randn(6, 4, dtype=torch.complex128, generator=g),
                torch.randn(6, 3, dtype=torch.complex128, generator=g)) for _ in range(4)]
    return [W, b], batches


def loss_of(params, batch):
    W, b = params
    x, y = batch
    return (x @ W.T + b - y).abs().square().mean()


def closure_on(params, batch):
    def closure():
        loss = loss_of(params, batch)
        loss.backward()
        return loss
    return closure


def grad_at(values, batch):
    leaves = [v.detach().clone().requires_grad_() for v in values]
    loss_of(leaves, batch).backward()
    return [t.grad for t in leaves]


def ref_scale(w):
    """s(W): the norm of each filter (dim 0) of a 2-D tensor, of the whole 1-D tensor, over |w|."""
    if w.ndim >= 2:
        return w.abs().square().sum(1, keepdim=True).sqrt().clamp_min(1e-16)
    return w.abs().square().sum().sqrt().clamp_min(1e-16)


def ref_sums(g):
    """ARWP's sums: Σ |g|² per filter (2-D), |g|² per element (1-D)."""
    return g.abs().square().sum(1) if g.ndim >= 2 else g.abs().square()


def ref_z(gen, tensors):
    """One draw for both (small) tensors: real and imaginary parts each N(0, 1)."""
    n = [t.numel() for t in tensors]
    flat = torch.view_as_complex(torch.randn(sum(n), 2, generator=gen, dtype=tensors[0].dtype.to_real()))
    return [part.view(t.shape) for part, t in zip(flat.split(n), tensors)]


def reference_run(method, batches, params0, seed):
    """Plain re-computation of ``len(batches) // passes`` updates with SGD (no momentum)."""
    w = [p.detach().clone() for p in params0]
    gen = torch.Generator().manual_seed(seed)
    Fs = [None, None]
    mixed = method.startswith("m-")
    step_batches = list(zip(batches[0::2], batches[1::2])) if mixed else [(b, b) for b in batches]
    for clean, perturbed in step_batches:
        if method in ("sam", "asam"):
            g0 = grad_at(w, clean)
            T = [x.abs() if method == "asam" else torch.ones_like(x.real) for x in w]
            norm = math.sqrt(sum(float((t * g).abs().square().sum()) for t, g in zip(T, g0)))
            eps = [RHO * t * t * g / norm for t, g in zip(T, g0)]
            g = grad_at([x + e for x, e in zip(w, eps)], clean)
        else:
            z = ref_z(gen, w)
            shrink = [1.0 if F_ is None else 1.0 / torch.sqrt(1 + ETA * (F_.view(-1, 1) if x.ndim >= 2 else F_))
                      for x, F_ in zip(w, Fs)]
            eps = [SIGMA * ref_scale(x) * s * zz for x, s, zz in zip(w, shrink, z)]
            g_pert = grad_at([x + e for x, e in zip(w, eps)], perturbed)
            if "arwp" in method:
                Fs = [ref_sums(gp) if F_ is None else BETA * F_ + ref_sums(gp) for F_, gp in zip(Fs, g_pert)]
            g = g_pert
            if mixed:
                g = [0.5 * gc + 0.5 * gp for gc, gp in zip(grad_at(w, clean), g_pert)]
        w = [x - LR * gg for x, gg in zip(w, g)]
    return w, Fs


METHOD_HP = {"rwp": {"sigma": SIGMA}, "arwp": {"sigma": SIGMA, "eta": ETA, "beta": BETA},
             "m-rwp": {"sigma": SIGMA, "lam": 0.5}, "m-arwp": {"sigma": SIGMA, "lam": 0.5, "eta": ETA, "beta": BETA},
             "sam": {"rho": RHO}, "asam": {"rho": RHO}}


@pytest.mark.parametrize("method", list(METHOD_HP))
def test_complex_parameters_match_the_plain_complex_reference(method):
    params, batches = complex_problem()
    params0 = [p.detach().clone() for p in params]
    opt = flatmin.create(method, nn.Module(), params=params, lr=LR, seed=3, **METHOD_HP[method])
    if opt.batches_per_step == 2:
        for b1, b2 in zip(batches[0::2], batches[1::2]):
            opt.step(closure_on(params, b1), closure_on(params, b2))
    else:
        for b in batches:
            opt.step(closure_on(params, b))
    want, Fs = reference_run(method, batches, params0, seed=3)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    if "arwp" in method:
        for p, F_ in zip(params, Fs):
            assert opt.state[p]["F"].dtype == torch.float64  # real, one number per filter or complex element
            torch.testing.assert_close(opt.state[p]["F"], F_, rtol=1e-10, atol=1e-12)


def test_complex_noise_has_independent_real_and_imaginary_parts_of_the_filter_scale():
    """ε = σ · s · z: per filter, Re z and Im z each N(0, 1) and uncorrelated. With 60 000 complex
    draws, each sample variance is 1 within 0.03 (about 5 of its standard errors), the means and
    the correlation 0 within 0.02; the draw itself equals the plain reference's (same seed)."""
    gen = torch.Generator().manual_seed(11)
    W = nn.Parameter(torch.randn(6, 10_000, dtype=torch.complex64, generator=gen) * torch.arange(1, 7).view(6, 1))
    opt = flatmin.RWP([W], torch.optim.SGD, sigma=SIGMA, lr=0.0, seed=5)
    w0 = W.detach().clone()
    seen = {}

    def closure():
        seen["eps"] = W.detach() - w0
        loss = W.abs().sum()
        loss.backward()
        return loss

    opt.step(closure)
    z = seen["eps"] / (SIGMA * ref_scale(w0))
    want = ref_z(torch.Generator().manual_seed(5), [w0])[0]
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
    re, im = z.real.flatten().double(), z.imag.flatten().double()
    for part in (re, im):
        assert abs(float(part.mean())) < 0.02
        assert abs(float(part.var()) - 1.0) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([re, im]))[0, 1])) < 0.02


def test_complex_and_real_parameters_in_one_model():
    """A real layer beside a complex one: each perturbed by its own rule, the real one as before."""
    params, batches = complex_problem()
    real = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    opt = flatmin.ARWP([params[0], real, params[1]], torch.optim.SGD, sigma=SIGMA, lr=LR, seed=0)

    def closure():
        loss = loss_of(params, batches[0]) + real.square().sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert opt.state[real]["F"].dtype == torch.float64 and opt.state[real]["F"].shape == (3,)
    assert opt.state[params[1]]["F"].shape == (3,) and not opt.state[params[1]]["F"].is_complex()
    assert all(torch.isfinite(p).all() for p in [*params, real])


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_a_grad_scaler_with_complex_parameters_is_refused_in_one_line():
    """torch's GradScaler has no kernel to unscale complex gradients: refused at construction."""
    model = nn.Linear(3, 2).to(torch.complex64)
    for method in METHOD_HP:
        with pytest.raises(ValueError, match="parameter 'weight' is complex .* GradScaler") as info:
            flatmin.create(method, model, lr=0.1, grad_scaler=torch.amp.GradScaler("cpu"))
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"parameter #0 \(shape \(2, 3\)\) is complex"):
        flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=torch.amp.GradScaler("cpu"))


def test_filter_sums_of_sparse_gradients_equal_the_dense_ones():
    """Per-row sums of a sparse gradient with duplicate entries (summed first), and of a sparse 1-D one."""
    rows = torch.sparse_coo_tensor(torch.tensor([[0, 3, 0, 5]]), torch.randn(4, 6, dtype=torch.float64), (7, 6),
                                   check_invariants=True)
    flat = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1]]), torch.randn(3, dtype=torch.float64), (6,),
                                   check_invariants=True)
    slots = FilterSlots([rows.to_dense(), flat.to_dense()], per_element=True)
    got = slots.sq_sums(slots.buffer(stats=True), [rows, flat]).views
    want = slots.sq_sums(slots.buffer(stats=True), [rows.to_dense(), flat.to_dense()]).views
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
    assert float(want[0][0]) == pytest.approx(float((rows.to_dense()[0] ** 2).sum()))  # the duplicates, added
    assert float(want[0][1]) == 0.0


# ---------------------------------------------------------------- sparse gradients

def embedding_model(sparse, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(12, 5, sparse=sparse), nn.Flatten(), nn.Linear(15, 3)).double()


def token_batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Repeated tokens in a batch: the sparse gradient then has duplicate rows, summed on coalescing.
    return [(torch.randint(0, 6, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def train_tokens(method, sparse, steps_batches, **kw):
    model = embedding_model(sparse)
    # torch's SGD takes sparse gradients with momentum, not with weight decay.
    opt = flatmin.create(method, model, lr=LR, momentum=0.9, seed=0, **METHOD_HP.get(method, {}), **kw)

    def closure_for(x, y):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    for b1, b2 in steps_batches:
        if getattr(opt, "batches_per_step", 1) == 2:
            opt.step(closure_for(*b1), closure_for(*b2))
        else:
            if method == "sgd":
                opt.zero_grad()
            opt.step(closure_for(*b1))
    return model, opt


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("method", list(METHOD_HP))
def test_sparse_embedding_gradients_give_the_dense_update(method, max_grad_norm):
    b = token_batches()
    pairs = list(zip(b[0::2], b[1::2]))
    dense, dense_opt = train_tokens(method, False, pairs, max_grad_norm=max_grad_norm)
    sparse, sparse_opt = train_tokens(method, True, pairs, max_grad_norm=max_grad_norm)
    assert sparse[0].weight.grad.is_sparse  # the last update's gradient: the sparse path was taken
    for p, q in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    if "arwp" in method:
        for p, q in zip(dense.parameters(), sparse.parameters()):
            torch.testing.assert_close(sparse_opt.state[q]["F"], dense_opt.state[p]["F"], rtol=1e-10, atol=1e-14)
        rows = torch.cat([x for (x, _), _ in pairs]).unique()
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[rows] = False
        assert (sparse_opt.state[sparse[0].weight]["F"][untouched] == 0).all()  # rows never seen: no sum


def test_sparse_gradients_with_a_base_optimizer_that_refuses_them_leave_the_weights_in_place():
    """AdamW has no sparse update; its own one-line error reaches the caller, weights at w."""
    model = embedding_model(True)
    opt = flatmin.create("rwp", model, base="adamw", lr=1e-3, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = token_batches(1)[0]

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b, rtol=1e-14, atol=1e-15)  # w, up to the undo's rounding
