"""Loss landscapes: the training loss and accuracy on 1-D and 2-D slices through the weights along
random filter-normalised directions (Li et al., "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018).

    L(α)    = L(w + α d)                 1-D slice
    L(α, β) = L(w + α d + β e)           2-D slice

A direction starts as ``z ~ N(0, I)`` and each of its filters is rescaled to the norm of the same
filter of the weights (filters as in docs/algorithms.md: slices along dim 0 of tensors with ``ndim >= 2``):

    d_i = z_i / ||z_i|| · ||W_i||

so that ``α`` is a distance relative to each filter's own scale and slices of networks with
different weight scales (scale-invariant under normalisation layers) are comparable. 1-D parameters
(biases, normalisation affines) get direction 0 by default; with ``include_1d`` each is one filter
(``d = z / ||z|| · ||W||``). Running statistics are those of ``w``: they are not recomputed at the
perturbed weights.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..filters import filter_norms, is_filterwise
from ..perturb import gaussian_draw, shifted_weights
from .evaluation import Batch, LossFn, evaluate, evaluation_mode, materialize, named_trainable


def _direction(model: nn.Module, generator: torch.Generator, include_1d: bool) -> Dict[str, Tensor]:
    """One filter-normalised direction from ``generator`` (see the module docstring)."""
    direction = {}
    with torch.no_grad():
        for name, p in named_trainable(model):
            z = gaussian_draw(p.shape, generator, p)  # drawn for every tensor: include_1d keeps the others
            if is_filterwise(p) or include_1d:
                direction[name] = z.div_(filter_norms(z)).mul_(filter_norms(p))
            else:
                direction[name] = z.zero_()
    return direction


def filter_normalized_direction(model: nn.Module, seed: int, include_1d: bool = False) -> Dict[str, Tensor]:
    """A random filter-normalised direction: a tensor for each trainable parameter, by name, with
    ``||d_i|| = ||W_i||`` for every filter ``i`` (and ``d = 0`` on 1-D parameters unless ``include_1d``).

    ``seed`` fixes the direction (drawn on the CPU, so it is the same on every device).

    Args:
        model: the model whose trainable parameters give the filter norms.
        seed: seeds the draw.
        include_1d: give 1-D parameters (biases, normalisation weights) a direction as well, of
            the tensor's norm, instead of 0.

    Returns:
        The direction, one tensor per trainable parameter name, of the parameter's shape.

    Raises:
        ValueError: ``model`` has no trainable parameters.
    """
    return _direction(model, torch.Generator().manual_seed(seed), include_1d)


def _loss_at(model: nn.Module, loss_fn: LossFn, batches: List[Batch],
             terms: Sequence[Tuple[float, Dict[str, Tensor]]]) -> Tuple[float, Any]:
    """``(L, accuracy)`` at ``w + Σ coef · direction``; the weights come back bit-exact."""
    named = named_trainable(model)
    params = [p for _, p in named]

    def deltas():
        for name, _ in named:
            yield sum(coef * direction[name] for coef, direction in terms)

    with shifted_weights(params, deltas, exact=True):
        return evaluate(model, loss_fn, batches)


def _axis(span: Tuple[float, float], steps: int) -> np.ndarray:
    if steps < 2:
        raise ValueError(f"a slice needs steps >= 2, got {steps}")
    if not (isinstance(span, (tuple, list)) and len(span) == 2 and -np.inf < span[0] < span[1] < np.inf):
        raise ValueError(f"span={span!r} is not allowed: it must be (low, high), finite numbers with low < high")
    return np.linspace(span[0], span[1], steps)


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    steps: int = 21,
    span: Tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    include_1d: bool = False,
    *,
    progress: bool = False,
) -> Dict[str, Any]:
    """``L(w + α d)`` and the accuracy for ``steps`` values of ``α`` evenly over ``span`` (an odd
    ``steps`` with a symmetric span includes ``α = 0``, the trained weights).

    ``d = filter_normalized_direction(model, seed, include_1d)``.

    Args:
        model: the trained model; it is left as it was found.
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch.
        batches: ``(x, y)`` pairs; the loss is their mean.
        steps: the number of points, ``>= 2``.
        span: ``(low, high)``, the range of ``α``.
        seed: seeds the direction.
        include_1d: perturb 1-D parameters too (see `filter_normalized_direction`).
        progress: show a progress bar.

    Returns:
        ``alphas``, ``loss`` and ``accuracy`` (lists; ``accuracy`` is ``None`` without class labels).

    Raises:
        ValueError: no batch, ``steps < 2`` or a ``span`` that is not two finite numbers, low < high.
    """
    batches = materialize(batches)
    alphas = _axis(span, steps)
    with evaluation_mode(model):
        d = filter_normalized_direction(model, seed, include_1d)
        points = [_loss_at(model, loss_fn, batches, [(float(a), d)])
                  for a in tqdm(alphas, desc="landscape 1-d", disable=not progress, leave=False)]
    losses, accuracies = zip(*points)
    return {
        "alphas": alphas.tolist(),
        "loss": list(losses),
        "accuracy": None if accuracies[0] is None else list(accuracies),
    }


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    steps: int = 11,
    span: Tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    include_1d: bool = False,
    *,
    progress: bool = False,
) -> Dict[str, Any]:
    """``L(w + α d + β e)`` and the accuracy on a ``steps × steps`` grid over ``span²``.

    ``d`` and ``e`` are two consecutive draws from one generator seeded with ``seed`` (``d`` is
    the direction of ``landscape_1d`` with the same seed). In high dimension they are nearly
    orthogonal, so they are used as drawn.

    Args:
        model: the trained model; it is left as it was found.
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch.
        batches: ``(x, y)`` pairs; the loss is their mean.
        steps: points per axis, ``>= 2``.
        span: ``(low, high)``, the range of ``α`` and of ``β``.
        seed: seeds the two directions.
        include_1d: perturb 1-D parameters too (see `filter_normalized_direction`).
        progress: show a progress bar.

    Returns:
        ``alphas``, ``betas`` and the grids ``loss`` and ``accuracy`` with ``loss[i][j]`` at
        ``(alphas[i], betas[j])``.

    Raises:
        ValueError: no batch, ``steps < 2`` or a ``span`` that is not two finite numbers, low < high.
    """
    batches = materialize(batches)
    alphas = _axis(span, steps)
    with evaluation_mode(model):
        generator = torch.Generator().manual_seed(seed)
        d = _direction(model, generator, include_1d)
        e = _direction(model, generator, include_1d)
        with tqdm(total=steps * steps, desc="landscape 2-d", disable=not progress, leave=False) as bar:
            rows = []
            for a in alphas:
                row = []
                for b in alphas:
                    row.append(_loss_at(model, loss_fn, batches, [(float(a), d), (float(b), e)]))
                    bar.update(1)
                rows.append(row)
    loss = [[point[0] for point in row] for row in rows]
    accuracy = None if rows[0][0][1] is None else [[point[1] for point in row] for row in rows]
    return {"alphas": alphas.tolist(), "betas": alphas.tolist(), "loss": loss, "accuracy": accuracy}
