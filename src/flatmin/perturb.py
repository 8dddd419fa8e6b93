"""Perturbation primitives shared by every method: filter-wise scales, Gaussian draws and
shifting the weights in place with a guaranteed way back.

Notation (docs/algorithms.md, "Filter-wise scale"): a trainable tensor ``W``; its filter-wise scale ``s(W)`` is

* ``s_i = ||W_i||_2`` for slice ``i`` along dim 0 when ``W.ndim >= 2`` (one output filter or neuron),
* ``s = ||W||_2`` for the whole tensor when ``W.ndim <= 1`` (biases, normalisation affines),

floored at ``1e-16`` so that an all-zero tensor is perturbed by 0 rather than NaN.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

SCALE_FLOOR = 1e-16


def is_filterwise(w: Tensor) -> bool:
    """Whether ``w`` is scaled per slice along dim 0 (``ndim >= 2``) or as one tensor."""
    return w.ndim >= 2


def filter_view(v: Tensor, w: Tensor) -> Tensor:
    """Reshape a per-filter vector ``v`` (length ``w.shape[0]``) to broadcast over ``w``'s slices."""
    return v.view(-1, *([1] * (w.ndim - 1)))


def filter_norms(w: Tensor) -> Tensor:
    """``s(W)`` broadcastable against ``W``: shape ``(out, 1, ..., 1)`` for ``ndim >= 2``, 0-d otherwise."""
    if is_filterwise(w):
        s = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        return filter_view(s, w).clamp_min(SCALE_FLOOR)
    return torch.linalg.vector_norm(w).clamp_min(SCALE_FLOOR)


def filter_sq_sums(g: Tensor) -> Tensor:
    """``Σ_{j in slice i} g_j²`` per filter (shape ``(out,)``) for ``ndim >= 2``; ``g²`` elementwise otherwise.

    This is the per-filter statistic ARWP keeps: ``F_i = Σ_j M_j`` is linear in ``M``, so an EMA of
    these sums equals the per-filter sum of the elementwise EMA ``M`` (one number per filter).
    """
    dtype = torch.promote_types(g.dtype, torch.float32)  # at least float32, float64 stays float64
    if is_filterwise(g):
        # vector_norm reduces without materialising g², keeping the transient memory at zero.
        return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=dtype).square_()
    return g.to(dtype).square()


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


@contextmanager
def gaussian_shift(
    params: Sequence[Tensor], scales: Sequence[Tensor], generator: torch.Generator, *,
    exact: bool = False, keep_bytes: int = 0,
) -> Iterator[None]:
    """Inside the block ``w ← w + scale ⊙ z``, ``z ~ N(0, I)`` from ``generator``; on exit, also on an
    exception, ``w`` comes back (up to a few ulp; bit-exact from a snapshot with ``exact=True``).

    Undoing needs ``ε`` again. Drawing it twice doubles the cost of the noise, which on a CPU is
    the main cost of RWP for small models; keeping all of it would be a copy of the weights. So the
    noise of the largest tensors whose sizes add up to at most ``keep_bytes`` is kept, and the rest
    is drawn again: each run of consecutive redrawn tensors from the generator state saved where
    that run began (one state per run, not per tensor). The kept
    noise is subtracted first and freed before any redraw, so the memory beyond the weights is at
    most ``keep_bytes`` at any moment (plus one redrawn tensor once the kept noise is gone). The
    generator ends where one draw of all the noise leaves it.
    """
    if exact:
        with shifted_weights(params, gaussian_deltas(params, scales, generator), exact=True):
            yield
        return
    keep, budget = set(), keep_bytes
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel() * params[i].element_size()):
        size = params[i].numel() * params[i].element_size()
        if size <= budget:
            keep.add(i)
            budget -= size
    kept: dict = {}
    states: dict = {}
    applied: list = []
    try:
        with torch.no_grad():
            for i, (p, scale) in enumerate(zip(params, scales)):
                if i not in keep and (i == 0 or i - 1 in keep):
                    states[i] = generator.get_state()  # a run of redrawn tensors starts here
                delta = gaussian_draw(p.shape, generator, p).mul_(scale)
                p.add_(delta)
                applied.append(i)
                if i in keep:
                    kept[i] = delta
                del delta
        yield
    finally:
        end = generator.get_state()
        with torch.no_grad():
            for i in list(kept):
                params[i].sub_(kept.pop(i))
            for i in applied:
                if i in keep:
                    continue
                if i in states:
                    generator.set_state(states[i])
                params[i].sub_(gaussian_draw(params[i].shape, generator, params[i]).mul_(scales[i]))
        generator.set_state(end)
