"""RWP: random weight perturbation, one gradient per update (Li et al., arXiv 2211.11489).

    ε = σ · s(W) ⊙ z,   z ~ N(0, I)        for every trainable tensor W (filter-wise s: docs/algorithms.md)
    g = ∇L(w + ε; B)                        one forward and backward at the perturbed weights
    w ← base_step(w, g)                     at the unperturbed w

``σ`` (``sigma``) is the relative noise radius. The noise is undone in place: the noise of the
largest tensors (up to the size of the largest one) is kept for the undo and the rest is drawn
again from the optimizer's generator, so no copy of the weights is kept. Running statistics are
updated in the perturbed pass, the only one.

What a step computes per tensor (the scales ``σ · s(W)``, the draw's layout) is laid out once for
the tensors a step perturbs and reused while they stay the same, so that the ops of a step do not
grow with the number of tensors (``flatmin.filters.FilterSlots``, ``flatmin.perturb.NoiseLayout``).
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..filters import FilterSlots, SlotBuffer, tensor_key
from ..perturb import NoiseLayout, gaussian_shift, keep_budget
from .base import BaseOptimizer, Closure, WrappedOptimizer, check_range

Entry = Tuple[Dict[str, Any], Tensor]  # a tensor and its parameter group


class NoisePlan:
    """What every step over the same perturbed tensors reuses: how their noise is drawn, where their
    scales lie, and the buffer the scales are computed in."""

    def __init__(self, params: List[Tensor], per_element: bool, hold_noise: bool) -> None:
        self.layout = NoiseLayout(params, keep_budget(params), hold=hold_noise)
        self.slots = FilterSlots(params, per_element)
        self.key = self.slots.key
        self.scales = self.slots.buffer()


class RWP(WrappedOptimizer):
    """Random weight perturbation around any base optimizer (docs/algorithms.md, "RWP").

    One gradient per update; for every trainable tensor ``W``, with ``s(W)`` its filter-wise norms:

        ε = σ · s(W) ⊙ z,    z ~ N(0, I)
        g = ∇L(w + ε; B)
        w ← base_step(w, g)

    The forward and backward pass run at the perturbed weights ``w + ε``; the base step is taken at
    the unperturbed ``w``.

    ```python
    opt = flatmin.RWP(model.parameters(), torch.optim.SGD, sigma=0.01,
                      lr=0.1, momentum=0.9)
    loss = opt.step(closure)  # closure: forward, loss.backward(), return loss
    ```

    ``step`` returns the loss at the perturbed weights (the only one computed).

    Args:
        params: the tensors to train, or parameter groups (dicts with ``"params"`` and per-group
            values, e.g. ``{"params": ..., "sigma": 0.0}`` for a group left unperturbed).
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``,
            ``torch.optim.AdamW``, ...); it shares this optimizer's ``param_groups``.
        sigma: the relative noise radius ``σ >= 0``; a group with ``sigma=0`` is not perturbed.
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

    method = "rwp"

    # Slots per element of 1-D tensors: ARWP's shrink is per element there.
    _per_element_scales = False
    # Keep a small model's noise buffer between steps (the mixed methods do not: it would be held
    # beside the perturbed gradient during the clean pass, their peak).
    _hold_noise = True

    def __init__(self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.01, **kwargs: Any) -> None:
        check_range("sigma", sigma, 0.0, float("inf"), high_open=True)
        defaults = {"sigma": sigma, **kwargs.pop("method_defaults", {})}
        self._plan: Optional[NoisePlan] = None
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_range("sigma", group["sigma"], 0.0, float("inf"), high_open=True)

    def _noise_entries(self) -> List[Entry]:
        """``(group, tensor)`` for every trainable tensor of a group with ``σ > 0``, in drawing order."""
        return [(group, p) for group in self.param_groups if group["sigma"] != 0
                for p in group["params"] if p.requires_grad]

    def _noise_plan(self, params: List[Tensor]) -> NoisePlan:
        """The plan for ``params``, remembered while they stay the same tensors."""
        if self._plan is None or self._plan.key != tensor_key(params):
            self._plan = NoisePlan(params, self._per_element_scales, self._hold_noise)
        return self._plan

    def _noise_layout(self, params: List[Tensor]) -> NoiseLayout:
        """How the noise of ``params`` is drawn."""
        return self._noise_plan(params).layout

    def _noise_scales(self, entries: List[Entry], plan: NoisePlan) -> SlotBuffer:
        """``σ · s(W)`` for each tensor, in ``plan.scales`` (ARWP shrinks it further)."""
        scales = plan.slots.norms(plan.scales)  # step runs under no_grad: no graph, no detach
        return scales.mul_(plan.slots.per_slot("sigma", [group["sigma"] for group, _ in entries]))

    def _perturbed(self, exact: Optional[bool] = None) -> ContextManager[None]:
        """A context in which the weights are ``w + ε`` (restored on exit, also on an exception;
        bit-exactly from a copy when ``exact``, which defaults to ``exact_restore``)."""
        entries = self._noise_entries()
        params = [p for _, p in entries]
        plan = self._noise_plan(params)
        scales = self._noise_scales(entries, plan)
        exact = self.exact_restore if exact is None else exact
        return gaussian_shift(params, scales.views, self.generator, plan.layout, exact=exact)

    def _perturbed_stats(self) -> Optional[Any]:
        """Statistics of the perturbed gradient now in ``.grad`` that the state needs (ARWP)."""
        return None

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """One update: perturb, ``closure()`` at ``w + ε``, restore ``w``, base step with that gradient.

        Args:
            closure: runs the forward and backward pass and returns the loss; it may zero the
                gradients itself.

        Returns:
            What ``closure`` returned: the loss at the perturbed weights ``w + ε``.

        Raises:
            ValueError: no closure was given.
            RuntimeError: ``.grad`` held a gradient computed outside ``step`` (a backward before
                it), which the update would throw away.

        An exception raised inside a closure propagates after the weights are put back to ``w``.
        An update whose gradient holds an inf or NaN is skipped with a ``RuntimeWarning``
        (``skipped_steps`` counts them).
        """
        if closure is None:
            self._call(None)
        self._clear_grads()
        with self._perturbed():
            loss = self._call(closure)
        self._update(self._perturbed_stats())
        return loss
