"""NRSLoss (Zhao & Zhang, arXiv 2201.06064): the loss equals its equation and its gradient the
derivative of that equation, the neighbour follows its documented rule, running statistics are
updated by the clean pass only, and bad arguments are refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flatmin.losses import NRSLoss
from flatmin.losses.nrs import output_divergence

DIVERGENCES = ["kl", "reverse-kl", "symmetric"]
NEIGHBOURS = ["random", "adversarial"]


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def convnet(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).to(dtype)


def mlp_batch(seed: int = 1, n: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def conv_batch(seed: int = 1, n: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def hand_kl(p_logits, q_logits):
    """KL(softmax(p) ‖ softmax(q)) per sample, from probabilities, averaged over the batch."""
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    return (p * (p / q).log()).sum(1).mean()


def perturbed_copy(model, eps):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.add_(eps[name])
    return twin


def eps_at_current_state(nrs, model, x):
    """The ε the next call of ``nrs`` will use, without advancing its generator."""
    state = nrs.generator.get_state()
    eps = nrs.perturbation(model, x, model(x).detach())
    nrs.generator.set_state(state)
    return eps


# ---------------------------------------------------------------- alpha = 0 is the base loss

@pytest.mark.parametrize("neighbour", NEIGHBOURS)
def test_alpha_zero_is_exactly_the_base_loss(neighbour):
    model, x, y = convnet(dtype=torch.float32), *conv_batch(dtype=torch.float32)
    ref = copy.deepcopy(model)
    plain = F.cross_entropy(ref(x), y)
    plain.backward()
    loss = NRSLoss(alpha=0.0, sigma=0.5, neighbour=neighbour, seed=0)(model, x, y)
    loss.backward()
    assert torch.equal(loss, plain)
    for g, g_ref in zip(grads(model), grads(ref)):
        assert torch.equal(g, g_ref)


# ---------------------------------------------------------------- gradient

@pytest.mark.parametrize("neighbour", NEIGHBOURS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_matches_finite_differences(neighbour, divergence):
    # ε is a constant for differentiation: s(W) is taken from detached weights and the adversarial
    # direction is not differentiated through. The function NRS differentiates is therefore
    #     f(w) = CE(model_w(x), y) + α·D(p_w ‖ p_{w+ε*})   with ε* fixed at the draw for the base point,
    # not w ↦ NRS with ε redrawn from w (that would add α·∂D/∂ε·∂ε/∂w through s(W)). The reference
    # evaluates f with ε* pinned (the instance's `perturbation` replaced by a constant), and we first
    # check that pinning ε* reproduces the real loss bit for bit.
    model, (x, y) = mlp(), mlp_batch()
    nrs = NRSLoss(alpha=0.7, sigma=0.3, neighbour=neighbour, divergence=divergence, seed=4)
    eps = eps_at_current_state(nrs, model, x)
    loss = nrs(model, x, y)
    loss.backward()
    analytic = grads(model)

    pinned = NRSLoss(alpha=0.7, sigma=0.3, neighbour=neighbour, divergence=divergence, seed=123)
    pinned.perturbation = lambda *args, **kwargs: eps
    with torch.no_grad():
        assert torch.equal(pinned(model, x, y), loss.detach())
        assert pinned.last_divergence > 1e-4  # the divergence term is not negligible
        h = 1e-6
        pick = torch.Generator().manual_seed(0)
        for p, g in zip(model.parameters(), analytic):
            flat = p.view(-1)
            for i in torch.randperm(flat.numel(), generator=pick)[:4].tolist():
                old = flat[i].item()
                flat[i] = old + h
                up = pinned(model, x, y).item()
                flat[i] = old - h
                down = pinned(model, x, y).item()
                flat[i] = old
                assert (up - down) / (2 * h) == pytest.approx(g.view(-1)[i].item(), rel=1e-6, abs=1e-8)


def test_gradient_matches_a_hand_made_weight_copy():
    # Everything by hand: the noise rule of docs/algorithms.md with a twin generator, the neighbour as a deep
    # copy with ε added in place, KL from probabilities; the gradient is the sum of both models'.
    alpha, sigma, seed = 0.8, 0.2, 11
    model, (x, y) = convnet(), conv_batch()
    twin_model = copy.deepcopy(model)

    gen = torch.Generator().manual_seed(seed)
    eps = {}
    for name, p in twin_model.named_parameters():
        z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        w = p.detach()
        scale = w.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1)) if w.ndim >= 2 else w.norm()
        eps[name] = sigma * scale * z
    neighbour = perturbed_copy(twin_model, eps)
    clean, shifted = twin_model(x), neighbour(x)
    ref_loss = F.cross_entropy(clean, y) + alpha * hand_kl(clean, shifted)
    ref_loss.backward()
    ref_grads = [a.grad + b.grad for a, b in zip(twin_model.parameters(), neighbour.parameters())]

    loss = NRSLoss(alpha=alpha, sigma=sigma, seed=seed)(model, x, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for g, g_ref in zip(grads(model), ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # Both outputs carry gradient: dropping the neighbour's share changes the result.
    assert not all(torch.allclose(g, a.grad) for g, a in zip(grads(model), twin_model.parameters()))


# ---------------------------------------------------------------- determinism and side effects

@pytest.mark.parametrize("neighbour", NEIGHBOURS)
def test_fixed_seed_is_deterministic_and_draws_advance(neighbour):
    x, y = conv_batch()
    a, b = convnet(), convnet()
    nrs_a = NRSLoss(sigma=0.1, neighbour=neighbour, seed=7)
    nrs_b = NRSLoss(sigma=0.1, neighbour=neighbour, seed=7)
    la, lb = nrs_a(a, x, y), nrs_b(b, x, y)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for ga, gb in zip(grads(a), grads(b)):
        assert torch.equal(ga, gb)
    assert not torch.equal(nrs_a(a, x, y), la)  # the next call draws a new neighbour


def test_unseeded_loss_follows_torch_global_seed():
    x, y = mlp_batch()
    torch.manual_seed(3)
    first = NRSLoss(sigma=0.2)(mlp(), x, y)
    torch.manual_seed(3)
    second = NRSLoss(sigma=0.2)(mlp(), x, y)
    torch.manual_seed(4)
    third = NRSLoss(sigma=0.2)(mlp(), x, y)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_state_dict_resumes_the_noise():
    x, y = mlp_batch()
    model = mlp()
    nrs = NRSLoss(sigma=0.2, seed=5)
    nrs(model, x, y)
    saved = copy.deepcopy(nrs.state_dict())
    expected = nrs(model, x, y)
    resumed = NRSLoss(sigma=0.2, seed=99)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed(model, x, y), expected)
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})


@pytest.mark.parametrize("neighbour", NEIGHBOURS)
def test_weights_and_buffers_change_only_through_the_clean_pass(neighbour):
    x, y = conv_batch()
    model = convnet()
    reference = copy.deepcopy(model)
    reference(x)  # one plain forward: what the running statistics should become
    before = [p.detach().clone() for p in model.parameters()]
    nrs = NRSLoss(sigma=0.5, neighbour=neighbour, seed=0)
    nrs(model, x, y).backward()
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and buffers
    for name in buffers:
        assert torch.equal(buffers[name], expected[name]), name


def test_last_output_and_terms_are_detached_and_consistent():
    x, y = mlp_batch()
    model = mlp()
    nrs = NRSLoss(alpha=0.5, sigma=0.2, seed=0)
    loss = nrs(model, x, y)
    assert not nrs.last_output.requires_grad
    assert torch.equal(nrs.last_output, model(x).detach())  # the clean output (train-mode BN: batch stats)
    assert torch.equal(nrs.last_base_loss, F.cross_entropy(nrs.last_output, y))
    assert loss.item() == pytest.approx((nrs.last_base_loss + 0.5 * nrs.last_divergence).item(), rel=1e-14)
    nrs.alpha = 0.0
    nrs(model, x, y)
    assert nrs.last_divergence is None


def test_eval_mode_uses_running_stats_in_both_passes():
    x, y = conv_batch()
    model = convnet()
    model(x)  # give the running statistics some content
    model.eval()
    before = {k: b.clone() for k, b in model.named_buffers()}
    nrs = NRSLoss(sigma=0.0, seed=0)
    nrs(model, x, y)
    assert nrs.last_divergence == 0  # same weights, same (running) statistics
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k])


# ---------------------------------------------------------------- divergences

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_matches_hand_formula(divergence):
    x, y = mlp_batch()
    model = mlp()
    nrs = NRSLoss(alpha=1.0, sigma=0.4, divergence=divergence, seed=2)
    eps = eps_at_current_state(nrs, model, x)
    clean = model(x)
    shifted = perturbed_copy(model, eps)(x)
    forward, backward = hand_kl(clean, shifted), hand_kl(shifted, clean)
    expected = {"kl": forward, "reverse-kl": backward, "symmetric": (forward + backward) / 2}[divergence]
    nrs(model, x, y)
    assert nrs.last_divergence.item() == pytest.approx(expected.item(), rel=1e-10)
    assert forward.item() != pytest.approx(backward.item(), rel=1e-3)  # the directions do differ here


logit_lists = st.lists(
    st.lists(st.floats(-30, 30, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=5
)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_divergence_properties(data):
    rows = data.draw(logit_lists)
    other = data.draw(st.lists(st.lists(st.floats(-30, 30), min_size=4, max_size=4), min_size=len(rows), max_size=len(rows)))
    p, q = torch.tensor(rows, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    kl, rkl, sym = (output_divergence(p, q, d) for d in DIVERGENCES)
    # Mathematically ≥ 0; float64 rounding may leave a few ulp below zero when p ≈ q.
    assert kl >= -1e-12 and rkl >= -1e-12
    assert sym.item() == pytest.approx((kl.item() + rkl.item()) / 2, rel=1e-12, abs=1e-15)
    assert torch.equal(rkl, output_divergence(q, p, "kl"))
    assert output_divergence(p, p, "kl") == 0


@pytest.mark.parametrize("neighbour", NEIGHBOURS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sigma_zero_gives_zero_divergence(neighbour, divergence):
    x, y = conv_batch(dtype=torch.float32)
    nrs = NRSLoss(alpha=2.0, sigma=0.0, neighbour=neighbour, divergence=divergence, seed=0)
    loss = nrs(convnet(dtype=torch.float32), x, y)
    assert nrs.last_divergence == 0
    assert torch.equal(loss, nrs.last_base_loss)


# ---------------------------------------------------------------- adversarial neighbour

def filter_lengths(t):
    return t.flatten(1).norm(dim=1) if t.ndim >= 2 else t.norm().view(1)


def test_adversarial_neighbour_has_the_random_draws_length_per_filter():
    x, _ = conv_batch()
    model = convnet()
    clean = model(x).detach()
    random = NRSLoss(sigma=0.05, neighbour="random", seed=9).perturbation(model, x, clean)
    adversarial = NRSLoss(sigma=0.05, neighbour="adversarial", seed=9).perturbation(model, x, clean)
    assert random.keys() == adversarial.keys() == dict(model.named_parameters()).keys()
    for name in random:
        # Same length filter by filter (slices along dim 0 of conv/linear weights, whole 1-D tensors) …
        torch.testing.assert_close(filter_lengths(adversarial[name]), filter_lengths(random[name]), rtol=1e-12, atol=0)
        # … but a different direction (the weights; BN's zero-initialised bias has an ε of ~1e-18).
        if adversarial[name].ndim >= 2:
            assert not torch.allclose(adversarial[name], random[name])
    # The random draw itself has the expected length: ||ε_i|| ≈ σ·||W_i||·sqrt(n_i).
    w = model[0].weight
    ratio = filter_lengths(random["0.weight"]) / (0.05 * filter_lengths(w) * w[0].numel() ** 0.5)
    assert ratio.min() > 0.3 and ratio.max() < 2.0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_adversarial_neighbour_matches_its_rule_by_hand(divergence):
    # ε₀ = the random draw; g = ∇_ε D(p_w ‖ p_{w+ε}) at ε₀ with p_w constant, taken here as the weight
    # gradient of a deep copy holding W + ε₀; ε_i = g_i·||ε₀_i||/||g_i|| per filter. The sign matters
    # even though D is nearly quadratic in ε (so ±g give almost the same divergence).
    x, _ = mlp_batch()
    model = mlp()
    clean = model(x).detach()
    start = NRSLoss(sigma=0.1, neighbour="random", seed=6).perturbation(model, x, clean)
    adversarial = NRSLoss(sigma=0.1, neighbour="adversarial", divergence=divergence, seed=6).perturbation(model, x, clean)
    twin = perturbed_copy(model, start)
    shifted = twin(x)
    forward, backward = hand_kl(clean, shifted), hand_kl(shifted, clean)
    value = {"kl": forward, "reverse-kl": backward, "symmetric": (forward + backward) / 2}[divergence]
    value.backward()
    for name, p in twin.named_parameters():
        g = p.grad
        if g.norm() < 1e-12:
            continue  # the bias before BatchNorm: D does not depend on it, g is rounding noise
        if g.ndim >= 2:
            expected = g * (filter_lengths(start[name]) / filter_lengths(g)).view(-1, 1)
        else:
            expected = g * (start[name].norm() / g.norm())
        torch.testing.assert_close(adversarial[name], expected, rtol=1e-8, atol=1e-14)


def test_adversarial_neighbour_increases_the_divergence():
    x, y = conv_batch(n=16)
    model = convnet()
    gains = []
    for seed in range(5):
        losses = {}
        for neighbour in NEIGHBOURS:
            nrs = NRSLoss(sigma=0.05, neighbour=neighbour, seed=seed)
            nrs(model, x, y)
            losses[neighbour] = nrs.last_divergence.item()
        gains.append(losses["adversarial"] / losses["random"])
    assert sum(gains) / len(gains) > 1.5


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"alpha": -0.5}, "alpha=-0.5"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"sigma": -1e-3}, "sigma=-0.001"),
        ({"sigma": float("inf")}, "sigma=inf"),
        ({"neighbour": "gaussian"}, "neighbour='gaussian'"),
        ({"divergence": "js"}, "divergence='js'"),
        ({"divergence": "KL"}, "divergence='KL'"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_value(kwargs, shown):
    with pytest.raises(ValueError) as info:
        NRSLoss(**kwargs)
    message = str(info.value)
    assert shown in message
    if "neighbour" in kwargs:
        assert "'random'" in message and "'adversarial'" in message
    if "divergence" in kwargs:
        assert "'reverse-kl'" in message and "'symmetric'" in message
    if "alpha" in kwargs or "sigma" in kwargs:
        assert "[0.0, inf)" in message


def test_invalid_values_are_refused_when_set_later_and_seed_with_generator():
    nrs = NRSLoss()
    with pytest.raises(ValueError, match="sigma=-1"):
        nrs.sigma = -1
    with pytest.raises(ValueError, match="seed= or generator="):
        NRSLoss(seed=0, generator=torch.Generator())
