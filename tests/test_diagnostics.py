"""flatmin.diagnostics.StepTracker against cases computable by hand."""
import torch
from torch import nn

import flatmin
from flatmin.diagnostics import StepTracker

MiB = 2**20


def test_peak_follows_allocations_and_frees():
    def allocs():
        a = torch.ones(MiB // 4)  # 1 MiB
        b = torch.ones(MiB // 2)  # 2 MiB
        del a
        c = torch.ones(MiB // 8)  # 0.5 MiB
        del b, c

    tracker = StepTracker()
    with tracker:
        allocs()
    assert tracker.peak_bytes == 3 * MiB


def test_views_and_in_place_ops_allocate_nothing():
    x = torch.zeros(1000)
    tracker = StepTracker()
    with tracker:
        x.add_(1)
        x.view(10, 100).mul_(2)
        x[:10].zero_()
    assert tracker.peak_bytes == 0
    assert tracker.own_ops >= 4  # add_, view, mul_, slice, zero_


def test_work_inside_a_closure_is_attributed_to_it():
    held = []

    def closure():
        held.append(torch.ones(MiB // 4))
        return torch.ones(3).sum()

    tracker = StepTracker()
    with tracker:
        outside = torch.ones(MiB // 2)
        tracker.closure(closure)()
    assert tracker.peak_bytes >= 3 * MiB
    assert tracker.own_peak_bytes == 2 * MiB
    assert tracker.closure_ops == 3  # ones, ones, sum
    assert tracker.own_op_counts["aten.ones"] == 1
    del outside


def test_counts_a_plain_sgd_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 4), torch.randn(5, 3)

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    tracker = StepTracker()
    with tracker:
        opt.zero_grad()
        opt.step(tracker.closure(closure))
    assert tracker.own_op_counts["aten.add_"] == 2  # p -= lr * g, one per tensor (momentum 0)
    assert tracker.closure_ops > 5


def test_rwp_keeps_one_draw_of_noise_beyond_sgd():
    # Two 1.5 MiB weights: above the 1 MiB floor, RWP keeps the larger one's noise, redraws the rest.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 512, bias=False), nn.Linear(512, 768, bias=False))
    x = torch.randn(4, 768)

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    def own_peak(step):
        step(closure)  # state exists before measuring
        tracker = StepTracker()
        with tracker:
            step(tracker.closure(closure))
        return tracker.own_peak_bytes

    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    rwp = flatmin.RWP(model.parameters(), torch.optim.SGD, lr=0.0, seed=0)
    assert own_peak(lambda c: (sgd.zero_grad(), sgd.step(c))) == 0
    model.zero_grad()  # SGD's gradient is not RWP's to use
    largest = 768 * 512 * 4
    assert largest <= own_peak(rwp.step) <= largest + 64 * 1024
