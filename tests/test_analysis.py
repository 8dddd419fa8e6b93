"""flatmin.analysis against exact answers on models small enough to compute them: the Hessian's
eigenvalues and trace against dense Hessians, filter normalisation against its definition, and the
guarantee that no analysis changes the model (weights, buffers, modes, .grad)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatmin.filters import filter_norms
from flatmin.perturb import gaussian_draw
from flatmin.analysis import (
    analyze,
    filter_normalized_direction,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    landscape_1d,
    landscape_2d,
    loss_vs_radius,
)


def clean_loss(model, loss_fn, batches):
    """Reference L(w): the mean of the batch losses, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)
    model.train(was_training)
    return value


def least_squares(n=64, d=8, seed=0):
    """nn.Linear without bias and F.mse_loss: L = mean((Xw − y)²), so H = 2 XᵀX / n."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False)
    batches = [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]  # equal halves: mean of means = mean
    hessian = 2 * x.double().T @ x.double() / n
    return model, batches, hessian


def tiny_mlp(seed=0):
    """A 3-5-2 tanh MLP (32 parameters, float64), cross-entropy on 2 batches of 16."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g))
               for _ in range(2)]
    return model, batches


def dense_hessian(model, loss_fn, batches):
    """∇²L over all parameters flattened in model.parameters() order, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w):
        params = dict(zip(names, [c.view(s) for c, s in zip(w.split([s.numel() for s in shapes]), shapes)]))
        return sum(loss_fn(functional_call(model, params, (x,)), y) for x, y in batches) / len(batches)

    return torch.autograd.functional.hessian(loss_of, flat)


# --- Hessian -----------------------------------------------------------------------------------


def test_eigenvalues_least_squares():
    model, batches, hessian = least_squares()
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    for k in (1, 3, 8):  # k = 8 = dim: the Krylov space is exhausted
        top = torch.tensor(hessian_eigenvalues(model, F.mse_loss, batches, k=k), dtype=torch.float64)
        torch.testing.assert_close(top, exact[:k], rtol=1e-4, atol=0)


def test_eigenvalues_converge_before_exhausting_the_space():
    model, batches, hessian = least_squares(n=400, d=150)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    top = torch.tensor(hessian_eigenvalues(model, F.mse_loss, batches, k=3, iters=100), dtype=torch.float64)
    torch.testing.assert_close(top, exact[:3], rtol=1e-4, atol=0)


def test_eigenvalues_repeated():
    # H with eigenvalues 3 (×3), 1 (×4), 0.5 (×3): one Lanczos vector sees each value once, so
    # the copies come from the restarts when the Krylov space runs out.
    d = 10
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([3.0, 3, 3, 1, 1, 1, 1, 0.5, 0.5, 0.5], dtype=torch.float64)
    x = spectrum.sqrt()[:, None] * q.T * math.sqrt(d / 2)
    model = nn.Linear(d, 1, bias=False).double()
    top = hessian_eigenvalues(model, F.mse_loss, [(x, torch.zeros(d, 1, dtype=torch.float64))], k=5)
    np.testing.assert_allclose(top, [3, 3, 3, 1, 1], rtol=1e-8)


def test_eigenvalues_tiny_mlp():
    model, batches = tiny_mlp()
    exact = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batches)).flip(0)
    top = torch.tensor(hessian_eigenvalues(model, F.cross_entropy, batches, k=3), dtype=torch.float64)
    torch.testing.assert_close(top, exact[:3], rtol=1e-4, atol=0)


@pytest.mark.parametrize("case", ["least_squares", "tiny_mlp"])
def test_trace_within_three_standard_errors(case):
    if case == "least_squares":
        (model, batches, hessian), loss_fn = least_squares(), F.mse_loss
    else:
        (model, batches), loss_fn = tiny_mlp(), F.cross_entropy
        hessian = dense_hessian(model, loss_fn, batches)
    exact = float(hessian.trace())
    estimate, stderr = hessian_trace(model, loss_fn, batches, probes=300, seed=0)
    assert 0 < stderr < 0.1 * abs(exact)  # sharp enough to catch a wrong scale
    assert abs(estimate - exact) <= 3 * stderr


def test_density_integrates_to_one_and_has_the_right_mean():
    model, batches = tiny_mlp()
    hessian = dense_hessian(model, F.cross_entropy, batches)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    dim = hessian.shape[0]
    result = hessian_density(model, F.cross_entropy, batches, probes=20, steps=10, seed=0)
    assert abs(np.trapezoid(result["density"], result["grid"]) - 1) < 1e-3
    values, weights = np.asarray(result["ritz_values"]), np.asarray(result["ritz_weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-10)
    # Ritz values lie inside the spectrum; each probe's weighted mean is v_pᵀHv_p, an unbiased
    # estimate of tr(H)/dim.
    assert values.min() >= eigenvalues.min() - 1e-8 and values.max() <= eigenvalues.max() + 1e-8
    means = (values * weights).sum(axis=1)
    stderr = means.std(ddof=1) / math.sqrt(len(means))
    assert abs(means.mean() - float(hessian.trace()) / dim) <= 3 * stderr


# --- landscapes --------------------------------------------------------------------------------


def conv_bn_net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 3),
    )
    with torch.no_grad():  # as after training: BN's affine is not at its (1, 0) initialisation
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.1)
    return model


def image_batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("include_1d", [False, True])
def test_filter_normalized_direction(include_1d):
    model = conv_bn_net()
    direction = filter_normalized_direction(model, seed=5, include_1d=include_1d)
    assert list(direction) == [n for n, _ in model.named_parameters()]
    for name, w in model.named_parameters():
        d = direction[name]
        assert d.shape == w.shape
        if w.ndim >= 2:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        elif include_1d:
            torch.testing.assert_close(d.norm(), w.detach().norm(), rtol=1e-5, atol=0)
        else:
            assert torch.count_nonzero(d) == 0
    again = filter_normalized_direction(model, seed=5, include_1d=include_1d)
    other = filter_normalized_direction(model, seed=6, include_1d=include_1d)
    assert all(torch.equal(direction[n], again[n]) for n in direction)
    assert not torch.equal(direction["0.weight"], other["0.weight"])


def test_landscape_1d_passes_through_the_clean_loss():
    model, batches = conv_bn_net(), image_batches()
    result = landscape_1d(model, F.cross_entropy, batches, steps=5, span=(-0.5, 0.5), seed=2)
    assert result["alphas"][2] == 0
    assert result["loss"][2] == pytest.approx(clean_loss(model, F.cross_entropy, batches), rel=1e-6)
    assert len(result["accuracy"]) == 5 and all(0 <= a <= 1 for a in result["accuracy"])
    # The point at α = 0.5 is L(w + 0.5 d), evaluated here without touching the model.
    d = filter_normalized_direction(model, seed=2)
    shifted = {n: p.detach() + 0.5 * d[n] for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(functional_call(model, shifted, (x,)), y)) for x, y in batches) / 2
    model.train()
    assert result["loss"][4] == pytest.approx(expected, rel=1e-5)
    assert result["loss"][4] != pytest.approx(result["loss"][2], rel=1e-3)


def test_landscape_2d_grid():
    model, batches = conv_bn_net(), image_batches()
    result = landscape_2d(model, F.cross_entropy, batches, steps=3, seed=2)
    loss = np.asarray(result["loss"])
    assert loss.shape == (3, 3) and np.asarray(result["accuracy"]).shape == (3, 3)
    assert loss[1, 1] == pytest.approx(clean_loss(model, F.cross_entropy, batches), rel=1e-6)
    # The first direction is landscape_1d's with the same seed.
    line = landscape_1d(model, F.cross_entropy, batches, steps=3, seed=2)
    np.testing.assert_allclose(loss[:, 1], line["loss"], rtol=1e-6)


# --- loss vs radius ----------------------------------------------------------------------------


def trained_mlp():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=g) * 2
    labels = torch.randint(0, 3, (256,), generator=g)
    x = centres[labels] + torch.randn(256, 5, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, [(x[:128], labels[:128]), (x[128:], labels[128:])]


def test_loss_vs_radius():
    model, batches = trained_mlp()
    radii = [0.0, 1e-3, 1e-2, 5e-2, 2e-1]
    result = loss_vs_radius(model, F.cross_entropy, batches, radii=radii, draws=8, seed=0, adversarial=True)
    clean = clean_loss(model, F.cross_entropy, batches)
    assert result["clean_loss"] == pytest.approx(clean, rel=1e-6)
    assert result["losses"][0] == [result["clean_loss"]] * 8 and result["loss_std"][0] == 0
    assert result["adversarial_loss"][0] == result["clean_loss"]
    assert np.all(np.diff(result["loss_std"]) > 0), result["loss_std"]
    assert all(lo <= m <= hi for lo, m, hi in zip(result["loss_min"], result["loss_mean"], result["loss_max"]))
    # ρ(σ) = σ · sqrt(Σ_W Σ_i n_i ||W_i||²), the RMS norm of the random ε.
    rho_per_sigma = math.sqrt(sum(
        float(w.detach().double().flatten(1).norm(dim=1).square().sum()) * w[0].numel() if w.ndim >= 2
        else float(w.detach().double().norm()) ** 2 * w.numel()
        for w in model.parameters()))
    assert result["rho_per_sigma"] == pytest.approx(rho_per_sigma, rel=1e-6)
    np.testing.assert_allclose(result["rho"], np.asarray(radii) * result["rho_per_sigma"], rtol=1e-12)
    # At a small radius the ascent direction is worse than a typical random one.
    assert result["adversarial_loss"][1] >= result["loss_mean"][1]
    assert result["adversarial_loss"][1] > clean


def test_random_noise_norm_matches_rho():
    # In high dimension ||ε|| concentrates at ρ(σ): check on a conv net's 100+ weights.
    model = conv_bn_net()
    result = loss_vs_radius(model, F.cross_entropy, image_batches(1), radii=[1e-2], draws=1)
    g = torch.Generator().manual_seed(0)
    eps = [1e-2 * filter_norms(p.detach()) * gaussian_draw(p.shape, g, p) for p in model.parameters()]
    norm = math.sqrt(sum(float(e.square().sum()) for e in eps))
    assert norm == pytest.approx(result["rho_per_sigma"] * 1e-2, rel=0.15)


# --- the model is left as it was ---------------------------------------------------------------


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_unchanged(model, before):
    state, modes, grads = snapshot(model)
    assert state.keys() == before[0].keys()
    for key in state:
        assert torch.equal(state[key], before[0][key]), key
    assert modes == before[1]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, before[2]))


ANALYSES = {
    "eigenvalues": lambda m, b: hessian_eigenvalues(m, F.cross_entropy, b, k=2, iters=20),
    "trace": lambda m, b: hessian_trace(m, F.cross_entropy, b, probes=3),
    "density": lambda m, b: hessian_density(m, F.cross_entropy, b, probes=2, steps=5),
    "landscape_1d": lambda m, b: landscape_1d(m, F.cross_entropy, b, steps=3, include_1d=True),
    "landscape_2d": lambda m, b: landscape_2d(m, F.cross_entropy, b, steps=3),
    "radius": lambda m, b: loss_vs_radius(m, F.cross_entropy, b, radii=[0.0, 0.05], draws=2, adversarial=True),
}


@pytest.mark.filterwarnings("ignore:hessian_eigenvalues")  # 20 steps need not converge; irrelevant here
@pytest.mark.parametrize("name", list(ANALYSES))
def test_model_unchanged(name):
    model, batches = conv_bn_net(), image_batches()
    model.train()
    model[5].eval()  # a mixed-mode model: each submodule's own flag must come back
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()  # BN stats move, .grad is set
    before = snapshot(model)
    ANALYSES[name](model, batches)
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:hessian_eigenvalues")
def test_analyze_writes_json_and_plots(tmp_path):
    model, batches = conv_bn_net(), image_batches()
    before = snapshot(model)
    result = analyze(
        model, F.cross_entropy, iter(batches), out_dir=tmp_path, seed=1, progress=True,
        eigenvalues={"k": 2, "iters": 40}, trace={"probes": 4}, density={"probes": 2, "steps": 8},
        landscape_1d={"steps": 5}, landscape_2d={"steps": 3},
        radius={"radii": [0.0, 0.01, 0.1], "draws": 2, "adversarial": True},
    )
    assert_unchanged(model, before)
    on_disk = json.loads((tmp_path / "analysis.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(result) == {"seed", "split", "eigenvalues", "trace", "density", "landscape_1d", "landscape_2d",
                           "radius", "plots"}
    assert result["split"] == "train"  # the default name of the data the batches come from
    assert result["eigenvalues"][0] >= result["eigenvalues"][1]
    assert set(result["plots"]) == {"density", "landscape_1d", "landscape_2d", "radius"}
    for path in result["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        analyze(model, F.cross_entropy, batches, what=("nope",), out_dir=tmp_path)
    with pytest.raises(TypeError):
        analyze(model, F.cross_entropy, batches, what=("radius",), out_dir=tmp_path, landscape={"steps": 3})


def test_plots_name_the_split_the_loss_was_measured_on(tmp_path, figures):
    from flatmin.analysis import plots

    model, batches = tiny_mlp()
    result = analyze(model, F.cross_entropy, batches, what=("landscape", "radius"), out_dir=tmp_path, split="test",
                     landscape_1d={"steps": 3}, landscape_2d={"steps": 3}, radius={"radii": [0.0, 0.1], "draws": 1})
    assert json.loads((tmp_path / "analysis.json").read_text())["split"] == result["split"] == "test"
    labels = {name: [ax.get_ylabel() for ax in fig.axes] for name, fig in figures.items()}
    assert labels["landscape_1d.png"][0] == "test loss" and labels["radius.png"] == ["test loss"]
    assert "test loss" in labels["landscape_2d.png"]  # the colour bar's axis
    assert not any("train" in label for names in labels.values() for label in names)
    plots.overlay([("a", [result])], tmp_path, prefix="o_", split="val")
    assert figures["o_radius.png"].axes[0].get_ylabel() == "val loss"
    assert figures["o_landscape_1d.png"].axes[0].get_ylabel() == "val loss"
