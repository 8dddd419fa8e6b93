"""Seeing flatness three ways, as numbers and pictures.

* The Hessian of the training loss, matrix-free: top eigenvalues (Lanczos), trace (Hutchinson),
  eigenvalue density (stochastic Lanczos quadrature) — ``hessian.py``.
* Loss landscapes along random filter-normalised directions, 1-D and 2-D — ``landscape.py``.
* The loss under random filter-wise weight perturbation as the radius grows, beside the SAM
  direction of the same expected norm — ``radius.py``.

Every analysis evaluates ``L(w) = mean_b loss_fn(model(x_b), y_b)`` over the given batches in eval
mode, and leaves the model as it found it: weights and buffers bit-identical, every submodule's
train/eval mode restored, ``.grad`` untouched. ``analyze`` runs a chosen set and writes
``analysis.json`` and PNGs (``plots.py``).
"""
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .landscape import filter_normalized_direction, landscape_1d, landscape_2d
from .radius import loss_vs_radius
from .report import analyze

__all__ = [
    "analyze",
    "filter_normalized_direction",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "landscape_1d",
    "landscape_2d",
    "loss_vs_radius",
]
