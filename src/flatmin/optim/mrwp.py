"""m-RWP and m-ARWP: the mixed clean + perturbed objective (Li et al., TMLR 2024), two gradients
per update:

    (1 − λ) · L(w; B1) + λ · E_ε L(w + ε; B2)
    g = (1 − λ) · ∇L(w; B1) + λ · ∇L(w + ε; B2)      ε from RWP (m-RWP) or ARWP (m-ARWP)

``λ`` (``lam``) weighs the perturbed term. ``B1`` and ``B2`` are two batches (the papers' recipe:
two consecutive mini-batches per update) or the same batch twice.

No buffer holds either gradient. The perturbed pass runs first, into an empty ``.grad``, so
m-ARWP reads the perturbed gradient alone (gradient accumulation inside the closure included), and
the result is scaled by ``λ / (1 − λ)``. The clean pass then starts from an empty ``.grad`` as well,
so a closure that zeroes gradients (``opt.zero_grad()``, ``model.zero_grad()``, Lightning's
closure) cannot wipe the perturbed term: a hook on each tensor folds the clean gradient into the
held perturbed one the moment autograd accumulates it, in place, exactly where a plain accumulation
would add it. The sum is scaled by ``1 − λ``:
``(1 − λ) · (λ/(1 − λ) · g2 + g1) = λ · g2 + (1 − λ) · g1``. (For ``λ = 1`` the clean gradient is
dropped instead.) The two terms are independent, so the order does not change ``g``. Running
statistics are updated by the clean pass only; m-ARWP's ``F`` only from the perturbed gradient.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import torch
from torch import Tensor

from ..norm_stats import frozen_norm_stats
from .arwp import AdaptiveNoise
from .base import BaseOptimizer, Closure, check_range
from .rwp import RWP


class MRWP(RWP):
    """Mixed random weight perturbation around any base optimizer (docs/algorithms.md, "m-RWP and m-ARWP").

    Two gradients per update, on the mixed objective ``(1 − λ) · L(w; B1) + λ · E_ε L(w + ε; B2)``:

        ε = σ · s(W) ⊙ z,    z ~ N(0, I)
        g = (1 − λ) · ∇L(w; B1) + λ · ∇L(w + ε; B2)
        w ← base_step(w, g)

    ```python
    opt = flatmin.MRWP(model.parameters(), torch.optim.SGD, model=model,
                       sigma=0.015, lam=0.5, lr=0.1, momentum=0.9)
    loss = opt.step(closure_on(x1, y1), closure_on(x2, y2))  # B1 clean, B2 perturbed
    ```

    ``step`` returns the clean loss ``L(w; B1)``.

    Args:
        params: the tensors to train, or parameter groups (dicts with ``"params"`` and per-group
            values, e.g. ``{"params": ..., "sigma": 0.0}`` for a group left unperturbed).
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``,
            ``torch.optim.AdamW``, ...); it shares this optimizer's ``param_groups``.
        sigma: the relative noise radius ``σ >= 0``.
        lam: ``λ`` in ``[0, 1]``, the weight of the perturbed term (``0``: plain training on B1,
            ``1``: RWP on B2).
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

    method = "m-rwp"
    grads_per_step = 2
    batches_per_step = 2
    _hold_noise = False

    def __init__(
        self, params: Any, base_optimizer: BaseOptimizer, sigma: float = 0.015, lam: float = 0.5, **kwargs: Any
    ) -> None:
        check_range("lam", lam, 0.0, 1.0)
        method_defaults = {"lam": lam, **kwargs.pop("method_defaults", {})}
        self._held: Optional[Dict[Tensor, Optional[Tensor]]] = None  # during a clean pass: the terms to fold into
        self._folded: Set[Tensor] = set()
        self._hooked: Set[Tensor] = set()
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

    def _fold(self, p: Tensor) -> None:
        """Post-accumulate hook of every tensor: during a clean pass, add the gradient autograd just
        accumulated into ``.grad`` to the held perturbed term, which becomes ``.grad``."""
        held = self._held
        if held is None or p not in held:
            return
        total = held[p]
        if p.grad is total:  # a later backward of the same closure accumulated in place
            return
        if total is None:
            held[p] = p.grad
        else:
            total.add_(p.grad)
            p.grad = total
        self._folded.add(p)

    def _hook(self, params: List[Tensor]) -> None:
        """Give every tensor the folding hook once. It holds the optimizer weakly and does nothing
        outside a clean pass, so it costs nothing to keep between steps."""
        owner = weakref.ref(self)

        def fold(p: Tensor) -> None:
            optimizer = owner()
            if optimizer is not None:
                optimizer._fold(p)

        for p in params:
            if p not in self._hooked:
                p.register_post_accumulate_grad_hook(fold)
                self._hooked.add(p)

    @contextmanager
    def _clean_pass(self) -> Iterator[None]:
        """Inside, ``.grad`` starts empty and every gradient autograd accumulates is folded into the
        held perturbed term; on exit ``.grad`` is that sum (in groups with ``λ = 1``, the perturbed
        term alone).

        The fold runs in a post-accumulate hook, before DDP's reducer reads ``.grad``, so under DDP
        the sum is what gets averaged, as a plain accumulation would be.
        """
        # Under DDP with gradient_as_bucket_view the held gradient is DDP's bucket, which the clean
        # pass's reduction overwrites: a group with λ = 1 keeps a copy of it.
        copy = getattr(self.model, "gradient_as_bucket_view", False)
        held: Dict[Tensor, Optional[Tensor]] = {}
        dropped: Dict[Tensor, Optional[Tensor]] = {}
        for group in self.param_groups:
            if group["lam"] == 1:  # the clean gradient stays in its own fresh .grad and is dropped on exit
                for p in group["params"]:
                    if p.requires_grad:
                        dropped[p] = p.grad.clone() if copy and p.grad is not None else p.grad
                        p.grad = None
                continue
            for p in group["params"]:
                if p.requires_grad:
                    held[p] = p.grad
                    p.grad = None
        self._hook(list(held))
        self._held, self._folded = held, set()
        try:
            yield
        finally:
            folded, self._held = self._folded, None
            for p, total in held.items():
                if p.grad is None:
                    p.grad = total
                elif p not in folded and total is not None:
                    # .grad was set without autograd's accumulation (no hook ran): add the two here.
                    total.add_(p.grad)
                    p.grad = total
                # A folded .grad stays: DDP with gradient_as_bucket_view may have moved it into a bucket.
            for p, total in dropped.items():
                p.grad = total

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Optional[Closure] = None, perturbed_closure: Optional[Closure] = None
    ) -> Any:
        """One update from a clean ``closure`` (batch B1) and a ``perturbed_closure`` (batch B2,
        defaults to ``closure``).

        Args:
            closure: forward and backward on the clean batch B1, returning the loss.
            perturbed_closure: the same on the batch B2 of the perturbed term, run at ``w + ε``
                first; ``None`` runs ``closure`` again (the same batch twice).

        Returns:
            What ``closure`` returned: the clean loss ``L(w; B1)``.

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
        perturbed_closure = closure if perturbed_closure is None else perturbed_closure
        self._clear_grads()
        pending = None
        if any(group["lam"] > 0 for group in self.param_groups):
            with frozen_norm_stats(self.model), self._perturbed():
                self._call(perturbed_closure, "perturbed_closure")
            pending = self._perturbed_stats()
            self._scale_grads(lambda lam: lam / (1.0 - lam))
        with self._clean_pass():
            loss = self._call(closure)
        self._scale_grads(lambda lam: 1.0 - lam)
        self._update(pending)
        return loss


class MARWP(AdaptiveNoise, MRWP):
    """Mixed adaptive random weight perturbation around any base optimizer (docs/algorithms.md, "m-RWP and m-ARWP").

    Two gradients per update: m-RWP's mixed objective with ARWP's adaptive noise, whose statistics
    come from the perturbed gradient alone:

        ε  = σ · s(W) ⊙ z / sqrt(1 + η · F)
        g2 = ∇L(w + ε; B2)
        M  ← β · M + g2²,    F_i = Σ_{j in filter i} M_j
        g  = (1 − λ) · ∇L(w; B1) + λ · g2
        w  ← base_step(w, g)

    ```python
    opt = flatmin.MARWP(model.parameters(), torch.optim.SGD, model=model,
                        sigma=0.015, lam=0.5, eta=0.1, beta=0.99, seed=0,
                        lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss = opt.step(closure_on(x1, y1), closure_on(x2, y2))  # B1 clean, B2 perturbed
    ```

    ``step`` returns the clean loss ``L(w; B1)``.

    Args:
        params: the tensors to train, or parameter groups (dicts with ``"params"`` and per-group
            values, e.g. ``{"params": ..., "sigma": 0.0}`` for a group left unperturbed).
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``,
            ``torch.optim.AdamW``, ...); it shares this optimizer's ``param_groups``.
        sigma: the relative noise radius ``σ >= 0``.
        lam: ``λ`` in ``[0, 1]``, the weight of the perturbed term.
        eta: ``η >= 0``, how strongly past squared gradients shrink the noise.
        beta: ``β`` in ``[0, 1)``, the decay of the running sum ``M``.
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

    method = "m-arwp"

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
