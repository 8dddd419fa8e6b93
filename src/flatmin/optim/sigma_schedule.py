"""The σ schedule of the papers ("CosineInc"): the noise radius grows along a half cosine.

    σ_t = σ_0 · (1 + inc · (1 − cos(π · t / T)) / 2)

for update ``t`` of ``T``: ``σ_0`` at the start, ``σ_0 · (1 + inc)`` at the end; ``inc = 0`` keeps σ
constant. Works like torch's LR schedulers: build it after the optimizer, call ``step()`` once
per update, save it with ``state_dict()``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from .base import check_range


class CosineIncSigma:
    """Sets ``group["sigma"]`` of every parameter group of ``optimizer`` along the CosineInc schedule
    (docs/algorithms.md, "σ schedule (CosineInc)"):

        σ_t = σ_0 · (1 + inc · (1 − cos(π · t / T)) / 2),     t = 0 … T updates

    Build it after the optimizer and call `step` once per update, as torch's LR schedulers.

    Args:
        optimizer: any optimizer whose groups have a ``sigma`` (RWP, ARWP, MRWP, MARWP).
        total_steps: ``T``, the number of updates of the whole run.
        inc: the relative growth ``inc >= 0``; the final σ is ``(1 + inc)`` times the initial
            one, and ``0`` keeps σ constant.

    Raises:
        ValueError: ``optimizer`` has no ``sigma`` in its groups, ``total_steps`` is not an integer
            ``>= 1`` or ``inc`` is negative.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, inc: float = 10.0) -> None:
        if not all("sigma" in group for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} has no 'sigma' to schedule: use it with RWP, ARWP, MRWP or MARWP")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} is not allowed: it must be an integer >= 1")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.inc = check_range("inc", inc, 0.0, math.inf, high_open=True)
        for group in optimizer.param_groups:
            group.setdefault("initial_sigma", group["sigma"])
        self.base_sigmas: List[float] = [group["initial_sigma"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def sigma_at(self, step: int, base_sigma: float) -> float:
        """σ after ``step`` of ``total_steps`` updates (clamped at the end of the schedule).

        Args:
            step: the number of updates done, ``t``.
            base_sigma: the initial ``σ_0``.

        Returns:
            ``σ_t``.
        """
        t = min(max(step, 0), self.total_steps)
        return base_sigma * (1.0 + self.inc * (1.0 - math.cos(math.pi * t / self.total_steps)) / 2.0)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_sigmas):
            group["sigma"] = self.sigma_at(self.last_step, base)

    def step(self) -> None:
        """Advance one update."""
        self.last_step += 1
        self._apply()

    def get_last_sigma(self) -> List[float]:
        """The σ of every group now.

        Returns:
            One σ per parameter group, in order.
        """
        return [group["sigma"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's state.

        Returns:
            ``total_steps``, ``inc``, the initial σ of every group and the updates done.
        """
        return {"total_steps": self.total_steps, "inc": self.inc, "base_sigmas": list(self.base_sigmas),
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state written by `state_dict` and set σ of every group accordingly.

        Args:
            state_dict: what `state_dict` returned.

        Raises:
            KeyError: an entry of `state_dict` is missing.
        """
        self.total_steps = int(state_dict["total_steps"])
        self.inc = float(state_dict["inc"])
        self.base_sigmas = list(state_dict["base_sigmas"])
        self.last_step = int(state_dict["last_step"])
        self._apply()
