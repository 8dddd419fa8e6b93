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

from ..perturb import filter_sq_sums_of, filter_view, is_filterwise
from ..sharding import local, sharded_like
from .base import BaseOptimizer, check_range
from .rwp import RWP, Entry


class AdaptiveNoise:
    """ARWP's noise shaping and statistics; mixed into RWP (ARWP) and MRWP (MARWP)."""

    state: Dict[Tensor, Dict[str, Any]]
    param_groups: List[Dict[str, Any]]

    @staticmethod
    def _check_adaptive(group: Dict[str, Any]) -> None:
        check_range("eta", group["eta"], 0.0, float("inf"), high_open=True)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)

    def _noise_scales(self, entries: List[Entry]) -> List[Tensor]:
        """``σ · s(W) / sqrt(1 + η · F)``, with ``F`` laid out over each filter."""
        scales = super()._noise_scales(entries)  # type: ignore[misc]
        tracked = [i for i, (_, p) in enumerate(entries) if "F" in self.state[p]]  # F = 0 (no shrink) until then
        if not tracked:
            return scales
        shrink = torch._foreach_mul([local(self.state[entries[i][1]]["F"]) for i in tracked],
                                    [entries[i][0]["eta"] for i in tracked])
        torch._foreach_add_(shrink, 1.0)
        torch._foreach_rsqrt_(shrink)
        factors = []
        for i, factor in zip(tracked, shrink):
            p = entries[i][1]
            factor = factor.to(scales[i].dtype)
            factors.append(filter_view(factor, p) if is_filterwise(p) else factor)
        # Out of place: a 1-D tensor's scale is one number, its shrink one per element.
        for i, scale in zip(tracked, torch._foreach_mul([scales[i] for i in tracked], factors)):
            scales[i] = scale
        return scales

    def _perturbed_stats(self) -> List[Tuple[Tensor, Tensor, float]]:
        """Per-filter sums of the squared perturbed gradient now in ``.grad``, with each group's β."""
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        sums = filter_sq_sums_of([p.grad for _, p in entries])
        return [(p, s, group["beta"]) for (group, p), s in zip(entries, sums)]

    def _observe(self, pending: List[Tuple[Tensor, Tensor, float]], inv_scale_sq: float) -> None:
        """``F ← β · F + Σ g²`` (``F = 0`` before the first update, so the first sets ``F = Σ g²``)."""
        if inv_scale_sq != 1.0:
            torch._foreach_mul_([sums for _, sums, _ in pending], inv_scale_sq)
        tracked = [(local(self.state[p]["F"]), sums, beta) for p, sums, beta in pending if "F" in self.state[p]]
        for p, sums, _ in pending:
            if "F" not in self.state[p]:
                self.state[p]["F"] = sharded_like(sums, p)  # a sharded parameter's F is sharded like it
        if tracked:
            Fs = [F for F, _, _ in tracked]
            torch._foreach_mul_(Fs, [beta for _, _, beta in tracked])
            torch._foreach_add_(Fs, [sums for _, sums, _ in tracked])


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
