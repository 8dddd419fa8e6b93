"""flatmin.filters: the filter-wise numbers of many tensors laid out in flat buffers, checked against
plain per-tensor re-computations written here from docs/algorithms.md."""
import pytest
import torch

from flatmin.filters import FilterSlots, SlotBuffer, filter_scales, filter_sq_sums

FLOOR = 1e-16


def plain_norm(w):
    """s(W) in float64: per slice along dim 0 for ndim >= 2, of the whole tensor otherwise; floored."""
    w = w.double()
    if w.dim() >= 2:
        return w.reshape(w.shape[0], -1).norm(dim=1).clamp(min=FLOOR)
    return w.norm().clamp(min=FLOOR).reshape(())


def plain_sq_sums(g):
    g = g.double()
    return (g.reshape(g.shape[0], -1) ** 2).sum(dim=1) if g.dim() >= 2 else g * g


def mixed_tensors():
    """Tensors of three dtypes, interleaved, with a 0-d, an empty, a length-1 and an all-zero filter."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(5, 2, 3, 3, generator=gen)
    conv[2] = 0  # an all-zero filter: floored, not NaN
    return [
        conv,
        torch.randn(7, generator=gen, dtype=torch.float64),
        torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        torch.randn((), generator=gen),
        torch.zeros(0),
        torch.randn(1, generator=gen, dtype=torch.float64),
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(9, generator=gen).to(torch.bfloat16),
    ]


@pytest.mark.parametrize("per_element", [False, True])
def test_norms_of_every_tensor_match_a_plain_computation(per_element):
    tensors = mixed_tensors()
    slots = FilterSlots(tensors, per_element=per_element)
    assert len(slots.buckets) == 3  # one flat buffer per dtype
    views = slots.norms(slots.buffer()).views
    for t, view in zip(tensors, views):
        want = plain_norm(t)
        if t.dim() >= 2:
            assert view.shape == (t.shape[0],) + (1,) * (t.dim() - 1)
            got = view.reshape(-1)
        elif per_element:  # the tensor's one norm in each of its slots
            assert view.shape == t.shape
            got = view
            want = want.expand(t.shape)
        else:
            assert view.shape == ()
            got = view
        assert got.dtype == t.dtype
        tol = 1e-2 if t.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
    # broadcasting against its tensor gives the per-filter scale of every element
    assert (views[0] * tensors[0]).shape == tensors[0].shape
    assert views[0].reshape(-1)[2] == FLOOR


def test_sq_sums_match_a_plain_computation_in_at_least_float32():
    tensors = mixed_tensors()
    slots = FilterSlots(tensors, per_element=True)
    sums = slots.sq_sums(slots.buffer(stats=True), tensors)
    for t, view in zip(tensors, sums.views):
        assert view.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(view.reshape(-1).double(), plain_sq_sums(t).reshape(-1), rtol=1e-6, atol=0)
    for t in tensors:
        torch.testing.assert_close(filter_sq_sums(t).double(), plain_sq_sums(t), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="per_element=True"):
        FilterSlots(tensors).sq_sums(FilterSlots(tensors).buffer(), tensors)


def test_a_number_per_tensor_is_one_number_when_all_agree_else_written_into_the_slots():
    tensors = mixed_tensors()
    slots = FilterSlots(tensors, per_element=True)
    uniform = slots.per_slot("sigma", [0.5] * len(tensors))
    assert [t.shape for t in uniform] == [()] * 3 and all(t.item() == 0.5 for t in uniform)
    assert [t.item() for t in slots.per_slot("sigma", [0.25] * len(tensors))] == [0.25] * 3  # refilled
    values = [float(i + 1) for i in range(len(tensors))]
    flats = slots.per_slot("eta", values)
    for value, view in zip(values, SlotBuffer(slots, flats).views):
        assert (view == value).all()
    assert slots.per_slot("eta", values) is flats  # remembered for the same values
    assert [t.item() for t in slots.per_slot("sigma", [0.25] * len(tensors))] == [0.25] * 3  # by name
    buffer = slots.norms(slots.buffer())
    before = [v.clone() for v in buffer.views]
    buffer.mul_(slots.per_slot("eta", values))
    for value, old, new in zip(values, before, buffer.views):
        torch.testing.assert_close(new, (old.float() * value).to(new.dtype))


def test_filter_scales_broadcast_against_their_tensors():
    tensors = mixed_tensors()
    for t, scale in zip(tensors, filter_scales(tensors)):
        assert (scale * t).shape == t.shape
        assert scale.shape == ((t.shape[0],) + (1,) * (t.dim() - 1) if t.dim() >= 2 else ())


@pytest.mark.parametrize("per_element", [False, True])
def test_the_accelerator_path_for_1d_norms_gives_the_same_numbers(per_element):
    """Off the CPU the norms of the 1-D tensors are one foreach op; the choice depends only on the
    bucket's device, so the path is run here on CPU tensors and must agree bit for bit."""
    tensors = mixed_tensors()
    on_cpu = FilterSlots(tensors, per_element=per_element)
    elsewhere = FilterSlots(tensors, per_element=per_element)
    out = elsewhere.buffer()
    for bucket in elsewhere.buckets:
        bucket.device = torch.device("cuda")  # only the branch taken changes
    want = on_cpu.norms(on_cpu.buffer())
    got = elsewhere.norms(out)
    for a, b in zip(want.flats, got.flats):
        assert torch.equal(a, b)
