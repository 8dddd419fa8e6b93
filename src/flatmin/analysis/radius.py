"""The expected training loss under random weight perturbation as its radius grows, optionally
beside the loss along the adversarial (SAM) direction of a comparable size.

Random, as in RWP (docs/algorithms.md), for each radius ``σ`` and draw ``z ~ N(0, I)``:

    ε = σ · s(W) ⊙ z            for every trainable tensor W (filter-wise scale s)

Its expected squared norm is ``E||ε||² = σ² Σ_j s_j²``, the sum running over every weight ``j``
(``s_j`` the scale of ``j``'s filter): ``Σ_i n_i ||W_i||²`` over filters of ``n_i`` weights, i.e.
``||w||²`` weighted by the filter sizes, not ``||w||²`` itself. Adversarial, as in SAM, with the
same expected norm:

    ε_adv = ρ(σ) · g / ||g||,    g = ∇L(w),    ρ(σ) = σ · sqrt(Σ_j s_j²) = sqrt(E||ε||²)

In high dimension ``||ε||`` concentrates at ``ρ(σ)``, so both perturbations have (almost) the same
length and differ only in direction: ``L(w + ε_adv) − E L(w + ε)`` measures how much worse the
worst direction is than a typical one.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..filters import filter_norms
from ..perturb import gaussian_deltas, shifted_weights
from .evaluation import Batch, LossFn, evaluate, evaluation_mode, materialize, to_device, trainable

DEFAULT_RADII = (0.0, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def _gradient(model: nn.Module, loss_fn: LossFn, batches: List[Batch]) -> List[Tensor]:
    """``∇L(w)`` per trainable tensor, by ``torch.autograd.grad`` (``.grad`` stays untouched)."""
    params = trainable(model)
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for x, y in batches:
            x, y = to_device(x, params[0].device), to_device(y, params[0].device)
            grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g, alpha=1 / len(batches))
    return total


def loss_vs_radius(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    radii: Sequence[float] = DEFAULT_RADII,
    draws: int = 10,
    seed: int = 0,
    adversarial: bool = False,
    *,
    progress: bool = False,
) -> Dict[str, Any]:
    """``L(w + ε)`` over ``draws`` random draws for each radius ``σ`` in ``radii`` (and, with
    ``adversarial``, ``L(w + ε_adv)`` at ``ρ(σ)``; see the module docstring).

    The same ``draws`` noise vectors ``z`` are scaled to every radius (common random numbers), so
    the curves are smooth in ``σ``: differences between radii are not sampling noise.

    Args:
        model: the trained model; it is left as it was found (weights, buffers, train/eval mode).
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch (``F.cross_entropy``).
        batches: ``(x, y)`` pairs; ``L(w)`` is the mean of the loss over them.
        radii: the relative radii ``σ >= 0``, finite.
        draws: noise draws per radius, ``>= 1``.
        seed: seeds the noise, so a call repeats exactly.
        adversarial: also the loss in the SAM direction of the same expected norm.
        progress: show a progress bar.

    Returns:
        Lists over ``radii``: ``loss_mean``, ``loss_std`` (sample std; 0 for one draw),
        ``loss_min``, ``loss_max``, ``accuracy_mean`` (``None`` without class labels) and ``losses``
        (every draw), plus ``clean_loss``, ``clean_accuracy`` and ``rho_per_sigma``
        (``sqrt(Σ_j s_j²)``). With ``adversarial`` also ``rho``, ``adversarial_loss`` and
        ``adversarial_accuracy``.

    Raises:
        ValueError: no batch, ``draws < 1``, or no radii or a negative or infinite one.
    """
    batches = materialize(batches)
    if draws < 1 or not radii or not all(isinstance(r, (int, float)) and 0 <= r < math.inf for r in radii):
        raise ValueError(f"need draws >= 1 and finite radii >= 0, got draws={draws}, radii={list(radii)}")
    params = trainable(model)
    with torch.no_grad():
        scales = [filter_norms(p.detach()) for p in params]
        # Σ_j s_j²: each filter's scale counts once per weight it covers.
        rho_per_sigma = math.sqrt(sum(float(s.double().square().sum()) * (p.numel() // s.numel())
                                      for s, p in zip(scales, params)))
    generator = torch.Generator().manual_seed(seed)
    start = generator.get_state()
    losses, accuracies = [], []
    with evaluation_mode(model):
        clean_loss, clean_accuracy = evaluate(model, loss_fn, batches)
        with tqdm(total=len(radii) * draws, desc="loss vs radius", disable=not progress, leave=False) as bar:
            for sigma in radii:
                generator.set_state(start)
                points = []
                for _ in range(draws):
                    if sigma == 0:  # ε = 0 for every draw: the clean model
                        points.append((clean_loss, clean_accuracy))
                    else:
                        deltas = gaussian_deltas(params, [s * sigma for s in scales], generator)
                        with shifted_weights(params, deltas, exact=True):
                            points.append(evaluate(model, loss_fn, batches))
                    bar.update(1)
                losses.append([loss for loss, _ in points])
                accuracies.append(None if clean_accuracy is None else float(np.mean([a for _, a in points])))
        result: Dict[str, Any] = {
            "radii": [float(r) for r in radii],
            "loss_mean": [float(np.mean(row)) for row in losses],
            "loss_std": [float(np.std(row, ddof=1)) if draws > 1 else 0.0 for row in losses],
            "loss_min": [float(np.min(row)) for row in losses],
            "loss_max": [float(np.max(row)) for row in losses],
            "accuracy_mean": None if clean_accuracy is None else accuracies,
            "losses": losses,
            "draws": draws,
            "clean_loss": clean_loss,
            "clean_accuracy": clean_accuracy,
            "rho_per_sigma": rho_per_sigma,
        }
        if adversarial:
            result.update(_adversarial(model, loss_fn, batches, params, radii, rho_per_sigma))
    return result


def _adversarial(model: nn.Module, loss_fn: LossFn, batches: List[Batch], params: List[Tensor],
                 radii: Sequence[float], rho_per_sigma: float) -> Dict[str, Any]:
    """``L(w + ρ(σ) g/||g||)`` for each radius (the clean loss where ``g = 0``)."""
    g = _gradient(model, loss_fn, batches)
    g_norm = math.sqrt(sum(float(t.double().square().sum()) for t in g))
    rho = [sigma * rho_per_sigma for sigma in radii]
    points = []
    for r in rho:
        step = r / g_norm if g_norm > 0 else 0.0
        with shifted_weights(params, lambda: (t * step for t in g), exact=True):
            points.append(evaluate(model, loss_fn, batches))
    return {
        "rho": rho,
        "adversarial_loss": [loss for loss, _ in points],
        "adversarial_accuracy": None if points[0][1] is None else [a for _, a in points],
    }
