"""Perturbation primitives shared by every method: filter-wise scales, Gaussian draws and
shifting the weights in place with a guaranteed way back.

Notation (docs/algorithms.md, "Filter-wise scale"): a trainable tensor ``W``; its filter-wise scale ``s(W)`` is

* ``s_i = ||W_i||_2`` for slice ``i`` along dim 0 when ``W.ndim >= 2`` (one output filter or neuron),
* ``s = ||W||_2`` for the whole tensor when ``W.ndim <= 1`` (biases, normalisation affines),

floored at ``1e-16`` so that an all-zero tensor is perturbed by 0 rather than NaN.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sharding import is_sharded, local, local_range, shard_group, sum_over_shards

SCALE_FLOOR = 1e-16


def is_filterwise(w: Tensor) -> bool:
    """Whether ``w`` is scaled per slice along dim 0 (``ndim >= 2``) or as one tensor."""
    return w.ndim >= 2


def filter_view(v: Tensor, w: Tensor) -> Tensor:
    """Reshape a per-filter vector ``v`` (length ``w.shape[0]``) to broadcast over ``w``'s slices."""
    return v.view(-1, *([1] * (w.ndim - 1)))


def _filter_dims(w: Tensor) -> Tuple[int, ...]:
    return tuple(range(1, w.ndim))


def filter_norms(w: Tensor) -> Tensor:
    """``s(W)`` broadcastable against ``W``: shape ``(out, 1, ..., 1)`` for ``ndim >= 2``, 0-d otherwise."""
    return filter_scales([w])[0]


def filter_scales(params: Sequence[Tensor]) -> List[Tensor]:
    """``filter_norms`` of every tensor, with one reduction per filter-wise tensor and one call for
    all the others together (what an optimizer step computes for each of its tensors).

    For a tensor sharded along dim 0 (``flatmin.sharding``) the scale covers this process's rows:
    a filter lies whole on one process, and the norm of a split 1-D tensor is summed over the
    processes that share it.
    """
    values = [local(p) for p in params]
    whole = [i for i, p in enumerate(params) if not is_filterwise(p)]
    norms = dict(zip(whole, torch._foreach_norm([values[i] for i in whole]) if whole else ()))
    split = [i for i in whole if shard_group(params[i]) is not None]
    if split:
        squares = [norms[i].square() for i in split]
        sum_over_shards(squares, [params[i] for i in split])
        norms.update(zip(split, torch._foreach_sqrt(squares)))
    scales = [torch.linalg.vector_norm(v, dim=_filter_dims(v), keepdim=True) if i not in norms else norms[i]
              for i, v in enumerate(values)]
    if scales:
        torch._foreach_clamp_min_(scales, SCALE_FLOOR)
    return scales


def filter_sq_sums(g: Tensor) -> Tensor:
    """``Σ_{j in slice i} g_j²`` per filter (shape ``(out,)``) for ``ndim >= 2``; ``g²`` elementwise otherwise.

    This is the per-filter statistic ARWP keeps: ``F_i = Σ_j M_j`` is linear in ``M``, so an EMA of
    these sums equals the per-filter sum of the elementwise EMA ``M`` (one number per filter).
    """
    return filter_sq_sums_of([g])[0]


def filter_sq_sums_of(grads: Sequence[Tensor]) -> List[Tensor]:
    """``filter_sq_sums`` of every tensor (of its local rows when sharded), in at least float32
    (float64 stays float64)."""
    grads = [local(g) for g in grads]
    sums = []
    for g in grads:
        dtype = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        if is_filterwise(g):
            # vector_norm reduces without materialising g², keeping the transient memory at zero.
            sums.append(torch.linalg.vector_norm(g, dim=_filter_dims(g), dtype=dtype))
        else:
            sums.append(g if g.dtype == dtype else g.to(dtype))
    if not sums:
        return sums
    filterwise = [t for t, g in zip(sums, grads) if is_filterwise(g)]
    if filterwise:
        torch._foreach_mul_(filterwise, filterwise)
    elementwise = [i for i, g in enumerate(grads) if not is_filterwise(g)]
    if elementwise:
        squares = torch._foreach_mul([sums[i] for i in elementwise], [sums[i] for i in elementwise])
        for i, square in zip(elementwise, squares):
            sums[i] = square
    return sums


def owned_generator(
    seed: Optional[int] = None, generator: Optional[torch.Generator] = None, device: torch.device = torch.device("cpu")
) -> torch.Generator:
    """The generator a method draws its noise from: ``generator`` itself, or a new one on ``device``
    seeded with ``seed`` (drawn from torch's global generator when ``None``, so that
    ``torch.manual_seed`` makes runs repeatable). Giving both is an error."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed= or generator=, not both")
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(int(seed))


def gaussian_draw(shape: torch.Size, generator: torch.Generator, like: Tensor) -> Tensor:
    """``z ~ N(0, I)`` of ``shape`` from ``generator``, returned with ``like``'s dtype and device."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return z if z.device == like.device else z.to(like.device)


def gaussian_deltas(
    params: Sequence[Tensor], scales: Sequence[Tensor], generator: torch.Generator
) -> Callable[[], Iterator[Tensor]]:
    """Deltas ``ε = scale ⊙ z`` with ``z ~ N(0, I)``, reproducible on demand.

    The returned function rewinds ``generator`` to its current state and yields the same ``ε``
    tensors, one at a time, every time it is called. Calling it twice (apply, then undo) costs a
    second draw instead of a stored copy of the noise.
    """
    start = generator.get_state()

    def deltas() -> Iterator[Tensor]:
        generator.set_state(start)
        for p, scale in zip(params, scales):
            yield gaussian_draw(p.shape, generator, p).mul_(scale)

    return deltas


@contextmanager
def shifted_by(params: Sequence[Tensor], deltas: Sequence[Tensor], exact: bool = False) -> Iterator[None]:
    """Inside the block ``w ← w + δ`` for tensors ``δ`` held in memory; on exit, also on an exception,
    ``w ← w − δ`` (a few ulp from ``w``), or with ``exact=True`` a copy of ``w`` taken before (bit-exact)."""
    params = list(params)
    snapshot = [p.detach().clone() for p in params] if exact else None
    with torch.no_grad():
        torch._foreach_add_(params, list(deltas))
    try:
        yield
    finally:
        with torch.no_grad():
            if snapshot is not None:
                torch._foreach_copy_(params, snapshot)
            else:
                torch._foreach_sub_(params, list(deltas))


@contextmanager
def shifted_weights(
    params: Sequence[Tensor], deltas: Callable[[], Iterable[Tensor]], exact: bool = False
) -> Iterator[None]:
    """Inside the block ``w ← w + δ`` for every tensor; on exit, also on an exception, ``w`` comes back.

    The way back subtracts the same ``δ`` produced again by ``deltas()`` (no copy of the weights is
    kept; the result is ``w`` up to a few ulp of rounding) or, with ``exact=True``, copies back a
    snapshot of the weights taken before the shift (bit-exact, one copy of the weights).
    """
    snapshot = [p.detach().clone() for p in params] if exact else None
    shifted = 0
    try:
        with torch.no_grad():
            for p, delta in zip(params, deltas()):
                p.add_(delta)
                shifted += 1
        yield
    finally:
        with torch.no_grad():
            if snapshot is not None:
                for p, saved in zip(params[:shifted], snapshot):
                    p.copy_(saved)
            else:
                # δ is the same rounded tensor both times, so (w + δ) − δ is w up to one rounding.
                for p, delta in zip(params[:shifted], deltas()):
                    p.sub_(delta)


class NoiseLayout:
    """How the noise of a list of tensors is drawn: in a few flat draws instead of one per tensor.

    The noise must be made twice, once to shift the weights and once to undo the shift, unless
    it is kept. Keeping all of it would be a copy of the weights, so at most ``budget`` bytes are
    kept: the largest tensors that fit, chosen greedily by size. The rest is drawn again from the
    generator state saved before it. The draw order is:

    1. the tensors whose noise is redrawn, in their order, then the kept tensors, in their order;
    2. consecutive tensors of that order share one draw, ``z = randn(n)`` split in order, as long as
       they have one dtype and device, their bytes add up to at most ``budget``, and a draw never
       mixes redrawn and kept tensors.

    With ``budget`` at least the largest tensor, the noise in memory at any moment is one draw of
    at most ``budget`` bytes, and a handful of draws replace one per tensor. For tensors sharded
    along dim 0 every process draws the noise of the whole tensors and uses its own rows; nothing
    is kept there, so the noise in memory stays one draw of unsharded noise.
    """

    def __init__(self, params: Sequence[Tensor], budget: int) -> None:
        nbytes = [p.numel() * p.element_size() for p in params]
        self.sharded = any(is_sharded(p) for p in params)
        # A sharded tensor's noise is a slice of the whole tensor's draw: keeping the slice would
        # hold it beside the next draw, so sharded models draw everything again instead.
        kept, room = set(), 0 if self.sharded else budget
        for i in sorted(range(len(params)), key=lambda i: -nbytes[i]):
            if nbytes[i] <= room:
                kept.add(i)
                room -= nbytes[i]
        order = [i for i in range(len(params)) if i not in kept] + sorted(kept)
        self.key = _layout_key(params)
        self.draws: List[Tuple[bool, List[int]]] = []  # (kept, tensor indices) per draw, in order
        for i in order:
            last = self.draws[-1] if self.draws else None
            if (last is not None and last[0] == (i in kept) and params[last[1][0]].dtype == params[i].dtype
                    and params[last[1][0]].device == params[i].device
                    and sum(nbytes[j] for j in last[1]) + nbytes[i] <= budget):
                last[1].append(i)
            else:
                self.draws.append((i in kept, [i]))
        self.redrawn = sum(1 for is_kept, _ in self.draws if not is_kept)  # the first ``redrawn`` draws
        # Sharded tensors draw the noise of the whole tensor and use their own range of it.
        self.ranges = [local_range(p) for p in params]

    def draw(self, k: int, params: Sequence[Tensor], generator: torch.Generator) -> List[Tensor]:
        """Draw ``k``: ``z ~ N(0, I)`` for each of its tensors (their local part), views of one flat draw."""
        indices = self.draws[k][1]
        tensors = [params[i] for i in indices]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=generator.device)
        flat.normal_(generator=generator)
        if flat.device != tensors[0].device:
            flat = flat.to(tensors[0].device)
        out = []
        for z, t, (start, stop) in zip(flat.split([t.numel() for t in tensors]), tensors,
                                       [self.ranges[i] for i in indices]):
            if stop - start != t.numel():
                z = z[start:stop]
            shape = local(t).shape if self.sharded else t.shape
            out.append(z if z.shape == shape else z.view(shape))
        return out

    def skip(self, params: Sequence[Tensor], generator: torch.Generator) -> None:
        """Move ``generator`` as one shift would, without touching any tensor."""
        for k in range(len(self.draws)):
            self.draw(k, params, generator)


def _layout_key(params: Sequence[Tensor]) -> Tuple:
    return tuple((id(p), p.shape, p.dtype, p.device) for p in params)


KEEP_FLOOR_BYTES = 2**20


def keep_budget(params: Sequence[Tensor]) -> int:
    """How much noise a step may keep in memory: the largest tensor's bytes, and at least 1 MiB.

    Redrawing costs as much as drawing. Keeping up to the largest tensor costs no more memory than
    the single draw that redrawing needs anyway; the 1 MiB floor keeps all the noise of small
    models (up to 256k float32 weights), where the draw is a large part of a step and 1 MiB is
    nothing next to the activations.
    """
    return max([KEEP_FLOOR_BYTES, *(p.numel() * p.element_size() for p in params)])


def noise_layout(params: Sequence[Tensor], cached: Optional[NoiseLayout] = None) -> NoiseLayout:
    """``cached`` if it was made for these very tensors, else a new ``NoiseLayout`` with the
    ``keep_budget`` of ``params``."""
    if cached is not None and cached.key == _layout_key(params):
        return cached
    return NoiseLayout(params, keep_budget(params))


@contextmanager
def gaussian_shift(
    params: Sequence[Tensor], scales: Sequence[Tensor], generator: torch.Generator, layout: NoiseLayout, *,
    exact: bool = False,
) -> Iterator[None]:
    """Inside the block ``w ← w + δ`` with ``δ = scale ⊙ z``, ``z ~ N(0, I)`` from ``generator``
    drawn as ``layout`` says; on exit, also on an exception, ``w`` comes back: ``(w + δ) − δ`` with
    the same rounded ``δ`` (a few ulp), or bit-exact from a snapshot of the weights with ``exact=True``.

    The noise of the kept draws stays in memory for the undo; the others are drawn again from the
    generator state saved before them. The generator ends where one shift leaves it, with or
    without an exception, so that resuming and the undo never change what later steps draw.
    """
    targets = [local(p) for p in params] if layout.sharded else list(params)
    snapshot = [t.detach().clone() for t in targets] if exact else None
    start = generator.get_state() if layout.redrawn and not exact else None  # where the redraw begins
    kept: List[Tuple[List[int], List[Tensor]]] = []
    applied = 0
    try:
        with torch.no_grad():
            for k, (is_kept, indices) in enumerate(layout.draws):
                delta = _deltas(layout, k, params, scales, generator)
                torch._foreach_add_([targets[i] for i in indices], delta)
                applied = k + 1
                if is_kept and not exact:
                    kept.append((indices, delta))
                del delta
        yield
    finally:
        end = generator.get_state() if start is not None else None
        with torch.no_grad():
            if snapshot is not None:
                torch._foreach_copy_(targets, snapshot)
            else:
                while kept:  # freed before any redraw: one draw in memory at a time
                    indices, delta = kept.pop()
                    torch._foreach_sub_([targets[i] for i in indices], delta)
                    del delta
                if start is not None:
                    generator.set_state(start)
                for k in range(min(applied, layout.redrawn)):
                    torch._foreach_sub_([targets[i] for i in layout.draws[k][1]],
                                        _deltas(layout, k, params, scales, generator))
        if end is not None:
            generator.set_state(end)


def _deltas(layout: NoiseLayout, k: int, params: Sequence[Tensor], scales: Sequence[Tensor],
            generator: torch.Generator) -> List[Tensor]:
    """``δ = scale ⊙ z`` for the tensors of draw ``k``, in the draw's memory. Rounded the same way
    every time, so ``(w + δ) − δ`` is ``w`` up to one rounding (and exactly ``w`` when ``w = 0``)."""
    z = layout.draw(k, params, generator)
    torch._foreach_mul_(z, [scales[i] for i in layout.draws[k][1]])
    return z
