"""Evaluating a model on a fixed list of batches without changing it.

Every analysis measures the training loss

    L(w) = (1/B) Σ_b loss_fn(model(x_b; w), y_b)

over the ``B`` batches the user gives (the plain average of the batch means), in eval mode, so that
normalisation layers use their running statistics and never update them, and dropout is off.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = Tuple[Any, Any]


def materialize(batches: Iterable[Batch]) -> List[Batch]:
    """``batches`` as a list, so that the analyses can iterate over the same batches many times."""
    batches = list(batches)
    if not batches:
        raise ValueError("the analyses need at least one batch")
    return batches


def named_trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The parameters the analyses differentiate and perturb: those with ``requires_grad``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for _, p in named_trainable(model)]


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor to ``device`` (a no-op when it is there already); anything else as it is."""
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Inside the block the whole model is in eval mode; on exit every submodule gets back its own
    ``training`` flag (a model may mix modes, e.g. a frozen backbone in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def batch_correct(output: Tensor, target: Any) -> Optional[int]:
    """Number of correct argmax predictions, or ``None`` when the output is not ``(N, C)`` class
    scores for integer labels ``(N,)`` (regression has no accuracy)."""
    if output.ndim == 2 and isinstance(target, Tensor) and target.ndim == 1 and not target.is_floating_point():
        return int((output.argmax(dim=1) == target).sum())
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: List[Batch]) -> Tuple[float, Optional[float]]:
    """``(L(w), accuracy)`` at the model's current weights; the caller sets eval mode.

    The loss is the average of the batch means; the accuracy counts samples over all batches
    (``None`` when the task has no class labels).
    """
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = to_device(x, device), to_device(y, device)
        output = model(x)
        total += float(loss_fn(output, y))
        hits = batch_correct(output, y)
        if hits is None:
            correct = None
        elif correct is not None:
            correct += hits
            count += output.shape[0]
    return total / len(batches), (correct / count if correct is not None and count else None)
