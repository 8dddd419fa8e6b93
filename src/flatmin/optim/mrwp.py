"""m-RWP and m-ARWP: the mixed clean + perturbed objective (Li et al., TMLR 2024), two gradients
per update:

    (1 − λ) · L(w; B1) + λ · E_ε L(w + ε; B2)
    g = (1 − λ) · ∇L(w; B1) + λ · ∇L(w + ε; B2)      ε from RWP (m-RWP) or ARWP (m-ARWP)

``λ`` (``lam``) weighs the perturbed term. ``B1`` and ``B2`` are two batches (the papers' recipe:
two consecutive mini-batches per update) or the same batch twice.

No buffer holds either gradient. The perturbed pass runs first, into an empty ``.grad``, so
m-ARWP reads the perturbed gradient alone (gradient accumulation inside the closure included).
``.grad`` is then scaled by ``λ / (1 − λ)``, the clean pass accumulates on top in place, and the sum
is scaled by ``1 − λ``: ``(1 − λ) · (λ/(1 − λ) · g2 + g1) = λ · g2 + (1 − λ) · g1``. (For ``λ = 1`` the
clean gradient is set aside and dropped instead.) The two terms are independent, so the order does
not change ``g``. Running statistics are updated by the clean pass only; m-ARWP's ``F`` only from the
perturbed gradient.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from ..norm_stats import frozen_norm_stats
from .arwp import AdaptiveNoise
from .base import BaseOptimizer, Closure, check_range
from .rwp import RWP


class MRWP(RWP):
    """Mixed random weight perturbation around any base optimizer.

    Example::

        opt = flatmin.MRWP(model.parameters(), torch.optim.SGD, model=model, sigma=0.015, lam=0.5,
                           lr=0.1, momentum=0.9)
        loss = opt.step(closure_on(x1, y1), closure_on(x2, y2))   # clean batch, perturbed batch

    ``step`` returns the clean loss ``L(w; B1)``.
    """

    grads_per_step = 2
    batches_per_step = 2

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.015, lam: float = 0.5, **kwargs: Any
    ) -> None:
        check_range("lam", lam, 0.0, 1.0)
        method_defaults = {"lam": lam, **kwargs.pop("method_defaults", {})}
        super().__init__(params, base_optimizer, sigma=sigma, method_defaults=method_defaults, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("lam", group["lam"], 0.0, 1.0)

    def _scale_grads(self, factor: Callable[[float], float]) -> None:
        """Multiply ``.grad`` of every group with ``λ < 1`` by ``factor(λ)``."""
        for group in self.param_groups:
            if group["lam"] == 1 or factor(group["lam"]) == 1:
                continue
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor(group["lam"]))

    @contextmanager
    def _dropping_grads_where_lam_is_one(self) -> Iterator[None]:
        """Inside, groups with ``λ = 1`` collect their clean gradient in a fresh ``.grad`` that is dropped."""
        # Under DDP with gradient_as_bucket_view the clean gradient is written into the very bucket
        # that holds the kept one: keep a copy there.
        copy = getattr(self.model, "gradient_as_bucket_view", False)
        kept = {p: p.grad.clone() if copy and p.grad is not None else p.grad
                for g in self.param_groups if g["lam"] == 1 for p in g["params"]}
        for p in kept:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in kept.items():
                p.grad = grad

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Optional[Closure] = None, perturbed_closure: Optional[Closure] = None
    ) -> Any:
        """One update from a clean ``closure`` (batch B1) and a ``perturbed_closure`` (batch B2,
        defaults to ``closure``)."""
        if closure is None:
            self._call(None)
        perturbed_closure = closure if perturbed_closure is None else perturbed_closure
        self.zero_grad(set_to_none=True)
        pending = None
        if any(group["lam"] > 0 for group in self.param_groups):
            with frozen_norm_stats(self.model), self._perturbed():
                self._call(perturbed_closure, "perturbed_closure")
            pending = self._perturbed_stats()
            self._scale_grads(lambda lam: lam / (1.0 - lam))
        with self._dropping_grads_where_lam_is_one():
            loss = self._call(closure)
        self._scale_grads(lambda lam: 1.0 - lam)
        self._update(pending)
        return loss


class MARWP(AdaptiveNoise, MRWP):
    """Mixed adaptive random weight perturbation around any base optimizer.

    Example::

        opt = flatmin.MARWP(model.parameters(), torch.optim.SGD, model=model, sigma=0.015, lam=0.5,
                            eta=0.1, beta=0.99, seed=0, lr=0.1, momentum=0.9, weight_decay=1e-3)
    """

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.015, lam: float = 0.5,
        eta: float = 0.1, beta: float = 0.99, **kwargs: Any,
    ) -> None:
        self._check_adaptive({"eta": eta, "beta": beta})
        super().__init__(
            params, base_optimizer, sigma=sigma, lam=lam, method_defaults={"eta": eta, "beta": beta}, **kwargs
        )

    def _check_group(self, group: Dict[str, Any]) -> None:
        super()._check_group(group)
        self._check_adaptive(group)
