"""RWP: random weight perturbation, one gradient per update (Li et al., arXiv 2211.11489).

    ε = σ · s(W) ⊙ z,   z ~ N(0, I)        for every trainable tensor W (filter-wise s: docs/algorithms.md)
    g = ∇L(w + ε; B)                        one forward and backward at the perturbed weights
    w ← base_step(w, g)                     at the unperturbed w

``σ`` (``sigma``) is the relative noise radius. The noise is undone in place by redrawing it from
the optimizer's generator, so no copy of the weights and no buffer of noise is kept. Running
statistics are updated in the perturbed pass, the only one.
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..perturb import filter_norms, gaussian_shift
from .base import BaseOptimizer, Closure, WrappedOptimizer, check_range


class RWP(WrappedOptimizer):
    """Random weight perturbation around any base optimizer.

    Example::

        opt = flatmin.RWP(model.parameters(), torch.optim.SGD, sigma=0.01, lr=0.1, momentum=0.9)
        loss = opt.step(closure)   # closure: forward, loss.backward(), return loss

    ``step`` returns the loss at the perturbed weights (the only one computed).
    """

    def __init__(self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.01, **kwargs: Any) -> None:
        check_range("sigma", sigma, 0.0, float("inf"), high_open=True)
        defaults = {"sigma": sigma, **kwargs.pop("method_defaults", {})}
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_range("sigma", group["sigma"], 0.0, float("inf"), high_open=True)

    def _noise_scales(self, params: List[Tensor], group: Dict[str, Any]) -> List[Tensor]:
        """``σ · s(W)`` for each tensor of ``group``, broadcastable over it (ARWP shrinks it further)."""
        scales = [filter_norms(p.detach()) for p in params]
        torch._foreach_mul_(scales, group["sigma"])
        return scales

    def _noise_groups(self) -> List[Tuple[Dict[str, Any], List[Tensor]]]:
        """``(group, its trainable tensors)`` for every group with ``σ > 0``, in the order noise is drawn."""
        groups = [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]
        return [(group, params) for group, params in groups if group["sigma"] != 0 and params]

    def _perturbed(self, exact: Optional[bool] = None) -> ContextManager[None]:
        """A context in which the weights are ``w + ε`` (restored on exit, also on an exception;
        bit-exactly from a copy when ``exact``, which defaults to ``exact_restore``)."""
        params, scales = [], []
        for group, group_params in self._noise_groups():
            params += group_params
            scales += self._noise_scales(group_params, group)
        # Keeping the noise of tensors up to the size of the largest one costs no more memory than
        # the one transient redrawing needs anyway, and saves most of the second draw.
        keep = max((p.numel() * p.element_size() for p in params), default=0)
        exact = self.exact_restore if exact is None else exact
        return gaussian_shift(params, scales, self.generator, exact=exact, keep_bytes=keep)

    def _perturbed_stats(self) -> Optional[Any]:
        """Statistics of the perturbed gradient now in ``.grad`` that the state needs (ARWP)."""
        return None

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """One update: perturb, ``closure()`` at ``w + ε``, restore ``w``, base step with that gradient."""
        if closure is None:
            self._call(None)
        self.zero_grad(set_to_none=True)
        with self._perturbed():
            loss = self._call(closure)
        self._update(self._perturbed_stats())
        return loss
