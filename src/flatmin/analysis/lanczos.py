"""Lanczos tridiagonalisation of a symmetric operator, with full reorthogonalisation.

From a unit vector ``q_1``, step ``j`` extends an orthonormal basis ``Q = [q_1 … q_m]`` of the
Krylov space ``span{q_1, A q_1, …, A^{m−1} q_1}``:

    w        = A q_j − β_j q_{j−1}
    α_j      = q_jᵀ w
    w        ← w − α_j q_j,   then   w ← w − Q Qᵀ w   twice      (full reorthogonalisation)
    β_{j+1}  = ||w||,         q_{j+1} = w / β_{j+1}

so that ``QᵀAQ = T``, tridiagonal with diagonal ``α`` and off-diagonal ``β``. With
``T = S diag(θ) Sᵀ``, the Ritz values ``θ_i`` approximate eigenvalues of ``A`` (the extreme ones
first), and ``||A Q s_i − θ_i Q s_i|| = β_{m+1} |S_{m,i}|`` bounds each one's error. The squared
first components ``τ_i = S_{1,i}²`` are the weights of the Gauss quadrature of ``q_1``'s spectral
measure: ``q_1ᵀ f(A) q_1 ≈ Σ_i τ_i f(θ_i)`` (what stochastic Lanczos quadrature uses).

Full reorthogonalisation keeps ``Q`` orthonormal to working precision (plain three-term Lanczos
loses orthogonality and produces spurious copies of converged eigenvalues) at the price of storing
``Q``: ``steps × dim`` numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# β below this many ulps of ||T|| means the Krylov space is invariant (numerically).
BREAKDOWN_ULPS = 100


@dataclass
class Tridiagonal:
    """``T`` after ``m`` steps: ``alpha`` (``m`` diagonal entries) and ``beta`` (``m`` entries:
    ``beta[:-1]`` is the off-diagonal, ``beta[-1] = β_{m+1}`` the norm of the residual)."""

    alpha: List[float] = field(default_factory=list)
    beta: List[float] = field(default_factory=list)

    def ritz(self) -> Tuple[np.ndarray, np.ndarray]:
        """Ritz values ``θ`` (ascending) and the orthonormal eigenvectors ``S`` of ``T`` (columns)."""
        t = np.diag(np.asarray(self.alpha, dtype=np.float64))
        off = np.asarray(self.beta[:-1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
        return np.linalg.eigh(t)

    def residuals(self, s: np.ndarray) -> np.ndarray:
        """``β_{m+1} |S_{m,i}|`` for each Ritz pair: an upper bound on its eigenvalue's error."""
        return abs(self.beta[-1] * s[-1])


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    restart: Optional[Callable[[], Tensor]] = None,
) -> Iterator[Tridiagonal]:
    """Run up to ``steps`` Lanczos steps (at most ``start.numel()``), yielding ``T`` after each one.

    ``matvec(v) = A v`` for a flat ``v`` of ``start``'s dtype and device. When the Krylov space
    becomes invariant (``β`` vanishes) the run ends, unless ``restart`` gives a fresh vector: it is
    orthogonalised against ``Q`` and the run goes on with ``β = 0`` there, so ``T`` becomes block
    diagonal and later blocks can find further copies of repeated eigenvalues. ``T`` is not yielded
    at such a breakdown: its zero residual would look converged although more copies may exist.
    After the last possible step (``Q`` spans the whole space) the residual is exactly 0.
    """
    dim = start.numel()
    steps = min(steps, dim)
    basis = start.new_empty((steps, dim))
    threshold = BREAKDOWN_ULPS * torch.finfo(start.dtype).eps
    t = Tridiagonal()
    scale = 0.0  # running estimate of ||A|| for the breakdown test
    q = start / torch.linalg.vector_norm(start)
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        if j > 0:
            w.sub_(basis[j - 1], alpha=t.beta[-1])
        a = float(torch.dot(q, w))
        w.sub_(q, alpha=a)
        _orthogonalize(w, basis[: j + 1])
        b = float(torch.linalg.vector_norm(w))
        t.alpha.append(a)
        scale = max(scale, abs(a), b)
        if j + 1 == steps:
            t.beta.append(0.0 if steps == dim else b)
            yield t
            return
        if b > threshold * scale:
            t.beta.append(b)
            yield t
            q = w.div_(b)
            continue
        t.beta.append(0.0)
        if restart is None:
            yield t
            return
        w = restart().to(dtype=start.dtype, device=start.device)
        _orthogonalize(w, basis[: j + 1])
        q = w.div_(torch.linalg.vector_norm(w))


def _orthogonalize(w: Tensor, basis: Tensor) -> None:
    """``w ← w − Q Qᵀ w``, twice: one classical Gram–Schmidt pass leaves an error of order
    ``κ · eps``, the second brings it to ``eps`` ("twice is enough")."""
    for _ in range(2):
        w.sub_(basis.t().mv(basis.mv(w)))
