"""What differs between devices, on every device present (the CPU always, CUDA when there is a
GPU; tests/conftest.py): where the noise generator lives and where the noise is drawn, fp16
autocast with a GradScaler, and the foreach path that takes the norms of 1-D tensors on a GPU.
The maths on each device is in test_optim_reference.py and test_optim_behaviour.py, parametrised
over the same devices."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatmin
from flatmin import filters
from flatmin.filters import FilterSlots

METHODS = ["rwp", "arwp", "m-rwp", "m-arwp", "sam", "asam"]


def make_model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3)).to(device)


def data(device, n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x.to(device), ((x[:, 0] > 0).long() + (x[:, 1] > 0).long()).to(device)


def recorded_eps(opt, params, loss_fn):
    before = [p.detach().clone() for p in params]
    seen = {}

    def closure():
        seen["eps"] = [p.detach() - b for p, b in zip(params, before)]
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return seen["eps"], before


@pytest.mark.parametrize("own", [True, False], ids=["own generator", "cpu generator"])
def test_the_noise_is_drawn_from_the_generator_on_its_device(device, own):
    """The optimizer's own generator is made on the parameters' device; a generator given on another
    device draws there and the noise is moved. Either way ε = σ · s(W) ⊙ z with z from a copy of
    that generator, exactly as a plain ``randn`` on its device draws it."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 7, device=device)), nn.Parameter(torch.randn(7, device=device))]
    kw = {"seed": 4} if own else {"generator": torch.Generator().manual_seed(4)}
    opt = flatmin.RWP(params, torch.optim.SGD, sigma=0.1, lr=0.0, **kw)
    assert opt.generator.device.type == (device.type if own else "cpu")
    gen = torch.Generator(device=opt.generator.device)
    gen.set_state(opt.generator.get_state())
    eps, before = recorded_eps(opt, params, lambda: sum(p.square().sum() for p in params))
    flat = torch.randn(35 + 7, generator=gen, device=gen.device).to(device)
    z = [flat[:35].view(5, 7), flat[35:]]
    scales = [before[0].norm(dim=1, keepdim=True), before[1].norm()]
    for e, zz, s in zip(eps, z, scales):
        torch.testing.assert_close(e, 0.1 * s * zz, rtol=1e-5, atol=1e-6)
    # The generator's state goes through state_dict on the CPU, whatever its device.
    state = opt.state_dict()["generator"]
    assert state.device.type == "cpu"
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_fp16_autocast_with_a_grad_scaler_trains(device, method):
    """float16 autocast and a GradScaler, the usual mixed precision on a GPU: the loss falls, no
    update is skipped after the scaler has found its scale, and the weights stay float32."""
    model = make_model(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    opt = flatmin.create(method, model, lr=0.1, momentum=0.9, seed=0, grad_scaler=scaler)
    x, y = data(device)

    def closure():
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    losses = []
    for _ in range(25):
        losses.append(float((opt.step(closure, closure) if opt.batches_per_step == 2 else opt.step(closure)).detach()))
        scaler.update()
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert scaler.get_scale() >= 1.0
    if method in ("arwp", "m-arwp"):
        assert all(torch.isfinite(opt.state[p]["F"]).all() for p in model.parameters())


def test_foreach_and_per_tensor_norms_agree(device, monkeypatch):
    """``FilterSlots.norms`` takes the norms of 1-D tensors one call each on the CPU and by one
    foreach call elsewhere (also spreading each over its elements' slots, per_element). Both paths
    run here on the device present: the same numbers (bit for bit on the CPU, where the foreach op
    is a loop of the same reductions; to float32 rounding on a GPU)."""
    torch.manual_seed(0)
    params = [torch.randn(8, 3, 3, device=device), torch.randn(8, device=device), torch.randn((), device=device),
              torch.zeros(5, device=device), torch.randn(4, 6, device=device).double(), torch.randn(6, device=device)]
    results = {}
    for path, devices in [("per tensor", {"cpu", "cuda"}), ("foreach", set())]:
        monkeypatch.setattr(filters, "PER_TENSOR_NORM_DEVICES", devices)
        for per_element in (False, True):
            slots = FilterSlots(params, per_element=per_element)
            assert all(b.per_tensor_norms == (path == "per tensor") for b in slots.buckets)
            results[path, per_element] = [v.clone() for v in slots.norms(slots.buffer()).views]
    for per_element in (False, True):
        for a, b in zip(results["per tensor", per_element], results["foreach", per_element]):
            if device.type == "cpu":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # And both are s(W): per filter, one norm per 1-D tensor (floored), spread per element.
    want = [params[0].flatten(1).norm(dim=1).view(8, 1, 1), params[1].norm(), params[2].abs(),
            torch.full((), 1e-16, device=device), params[4].norm(dim=1, keepdim=True), params[5].norm()]
    for got, w in zip(results["foreach", False], want):
        torch.testing.assert_close(got, w.to(got.dtype), rtol=1e-6, atol=0)
    for got, w, p in zip(results["foreach", True], want, params):
        torch.testing.assert_close(got, w.to(got.dtype).expand(got.shape), rtol=1e-6, atol=0)
        assert got.shape == ((p.shape[0],) + (1,) * (p.ndim - 1) if p.ndim >= 2 else p.shape)
