"""The Hessian of the training loss as a matrix-free operator: Hessian-vector products by double
backward (Pearlmutter's trick).

For ``L(w) = (1/B) Σ_b L_b(w)`` over the trainable parameters ``w`` (flattened to one vector),

    H v = ∇_w ( ∇_w L(w) · v ) = (1/B) Σ_b ∇_w ( ∇_w L_b(w) · v )

costs about two backward passes per batch and never forms ``H``. The graph of one batch is freed
before the next, so memory is that of one batch's double backward. ``torch.autograd.grad`` is used
throughout: the parameters' ``.grad`` are left alone.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .evaluation import Batch, LossFn, to_device, trainable


class Hessian:
    """``H v`` for flat ``v`` (length ``dim``, dtype ``dtype``: the parameters' dtype, at least
    float32). The caller puts the model in eval mode and keeps it there while using the operator."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: List[Batch]) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.params = trainable(model)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.dtype = torch.float32
        for p in self.params:
            self.dtype = torch.promote_types(self.dtype, p.dtype)

    def __call__(self, v: Tensor) -> Tensor:
        chunks = [c.view_as(p).to(p.dtype) for c, p in zip(v.split([p.numel() for p in self.params]), self.params)]
        out = torch.zeros_like(v)
        with torch.enable_grad():
            for x, y in self.batches:
                x, y = to_device(x, self.device), to_device(y, self.device)
                loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                # A gradient without a graph is constant in w: its rows of H are zero.
                terms = [(g * c).sum() for g, c in zip(grads, chunks) if g is not None and g.requires_grad]
                if not terms:
                    continue
                hv = torch.autograd.grad(sum(terms), self.params, allow_unused=True)
                out.add_(self.flatten(hv))
        return out.div_(len(self.batches))

    def flatten(self, tensors: List[Tensor]) -> Tensor:
        """One flat vector of ``dtype`` from per-parameter tensors (``None`` counts as zeros)."""
        return torch.cat([
            (t if t is not None else torch.zeros_like(p)).reshape(-1).to(self.dtype)
            for t, p in zip(tensors, self.params)
        ])
