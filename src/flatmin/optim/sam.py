"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021): the adversarial baselines,
two gradients per update on the same batch.

    g0 = ∇L(w; B)
    ε  = ρ · g0 / ||g0||              SAM    (one norm over all tensors together)
    ε  = ρ · T² g0 / ||T g0||         ASAM   (T = |w| elementwise)
    g  = ∇L(w + ε; B);   w ← base_step(w, g) at the unperturbed w

``ρ`` (``rho``) is the radius of the ascent step. Under data parallelism (``model=`` a DDP module) the
first pass stays on each worker (``no_sync``) and only the second gradient is averaged. The only buffer is ``ε`` itself, built in place in
the memory of ``g0`` (which is no longer needed once ``ε`` exists). Running statistics are updated
in the first pass only.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import Tensor

from ..norm_stats import frozen_norm_stats
from ..perturb import shifted_by
from .base import BaseOptimizer, Closure, WrappedOptimizer, check_range, global_norm


class SAM(WrappedOptimizer):
    """Sharpness-aware minimisation around any base optimizer; ``adaptive=True`` is ASAM
    (docs/algorithms.md, "SAM and ASAM").

    Two gradients per update on the same batch:

        g0 = ∇L(w; B)
        ε  = ρ · g0 / ||g0||           (SAM)
        ε  = ρ · T² g0 / ||T g0||      (ASAM, T = |w| elementwise)
        g  = ∇L(w + ε; B)
        w  ← base_step(w, g)

    ``||·||`` is one norm over all tensors together; the base step is taken at the unperturbed ``w``.

    ```python
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, model=model, rho=0.05,
                      lr=0.1, momentum=0.9)
    loss = opt.step(closure)   # closure runs twice on the same batch
    ```

    ``step`` returns the loss at the unperturbed weights (the first pass).

    Args:
        params: the tensors to train, or parameter groups (dicts with ``"params"`` and per-group
            values, e.g. ``{"params": ..., "sigma": 0.0}`` for a group left unperturbed).
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``,
            ``torch.optim.AdamW``, ...); it shares this optimizer's ``param_groups``.
        rho: the radius ``ρ >= 0`` of the ascent step.
        adaptive: ASAM's scale-invariant ascent instead of SAM's.
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

    grads_per_step = 2
    _complex = False  # whether any parameter is complex: ASAM's T is then |w| taken explicitly

    @property  # type: ignore[override]
    def method(self) -> str:
        return "asam" if self.defaults["adaptive"] else "sam"

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, rho: float = 0.05, adaptive: bool = False, **kwargs: Any
    ) -> None:
        check_range("rho", rho, 0.0, float("inf"), high_open=True)
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": bool(adaptive)}, **kwargs)

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_range("rho", group["rho"], 0.0, float("inf"), high_open=True)
        if any(p.is_complex() for p in group["params"]):
            self._complex = True

    def _T(self, params: List[Tensor]) -> List[Tensor]:
        """What ASAM multiplies by for ``T = |w|``: ``w`` itself for real tensors (the sign drops out of
        the norm and the second product gives ``w² = |w|²``), the modulus ``|w|`` for complex ones."""
        if not self._complex:
            return params
        return [p.abs() if p.is_complex() else p for p in params]

    def _per_worker(self) -> ContextManager[None]:
        """The ascent step is each worker's own: under DDP the first backward must not all-reduce."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return nullcontext()

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """One update: ``closure()`` at ``w``, ascend to ``w + ε``, ``closure()`` there, restore, base step.

        Args:
            closure: forward and backward on the batch, returning the loss; it runs twice.

        Returns:
            What the first call of ``closure`` returned: the loss at the unperturbed weights.

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
        distributed = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        with self._per_worker():
            loss = self._call(closure)
        per_group = []
        for group in self.param_groups:
            group_params = [p for p in group["params"] if p.grad is not None]
            group_eps = [p.grad for p in group_params]
            if group["adaptive"] and group_eps:
                torch._foreach_mul_(group_eps, self._T(group_params))  # T g0 = |w| ⊙ g0, up to sign
            per_group.append((group, group_params, group_eps))
        params = [p for _, group_params, _ in per_group for p in group_params]
        eps = [e for _, _, group_eps in per_group for e in group_eps]
        if not params:
            self._update()
            return loss
        # One norm over all tensors: ||g0|| for SAM, ||T g0|| for ASAM (the sign of w does not matter).
        norm = float(global_norm(eps))
        # Under DDP every worker must reach the all-reduced second pass: there a non-finite ε makes the
        # averaged gradient non-finite on every worker, and all of them skip the update together.
        if not math.isfinite(norm) and not distributed:
            self._update()  # .grad still holds the non-finite g0 (times |w|): the update is skipped
            return loss
        for group, group_params, group_eps in per_group:
            if group["adaptive"] and group_eps:
                torch._foreach_mul_(group_eps, self._T(group_params))  # T² g0 = w² ⊙ g0
            if group_eps:
                torch._foreach_mul_(group_eps, group["rho"] / max(norm, 1e-12))
        for p in params:
            p.grad = None
        # Each worker shifts by its own ε: only an exact restore brings all of them back to the same w.
        exact = self.exact_restore or distributed
        with frozen_norm_stats(self.model), shifted_by(params, eps, exact=exact):
            self._call(closure)
        del eps
        self._update()
        return loss
