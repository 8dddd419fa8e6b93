"""Perturbation primitives shared by every method: Gaussian draws and shifting the weights in place
with a guaranteed way back. The filter-wise scales the noise is multiplied by are in ``filters``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sharding import is_sharded, local, local_range


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
    """``z ~ N(0, I)`` of ``shape`` from ``generator``, returned with ``like``'s dtype and device; for a
    complex ``like``, the real and imaginary parts are each ``N(0, 1)`` (a pair of reals)."""
    if like.is_complex():
        z = torch.view_as_complex(torch.randn((*shape, 2), generator=generator, device=generator.device,
                                              dtype=like.dtype.to_real()))
    else:
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


KEEP_FLOOR_BYTES = 2**20


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

    With ``hold``, when all the noise is kept and it takes at most ``KEEP_FLOOR_BYTES`` (a small
    model), its buffer is kept between steps too and every step draws into it: a step then
    allocates and views nothing, at the price of that buffer held between steps.
    """

    def __init__(self, params: Sequence[Tensor], budget: int, hold: bool = False) -> None:
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
        self.persistent = hold and not self.sharded and self.redrawn == 0 and sum(nbytes) <= KEEP_FLOOR_BYTES
        # A complex tensor's noise is a pair of reals per element, each N(0, 1): drawn through its real view.
        self.complex = any(p.is_complex() for p in params)
        self._buffers: Dict[int, Tuple[Tensor, List[Tensor]]] = {}  # draw -> (flat, views), if persistent

    def draw(self, k: int, params: Sequence[Tensor], generator: torch.Generator) -> List[Tensor]:
        """Draw ``k``: ``z ~ N(0, I)`` for each of its tensors (their local part), views of one flat draw."""
        held = self._buffers.get(k)
        if held is not None:
            held[0].normal_(generator=generator)
            return list(held[1])
        indices = self.draws[k][1]
        tensors = [params[i] for i in indices]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=generator.device)
        normal = torch.view_as_real(flat) if self.complex and flat.is_complex() else flat
        normal.normal_(generator=generator)
        if flat.device != tensors[0].device:
            flat = flat.to(tensors[0].device)
        out = []
        for z, t, (start, stop) in zip(flat.split([t.numel() for t in tensors]), tensors,
                                       [self.ranges[i] for i in indices]):
            if stop - start != t.numel():
                z = z[start:stop]
            shape = local(t).shape if self.sharded else t.shape
            out.append(z if z.shape == shape else z.view(shape))
        if self.persistent and flat.device == generator.device:
            self._buffers[k] = (normal, out)
            out = list(out)
        return out

    def skip(self, params: Sequence[Tensor], generator: torch.Generator) -> None:
        """Move ``generator`` as one shift would, without touching any tensor."""
        for k in range(len(self.draws)):
            self.draw(k, params, generator)


def keep_budget(params: Sequence[Tensor]) -> int:
    """How much noise a step may keep in memory: the largest tensor's bytes, and at least 1 MiB.

    Redrawing costs as much as drawing. Keeping up to the largest tensor costs no more memory than
    the single draw that redrawing needs anyway; the 1 MiB floor keeps all the noise of small
    models (up to 256k float32 weights), where the draw is a large part of a step and 1 MiB is
    nothing next to the activations.
    """
    return max([KEEP_FLOOR_BYTES, *(p.numel() * p.element_size() for p in params)])


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
