"""Filter-wise numbers of weight tensors: the scale ``s(W)`` every method perturbs by, and ARWP's
per-filter statistic, computed for all tensors of a model at once.

Notation (docs/algorithms.md, "Filter-wise scale"): a trainable tensor ``W``; its filter-wise scale ``s(W)`` is

* ``s_i = ||W_i||_2`` for slice ``i`` along dim 0 when ``W.ndim >= 2`` (one output filter or neuron),
* ``s = ||W||_2`` for the whole tensor when ``W.ndim <= 1`` (biases, normalisation affines),

floored at ``1e-16`` so that an all-zero tensor is perturbed by (the floor times) zero, never NaN.
A complex tensor's numbers are real, from its elements' moduli, in the real dtype of its parts
(docs/algorithms.md, "Complex parameters and sparse gradients").

An optimizer step needs such numbers for every tensor of a model. Computed tensor by tensor, each
costs a handful of tiny ops, and on a model of many small tensors those ops, not the arithmetic,
are the cost of a step. ``FilterSlots`` lays the numbers of all tensors out in one flat buffer (per
device and dtype), so that everything done to them (floors, products with hyperparameters, ARWP's
shrink and moving average) is one op on the buffer whatever the number of tensors.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sharding import is_sharded, local, shard_group, sum_over_shards

SCALE_FLOOR = 1e-16
# Devices where the norms of 1-D tensors are taken one call per tensor rather than by one foreach
# call: on the CPU a foreach op is a loop over the tensors anyway (see ``FilterSlots.norms``).
PER_TENSOR_NORM_DEVICES = {"cpu"}


def is_filterwise(w: Tensor) -> bool:
    """Whether ``w`` is scaled per slice along dim 0 (``ndim >= 2``) or as one tensor."""
    return w.ndim >= 2


def filter_view(v: Tensor, w: Tensor) -> Tensor:
    """Reshape a per-filter vector ``v`` (length ``w.shape[0]``) to broadcast over ``w``'s slices."""
    return v.view(-1, *([1] * (w.ndim - 1)))


def _filter_dims(w: Tensor) -> Tuple[int, ...]:
    return tuple(range(1, w.ndim))


def tensor_key(params: Sequence[Tensor]) -> Tuple:
    """What a layout built for ``params`` depends on: which tensors, their shapes, dtypes and devices."""
    return tuple((id(p), p.shape, p.dtype, p.device) for p in params)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ARWP's statistics of a ``dtype`` tensor are kept in: at least float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _Bucket:
    """The tensors of one device and dtype, and where their slots lie in the bucket's buffers.

    The filter-wise tensors' slots come first (their norms are written straight into them), then
    those of the tensors with ``ndim <= 1`` (one norm each, spread over its slots when there are several).
    """

    def __init__(self, indices: List[int], values: List[Tensor], params: List[Tensor], per_element: bool) -> None:
        self.filterwise = [i for i in indices if is_filterwise(values[i])]
        self.whole = [i for i in indices if not is_filterwise(values[i])]
        self.dtype, self.device = values[indices[0]].dtype, values[indices[0]].device
        # A complex tensor's norms and sums are real: its buffers take the dtype of its parts.
        self.complex = self.dtype.is_complex
        if self.complex:
            self.dtype = self.dtype.to_real()
        # A complex tensor's norm is written into a real number by the per-tensor call on any device.
        self.per_tensor_norms = self.device.type in PER_TENSOR_NORM_DEVICES or self.complex
        counts = {i: values[i].shape[0] for i in self.filterwise}
        counts.update({i: values[i].numel() if per_element else 1 for i in self.whole})
        self.ranges: Dict[int, Tuple[int, int]] = {}
        start = 0
        for i in self.filterwise + self.whole:
            self.ranges[i] = (start, start + counts[i])
            start += counts[i]
        self.size = start
        self.head = sum(counts[i] for i in self.filterwise)  # where the ndim <= 1 tensors' slots begin
        self.dims = [_filter_dims(values[i]) for i in self.filterwise]
        self.scalars = {k for k, i in enumerate(self.whole) if values[i].ndim == 0}  # cat needs them 1-D
        # Per element, the one norm of a 1-D tensor covers all its slots: which norm each slot takes
        # (int32: half the memory of the default index, and index_select takes it as it is).
        self.owner: Optional[Tensor] = None
        if per_element and any(counts[i] != 1 for i in self.whole):
            self.owner = torch.repeat_interleave(torch.arange(len(self.whole), dtype=torch.int32),
                                                 torch.tensor([counts[i] for i in self.whole])).to(self.device)
        self.split = [k for k, i in enumerate(self.whole) if shard_group(params[i]) is not None]


class FilterSlots:
    """One number per filter of every tensor of ``params``, held in one flat buffer per device and dtype.

    Tensor ``W`` owns a run of consecutive *slots*: one per filter (``W.shape[0]``; of this process's
    rows when ``W`` is sharded) when ``ndim >= 2``; when ``ndim <= 1`` one slot, its single scale,
    or with ``per_element`` one slot per element (ARWP's statistic is per element there). A
    ``SlotBuffer`` holds the flat buffers and each tensor's run viewed to broadcast against it.
    """

    def __init__(self, params: Sequence[Tensor], per_element: bool = False) -> None:
        self.key = tensor_key(params)
        self.per_element = per_element
        self.params = list(params)
        self.sharded = any(is_sharded(p) for p in params)
        values = [local(p) for p in params]
        by_kind: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, v in enumerate(values):
            by_kind.setdefault((v.device, v.dtype), []).append(i)
        self.buckets = [_Bucket(indices, values, self.params, per_element) for indices in by_kind.values()]
        self.shapes = [self._slot_shape(v) for v in values]
        self._per_slot: Dict[str, Tuple[Tuple[float, ...], List[Tensor]]] = {}  # name -> (values, factors)

    def _slot_shape(self, v: Tensor) -> Tuple[int, ...]:
        if is_filterwise(v):
            return (v.shape[0],) + (1,) * (v.ndim - 1)
        return tuple(v.shape) if self.per_element else ()

    def buffer(self, stats: bool = False, zero: bool = False) -> "SlotBuffer":
        """New buffers for these slots, in each bucket's dtype (``stats``: its ``stats_dtype``),
        uninitialised or (``zero``) zero."""
        make = torch.zeros if zero else torch.empty
        return SlotBuffer(self, [make(bucket.size, dtype=stats_dtype(bucket.dtype) if stats else bucket.dtype,
                                      device=bucket.device) for bucket in self.buckets])

    def _local(self, tensors: Sequence[Tensor], indices: List[int]) -> List[Tensor]:
        return [local(tensors[i]) for i in indices] if self.sharded else [tensors[i] for i in indices]

    def norms(self, out: "SlotBuffer") -> "SlotBuffer":
        """``out ← s(W)`` for every tensor: filter norms of ``ndim >= 2`` tensors, one norm of each
        other tensor (of its whole, over every process that shares its rows), floored at ``1e-16``."""
        for bucket, flat, runs, tail, scratch, singles in zip(self.buckets, out.flats, out.runs, out.tails,
                                                              out.scratch, out.singles):
            for v, dims, run in zip(self._local(self.params, bucket.filterwise), bucket.dims, runs):
                torch.linalg.vector_norm(v, dim=dims, out=run)
            if bucket.whole:
                whole = self._local(self.params, bucket.whole)
                if bucket.per_tensor_norms:
                    # A foreach op is a loop over the tensors on the CPU: one reduction per tensor,
                    # written straight into its number, saves gathering the results afterwards.
                    for v, single in zip(whole, singles):
                        torch.linalg.vector_norm(v, out=single)
                else:
                    torch.stack(torch._foreach_norm(whole), out=scratch)
                if bucket.split:
                    squares = [singles[k] for k in bucket.split]
                    torch._foreach_mul_(squares, squares)
                    sum_over_shards(squares, [self.params[bucket.whole[k]] for k in bucket.split])
                    torch._foreach_sqrt_(squares)
                if bucket.owner is not None:
                    torch.index_select(scratch, 0, bucket.owner, out=tail)
            flat.clamp_min_(SCALE_FLOOR)
        return out

    def sq_sums(self, out: "SlotBuffer", grads: Sequence[Tensor]) -> "SlotBuffer":
        """``out ← Σ_{j in filter i} g_j²`` per filter of ``ndim >= 2`` tensors and ``g²`` per element
        of the others (``per_element`` slots), for ``grads`` laid out as ``params``; in ``out``'s dtype."""
        if not self.per_element:
            raise ValueError("sq_sums needs slots made with per_element=True: one per element of 1-D tensors")
        for bucket, flat, runs, tail in zip(self.buckets, out.flats, out.runs, out.tails):
            # The dtype vector_norm computes in: a complex one for complex gradients (|g|² is real).
            dtype = flat.dtype if not bucket.complex else flat.dtype.to_complex()
            filterwise = self._local(grads, bucket.filterwise)
            try:
                for g, dims, run in zip(filterwise, bucket.dims, runs):
                    # vector_norm reduces without materialising g², keeping the transient memory at zero.
                    torch.linalg.vector_norm(g, dim=dims, dtype=dtype, out=run)
            except NotImplementedError:  # a sparse gradient (nn.Embedding(sparse=True)): no such kernel
                for g, run in zip(filterwise, runs):
                    _filter_norms_into(g, run)
            if bucket.whole:
                whole = self._local(grads, bucket.whole)
                if bucket.complex:
                    for g, i in zip(whole, bucket.whole):
                        torch.abs(g.to_dense() if g.is_sparse else g, out=out.views[i])
                else:
                    for k in bucket.scalars:
                        whole[k] = whole[k].reshape(1)
                    try:
                        torch.cat(whole, out=tail)
                    except (NotImplementedError, RuntimeError):  # a sparse gradient among them
                        torch.cat([g.to_dense() for g in whole], out=tail)
            flat.mul_(flat)
        return out

    def per_slot(self, name: str, values: Sequence[float]) -> List[Tensor]:
        """Hyperparameter ``name``, given per tensor, as one tensor per bucket to multiply its buffer
        by: 0-d when every tensor has the same value (the usual case, refilled when it changes),
        else each tensor's value in its slots (remembered for the same values). A tensor, not a
        Python number: an op then takes it as it is, without wrapping a number at every call."""
        key = tuple(values)
        uniform = not key or key.count(key[0]) == len(key)
        value = key[0] if key else 1.0
        held = self._per_slot.get(name)
        if held is not None and held[0] == (key[:1] if uniform else key):
            return held[1]
        if uniform:
            if held is not None and held[1][0].dim() == 0:
                for t in held[1]:
                    t.fill_(value)
                factors = held[1]
            else:
                factors = [torch.tensor(value, dtype=stats_dtype(bucket.dtype), device=bucket.device)
                           for bucket in self.buckets]
        else:
            factors = []
            for bucket in self.buckets:
                flat = torch.empty(bucket.size, dtype=stats_dtype(bucket.dtype), device=bucket.device)
                for i, (start, stop) in bucket.ranges.items():
                    flat[start:stop] = values[i]
                factors.append(flat)
        self._per_slot[name] = ((key[:1] if uniform else key), factors)
        return factors


def _filter_norms_into(g: Tensor, run: Tensor) -> None:
    """``run ← ||g_i||`` per slice ``i`` along dim 0, for ``g`` dense or sparse. A sparse gradient's
    rows are summed from its coalesced values (duplicate entries added first, as the gradient adds
    them); the rows it does not hold are 0."""
    if not g.is_sparse:
        torch.linalg.vector_norm(g, dim=_filter_dims(g), dtype=run.dtype.to_complex() if g.is_complex() else run.dtype,
                                 out=run)
        return
    g = g.coalesce()
    values = g.values().abs() if g.is_complex() else g.values()
    squares = values.to(run.dtype).square().reshape(values.shape[0], -1).sum(1)
    run.zero_().index_add_(0, g.indices()[0], squares).sqrt_()


class SlotBuffer:
    """Flat buffers laid out by a ``FilterSlots`` (one per bucket) and each tensor's view of its slots."""

    def __init__(self, slots: FilterSlots, flats: List[Tensor]) -> None:
        self.slots = slots
        self.flats = flats
        # Per bucket: the slots of each filter-wise tensor, and those of all the others.
        self.runs = [[flat[bucket.ranges[i][0]:bucket.ranges[i][1]] for i in bucket.filterwise]
                     for bucket, flat in zip(slots.buckets, flats)]
        self.tails = [flat[bucket.head:] for bucket, flat in zip(slots.buckets, flats)]
        # Per bucket: one number per tensor with ndim <= 1 (its norm), each viewed 0-d; the tail itself
        # unless a tensor has one slot per element, which the numbers are then spread over.
        self.scratch = [tail if bucket.owner is None else torch.empty(len(bucket.whole), dtype=tail.dtype,
                                                                       device=tail.device)
                        for bucket, tail in zip(slots.buckets, self.tails)]
        self.singles = [[scratch[k] for k in range(len(bucket.whole))]
                        for bucket, scratch in zip(slots.buckets, self.scratch)]
        views: List[Optional[Tensor]] = [None] * len(slots.params)
        for bucket, flat in zip(slots.buckets, flats):
            for i, (start, stop) in bucket.ranges.items():
                views[i] = flat[start:stop].view(slots.shapes[i])
        self.views: List[Tensor] = views  # type: ignore[assignment]

    def mul_(self, factors: List[Tensor]) -> "SlotBuffer":
        """Multiply each bucket's buffer in place by its factor (``FilterSlots.per_slot``)."""
        for flat, factor in zip(self.flats, factors):
            flat.mul_(factor)
        return self


def filter_scales(params: Sequence[Tensor]) -> List[Tensor]:
    """``s(W)`` of every tensor, broadcastable against it: shape ``(out, 1, ..., 1)`` for ``ndim >= 2``,
    0-d otherwise (for a sharded tensor, of this process's rows)."""
    slots = FilterSlots(params)
    return slots.norms(slots.buffer()).views


def filter_norms(w: Tensor) -> Tensor:
    """``s(W)`` of one tensor (see ``filter_scales``)."""
    return filter_scales([w])[0]


def filter_sq_sums(g: Tensor) -> Tensor:
    """``Σ_{j in slice i} g_j²`` per filter (shape ``(out,)``) for ``ndim >= 2``; ``g²`` elementwise
    otherwise; in at least float32.

    This is the per-filter statistic ARWP keeps: ``F_i = Σ_j M_j`` is linear in ``M``, so an EMA of
    these sums equals the per-filter sum of the elementwise EMA ``M`` (one number per filter).
    """
    slots = FilterSlots([g], per_element=True)
    sums = slots.sq_sums(slots.buffer(stats=True), [g]).views[0]
    return sums.view(-1) if is_filterwise(g) else sums
