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

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ..perturb import filter_sq_sums, filter_view, is_filterwise
from .base import BaseOptimizer, check_range
from .rwp import RWP


class AdaptiveNoise:
    """ARWP's noise shaping and statistics; mixed into RWP (ARWP) and MRWP (MARWP)."""

    state: Dict[Tensor, Dict[str, Any]]
    param_groups: List[Dict[str, Any]]

    @staticmethod
    def _check_adaptive(group: Dict[str, Any]) -> None:
        check_range("eta", group["eta"], 0.0, float("inf"), high_open=True)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)

    def _noise_scales(self, params: List[Tensor], group: Dict[str, Any]) -> List[Tensor]:
        scales = super()._noise_scales(params, group)  # type: ignore[misc]
        tracked = [i for i, p in enumerate(params) if "F" in self.state[p]]  # F = 0 (no shrink) until then
        if not tracked:
            return scales
        shrink = torch._foreach_mul([self.state[params[i]]["F"] for i in tracked], group["eta"])
        torch._foreach_add_(shrink, 1.0)
        torch._foreach_rsqrt_(shrink)
        for i, factor in zip(tracked, shrink):
            p = params[i]
            factor = factor.to(scales[i].dtype)
            scales[i] = scales[i] * (filter_view(factor, p) if is_filterwise(p) else factor)
        return scales

    def _perturbed_stats(self) -> List[Tuple[Tensor, Tensor, float]]:
        """Per-filter sums of the squared perturbed gradient now in ``.grad``, with each group's β."""
        return [
            (p, filter_sq_sums(p.grad), group["beta"])
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]

    def _observe(self, pending: List[Tuple[Tensor, Tensor, float]], inv_scale_sq: float) -> None:
        """``F ← β · F + Σ g²`` (``F = 0`` before the first update, so the first sets ``F = Σ g²``)."""
        for p, sums, beta in pending:
            if inv_scale_sq != 1.0:
                sums.mul_(inv_scale_sq)
            F = self.state[p].get("F")
            if F is None:
                self.state[p]["F"] = sums
            else:
                F.mul_(beta).add_(sums)


class ARWP(AdaptiveNoise, RWP):
    """Adaptive random weight perturbation around any base optimizer.

    Example::

        opt = flatmin.ARWP(model.parameters(), torch.optim.SGD, sigma=0.01, eta=0.1, beta=0.99,
                           lr=0.1, momentum=0.9)
    """

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.01, eta: float = 0.1,
        beta: float = 0.99, **kwargs: Any,
    ) -> None:
        self._check_adaptive({"eta": eta, "beta": beta})
        super().__init__(params, base_optimizer, sigma=sigma, method_defaults={"eta": eta, "beta": beta}, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        self._check_adaptive(group)
