"""RWP: random weight perturbation, one gradient per update (Li et al., arXiv 2211.11489).

    ε = σ · s(W) ⊙ z,   z ~ N(0, I)        for every trainable tensor W (filter-wise s: docs/algorithms.md)
    g = ∇L(w + ε; B)                        one forward and backward at the perturbed weights
    w ← base_step(w, g)                     at the unperturbed w

``σ`` (``sigma``) is the relative noise radius. The noise is undone in place: the noise of the
largest tensors (up to the size of the largest one) is kept for the undo and the rest is drawn
again from the optimizer's generator, so no copy of the weights is kept. Running statistics are
updated in the perturbed pass, the only one.
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..perturb import NoiseLayout, filter_scales, gaussian_shift, noise_layout
from .base import BaseOptimizer, Closure, WrappedOptimizer, check_range

Entry = Tuple[Dict[str, Any], Tensor]  # a tensor and its parameter group


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
        self._layout: Optional[NoiseLayout] = None
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_range("sigma", group["sigma"], 0.0, float("inf"), high_open=True)

    def _noise_entries(self) -> List[Entry]:
        """``(group, tensor)`` for every trainable tensor of a group with ``σ > 0``, in drawing order."""
        return [(group, p) for group in self.param_groups if group["sigma"] != 0
                for p in group["params"] if p.requires_grad]

    def _noise_scales(self, entries: List[Entry]) -> List[Tensor]:
        """``σ · s(W)`` for each tensor, broadcastable over it (ARWP shrinks it further)."""
        scales = filter_scales([p for _, p in entries])  # step runs under no_grad: no graph, no detach
        sigmas = [group["sigma"] for group, _ in entries]
        if scales and sigmas.count(sigmas[0]) == len(sigmas):
            torch._foreach_mul_(scales, sigmas[0])
        elif scales:
            torch._foreach_mul_(scales, sigmas)
        return scales

    def _noise_layout(self, params: List[Tensor]) -> NoiseLayout:
        """The layout of the draws for ``params``, remembered while they stay the same tensors."""
        self._layout = noise_layout(params, cached=self._layout)
        return self._layout

    def _perturbed(self, exact: Optional[bool] = None) -> ContextManager[None]:
        """A context in which the weights are ``w + ε`` (restored on exit, also on an exception;
        bit-exactly from a copy when ``exact``, which defaults to ``exact_restore``)."""
        entries = self._noise_entries()
        params = [p for _, p in entries]
        scales = self._noise_scales(entries)
        exact = self.exact_restore if exact is None else exact
        return gaussian_shift(params, scales, self.generator, self._noise_layout(params), exact=exact)

    def _perturbed_stats(self) -> Optional[Any]:
        """Statistics of the perturbed gradient now in ``.grad`` that the state needs (ARWP)."""
        return None

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """One update: perturb, ``closure()`` at ``w + ε``, restore ``w``, base step with that gradient."""
        if closure is None:
            self._call(None)
        self._clear_grads()
        with self._perturbed():
            loss = self._call(closure)
        self._update(self._perturbed_stats())
        return loss
