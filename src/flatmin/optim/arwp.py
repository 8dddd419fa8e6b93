"""ARWP: adaptive random weight perturbation (Li et al., TMLR 2024), one gradient per update.

As RWP, but the noise is shrunk where the loss has been steep:

    ε = σ · s(W) ⊙ z / sqrt(1 + η · F)
    M ← β · M + g²                 (g: the gradient the update used, taken at w + ε)
    F_i = Σ_{j in filter i} M_j    for W.ndim >= 2;   F_j = M_j elementwise otherwise

``η`` (``eta``) sets how strongly past gradients shrink the noise, ``β`` (``beta``) is the EMA
factor. ``F`` is linear in ``M``, so it is kept directly as an EMA of the per-filter sums of g²:
one number per filter (per element of 1-D tensors) in ``state[p]["F"]``. Before the first
gradient ``F = 0`` and the step is plain RWP; the first update sets ``F`` to the first sums.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..filters import FilterSlots, SlotBuffer, filter_sq_sums, is_filterwise, tensor_key
from ..sharding import local, sharded_like
from .base import BaseOptimizer, check_range
from .rwp import RWP, Entry, NoisePlan

Pending = Union["Statistics", List[Tuple[Tensor, Tensor, float]]]


class Statistics:
    """ARWP's ``F`` for every trainable tensor in one slot buffer (``flatmin.filters.FilterSlots``, one
    slot per filter and per element of 1-D tensors); each tensor's ``state[p]["F"]`` is a view of it,
    shaped ``(out,)`` or like the tensor. A slot whose tensor has had no update yet holds 0, which
    is what ``F`` is before the first update: the shrink is 1 there, and the first update sets it."""

    def __init__(self, slots: FilterSlots) -> None:
        self.slots = slots
        params = slots.params
        self.F = self.slots.buffer(stats=True, zero=True)
        # One step's Σ g², from the perturbed pass to the update: in the noise scales' buffer when it
        # has the same slots (the scales are done with once the weights are restored), else here.
        self.sums: Optional[SlotBuffer] = None
        self._own_sums: Optional[SlotBuffer] = None
        self.ones = [torch.ones((), dtype=F.dtype, device=F.device) for F in self.F.flats]
        self.index = {p: i for i, p in enumerate(params)}
        self.state_views = [v.view(-1) if is_filterwise(local(p)) else v for p, v in zip(params, self.F.views)]
        self.in_state: List[Optional[Tensor]] = [None] * len(params)  # what state[p]["F"] holds, once set
        self.betas: List[float] = []  # each tensor's β when ``sums`` was taken

    def sums_buffer(self, plan: Optional[NoisePlan]) -> SlotBuffer:
        """Where this step's sums go: ``plan.scales`` when it has these slots, else a buffer of its own."""
        if (plan is not None and plan.key == self.slots.key
                and all(a.dtype == b.dtype for a, b in zip(plan.scales.flats, self.F.flats))):
            return plan.scales
        if self._own_sums is None:
            self._own_sums = self.slots.buffer(stats=True)
        return self._own_sums

    def put_in_state(self, state: Dict[Tensor, Dict[str, Any]], indices: Sequence[int]) -> None:
        """``state[p]["F"]`` ← the view of ``p``'s slots (a DTensor like ``p`` if ``p`` is sharded)."""
        for i in indices:
            if self.in_state[i] is None:
                p = self.slots.params[i]
                self.in_state[i] = state[p]["F"] = sharded_like(self.state_views[i], p)


class AdaptiveNoise:
    """ARWP's noise shaping and statistics; mixed into RWP (ARWP) and MRWP (MARWP)."""

    state: Dict[Tensor, Dict[str, Any]]
    param_groups: List[Dict[str, Any]]
    _per_element_scales = True  # the shrink is per element of 1-D tensors: so are the scales
    _stats: Optional[Statistics] = None

    @staticmethod
    def _check_adaptive(group: Dict[str, Any]) -> None:
        check_range("eta", group["eta"], 0.0, float("inf"), high_open=True)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)

    def _state_F(self, p: Tensor) -> Optional[Tensor]:
        """``state[p]["F"]``, or ``None`` (without adding ``p`` to the state)."""
        state = self.state.get(p)
        return None if state is None else state.get("F")

    def _statistics(self, params: Optional[List[Tensor]] = None, key: Optional[tuple] = None) -> Statistics:
        """The ``Statistics`` of the trainable tensors (``params``, whose ``tensor_key`` is ``key``
        when the caller has it), agreeing with ``state``: rebuilt when the tensors change, refilled
        from ``state`` when it no longer holds the views (``load_state_dict``)."""
        params = self.trainable() if params is None else params  # type: ignore[attr-defined]
        stats = self._stats
        key = tensor_key(params) if key is None else key
        if stats is None or stats.slots.key != key:
            plan = self._plan  # type: ignore[attr-defined]
            # The noise's slots when they are these (the same tensors, one slot per element of 1-D ones).
            slots = plan.slots if plan is not None and plan.key == key else FilterSlots(params, per_element=True)
            stats = self._stats = Statistics(slots)
        elif all(self._state_F(p) is held for p, held in zip(params, stats.in_state)):
            return stats
        for i, p in enumerate(params):
            stats.in_state[i] = None
            F = self._state_F(p)
            view = stats.state_views[i]
            if F is None:
                view.zero_()
                continue
            F = local(F)
            if F.shape != view.shape:
                raise ValueError(
                    f"{type(self).__name__}: state F of a parameter of shape {tuple(p.shape)} has shape "
                    f"{tuple(F.shape)}; it must be {tuple(view.shape)} (one number per filter, per element of 1-D)"
                )
            view.copy_(F)
            stats.put_in_state(self.state, [i])
        return stats

    def _noise_scales(self, entries: List[Entry], plan: NoisePlan) -> SlotBuffer:
        """``σ · s(W) / sqrt(1 + η · F)``, with ``F`` laid out over each filter."""
        scales = super()._noise_scales(entries, plan)  # type: ignore[misc]
        params = self.trainable()  # type: ignore[attr-defined]
        same = len(params) == len(plan.slots.params) and all(map(operator.is_, params, plan.slots.params))
        stats = self._statistics(params, plan.key if same else None)
        if not entries or all(held is None for held in stats.in_state):
            return scales  # F = 0 everywhere (no update yet): no shrink
        etas = [group["eta"] for group, _ in entries]
        if same:  # the same slots: one op per buffer
            for F, eta, one, scale in zip(stats.F.flats, stats.slots.per_slot("eta", etas), stats.ones, scales.flats):
                scale.mul_(torch.mul(F, eta).add_(one).rsqrt_())
            return scales
        # Some tensors are not perturbed (σ = 0 in their group): shrink the others tensor by tensor.
        views = [stats.F.views[stats.index[p]] for _, p in entries]
        shrink = torch._foreach_mul(views, etas)
        torch._foreach_add_(shrink, 1.0)
        torch._foreach_rsqrt_(shrink)
        torch._foreach_mul_(scales.views, shrink)
        return scales

    def _perturbed_stats(self) -> Optional[Pending]:
        """Per-filter sums of the squared perturbed gradient now in ``.grad``, with each group's β:
        in the ``Statistics``' ``sums`` when every tensor has a gradient, else as a list."""
        # The perturbed pass's _noise_scales brought the statistics up to date in this very step.
        stats = self._stats if self._stats is not None else self._statistics()
        grads = [p.grad for p in stats.slots.params]
        if all(g is not None for g in grads):
            stats.sums = stats.slots.sq_sums(stats.sums_buffer(self._plan), grads)  # type: ignore[attr-defined]
            stats.betas = [group["beta"] for group in self.param_groups for p in group["params"] if p.requires_grad]
            return stats
        return [(p, filter_sq_sums(p.grad), group["beta"])
                for group in self.param_groups for p in group["params"] if p.requires_grad and p.grad is not None]

    def _observe(self, pending: Pending, inv_scale_sq: float) -> None:
        """``F ← β · F + Σ g²`` (``F = 0`` before the first update, so the first sets ``F = Σ g²``)."""
        if isinstance(pending, Statistics):  # from _perturbed_stats, earlier in this step
            stats = pending
            if inv_scale_sq != 1.0:
                torch._foreach_mul_(stats.sums.flats, inv_scale_sq)
            for F, beta, sums in zip(stats.F.flats, stats.slots.per_slot("beta", stats.betas), stats.sums.flats):
                F.mul_(beta).add_(sums)
            if any(held is None for held in stats.in_state):
                stats.put_in_state(self.state, range(len(stats.in_state)))
            return
        if not pending:
            return
        stats = self._statistics()
        sums = [s for _, s, _ in pending]
        if inv_scale_sq != 1.0:
            torch._foreach_mul_(sums, inv_scale_sq)
        indices = [stats.index[p] for p, _, _ in pending]
        Fs = [stats.state_views[i] for i in indices]
        torch._foreach_mul_(Fs, [beta for _, _, beta in pending])
        torch._foreach_add_(Fs, [local(s) for s in sums])
        stats.put_in_state(self.state, indices)


class ARWP(AdaptiveNoise, RWP):
    """Adaptive random weight perturbation around any base optimizer (docs/algorithms.md, "ARWP").

    One gradient per update; as RWP, but the noise shrinks in the filters where the loss has
    recently been steep:

        ε = σ · s(W) ⊙ z / sqrt(1 + η · F)
        g = ∇L(w + ε; B)
        M ← β · M + g²
        F_i = Σ_{j in filter i} M_j      (W.ndim >= 2)
        F_j = M_j                        (W.ndim <= 1)
        w ← base_step(w, g)

    ``F`` is kept per filter (per element of 1-D tensors) in ``state[p]["F"]``; before the first
    gradient ``F = 0`` and the update is RWP's.

    ```python
    opt = flatmin.ARWP(model.parameters(), torch.optim.SGD,
                       sigma=0.01, eta=0.1, beta=0.99, lr=0.1, momentum=0.9)
    loss = opt.step(closure)  # the loss at the perturbed weights
    ```

    Args:
        params: the tensors to train, or parameter groups (dicts with ``"params"`` and per-group
            values, e.g. ``{"params": ..., "sigma": 0.0}`` for a group left unperturbed).
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``,
            ``torch.optim.AdamW``, ...); it shares this optimizer's ``param_groups``.
        sigma: the relative noise radius ``σ >= 0``.
        eta: ``η >= 0``, how strongly past squared gradients shrink the noise (``0`` is RWP).
        beta: ``β`` in ``[0, 1)``, the decay of the running sum ``M`` (no ``1 − β`` factor).
        **kwargs: keyword options every flatmin optimizer takes: ``model`` (the model being
            trained, so that normalisation running statistics follow the method's rules; see
            `frozen_norm_stats`), ``seed`` or ``generator`` (where the noise comes from; at most
            one, without either a seed is drawn from torch's global generator), ``exact_restore``
            (put the weights back bit-exactly from a copy instead of undoing the shift in place),
            ``grad_scaler`` (a ``torch.amp.GradScaler`` the closures scale their loss with; the
            optimizer unscales and steps through it) and ``max_grad_norm`` (clip the update's
            gradient to this global 2-norm). Everything else (``lr``, ``momentum``,
            ``weight_decay``, ...) goes to ``base_optimizer``.

    Raises:
        ValueError: a hyperparameter outside its range (the message names the value and the allowed
            interval), or both ``seed`` and ``generator``.
        TypeError: ``base_optimizer`` is not an optimizer class (an instance, for example).
    """

    method = "arwp"

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.01, eta: float = 0.1,
        beta: float = 0.99, **kwargs: Any,
    ) -> None:
        self._check_adaptive({"eta": eta, "beta": beta})
        super().__init__(params, base_optimizer, sigma=sigma, method_defaults={"eta": eta, "beta": beta}, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        self._check_adaptive(group)
