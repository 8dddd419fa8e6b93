"""The spectrum of the training loss's Hessian ``H = ∇²L(w)``, matrix-free: the top eigenvalues
(Lanczos), the trace (Hutchinson) and the eigenvalue density (stochastic Lanczos quadrature).

``L(w)`` is the average of ``loss_fn`` over the given batches (``evaluation.py``), taken in eval
mode; ``w`` is every trainable parameter. Each function restores the model's modes on return and
never writes to its weights, buffers or ``.grad``. Every random probe comes from a
``torch.Generator`` seeded with ``seed`` (on the CPU, so results do not depend on the device).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .evaluation import Batch, LossFn, evaluation_mode, materialize
from .hvp import Hessian
from .lanczos import Tridiagonal, lanczos


def _probe(generator: torch.Generator, hessian: Hessian, kind: str = "rademacher") -> Tensor:
    """A random vector for ``hessian``: Rademacher (±1 with equal odds) or standard Gaussian."""
    if kind == "rademacher":
        z = torch.empty(hessian.dim, dtype=hessian.dtype).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    elif kind == "gaussian":
        z = torch.randn(hessian.dim, generator=generator, dtype=hessian.dtype)
    else:
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    return z.to(hessian.device)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    k: int = 1,
    *,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    progress: bool = False,
) -> List[float]:
    """The ``k`` algebraically largest eigenvalues of ``H``, in descending order.

    Lanczos with full reorthogonalisation from a Gaussian start vector, at most ``iters`` steps
    (one Hessian-vector product each; the basis holds ``iters × dim`` numbers). It stops once every
    wanted Ritz pair has ``β_{m+1}|S_{m,i}| ≤ tol · max_i |θ_i|``, which bounds each eigenvalue's
    error by ``tol · ||H||`` (in practice the error is about the square of that over the spectral
    gap). A warning says when ``iters`` steps were not enough.

    A single Lanczos vector sees one copy of a repeated eigenvalue; further copies are found only
    when the Krylov space is exhausted (the run then restarts from a fresh random vector).

    Args:
        model: the trained model; it is left as it was found (weights, buffers, train/eval mode).
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch (``F.cross_entropy``).
        batches: ``(x, y)`` pairs; ``L(w)`` is the mean of the loss over them.
        k: how many eigenvalues, ``1 <= k <= iters``.
        iters: the most Lanczos steps.
        tol: the relative tolerance of the stopping rule, ``> 0``.
        seed: seeds the random start vector, so a call repeats exactly.
        progress: show a progress bar.

    Returns:
        The ``k`` largest eigenvalues, largest first.

    Raises:
        ValueError: no batch, ``k`` or ``iters`` or ``tol`` out of range, or ``k`` larger than the
            number of parameters.
    """
    batches = materialize(batches)
    if k < 1 or iters < k:
        raise ValueError(f"need 1 <= k <= iters, got k={k}, iters={iters}")
    if not 0 < tol < math.inf:
        raise ValueError(f"tol={tol!r} is not allowed: it must be a finite number > 0")
    with evaluation_mode(model):
        hessian = Hessian(model, loss_fn, batches)
        if k > hessian.dim:
            raise ValueError(f"k={k} exceeds the number of parameters ({hessian.dim})")
        generator = torch.Generator().manual_seed(seed)

        def draw() -> Tensor:
            return _probe(generator, hessian, "gaussian")

        def converged(t: Tridiagonal) -> Tuple[bool, np.ndarray]:
            theta, s = t.ritz()
            top = np.argsort(theta)[::-1][:k]
            residual = t.residuals(s)[top]
            ok = len(theta) >= k and bool(np.all(residual <= tol * max(np.abs(theta).max(), 1e-300)))
            return ok, residual

        with tqdm(total=min(iters, hessian.dim), desc="hessian eigenvalues", disable=not progress, leave=False) as bar:
            for t in lanczos(hessian, draw(), iters, restart=draw):
                bar.update(len(t.alpha) - bar.n)
                ok, residual = converged(t)
                if ok:
                    break
        if not ok:
            warnings.warn(f"hessian_eigenvalues: {len(t.alpha)} Lanczos steps did not reach tol={tol} "
                          f"(largest residual {residual.max():.3g}); raise iters for more accuracy",
                          RuntimeWarning, stacklevel=2)
        theta, _ = t.ritz()
    return [float(x) for x in theta[::-1][:k]]


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    probes: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)`` and its standard error.

        tr(H) ≈ (1/P) Σ_p z_pᵀ H z_p,     z_p Rademacher (E[z zᵀ] = I)
        SE    = std_p(z_pᵀ H z_p) / sqrt(P)          (sample std, P − 1 in the denominator)

    Rademacher probes have the smallest variance among the usual ones:
    ``Var(zᵀHz) = 2 Σ_{i≠j} H_ij²``.

    Args:
        model: the trained model; it is left as it was found (weights, buffers, train/eval mode).
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch (``F.cross_entropy``).
        batches: ``(x, y)`` pairs; ``L(w)`` is the mean of the loss over them.
        probes: the number ``P >= 2`` of probe vectors.
        seed: seeds the random probes, so a call repeats exactly.
        progress: show a progress bar.

    Returns:
        ``(trace, standard_error)``.

    Raises:
        ValueError: no batch, or ``probes < 2``.
    """
    batches = materialize(batches)
    if probes < 2:
        raise ValueError(f"the standard error needs probes >= 2, got {probes}")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with evaluation_mode(model):
        hessian = Hessian(model, loss_fn, batches)
        for _ in tqdm(range(probes), desc="hessian trace", disable=not progress, leave=False):
            z = _probe(generator, hessian)
            samples.append(float(torch.dot(z.double(), hessian(z).double())))
    values = np.asarray(samples)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(probes))


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    probes: int = 10,
    steps: int = 40,
    seed: int = 0,
    grid: Union[int, Sequence[float]] = 1000,
    *,
    sigma: Optional[float] = None,
    probe: str = "rademacher",
    progress: bool = False,
) -> Dict[str, Any]:
    """The eigenvalue density of ``H`` by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
    Ghorbani, Krishnan & Xiao 2019).

    For each of ``P`` unit probes ``v_p`` (Rademacher or Gaussian, normalised), ``m = steps``
    Lanczos steps give Ritz values ``θ_pi`` and weights ``τ_pi = S_{1,i}²`` (``Σ_i τ_pi = 1``), the
    Gauss quadrature of ``v_pᵀ δ(t − H) v_p``. Averaging over probes and broadening each node into a
    Gaussian of width ``σ``:

        φ(t) = (1/P) Σ_p Σ_i τ_pi · exp(−(t − θ_pi)² / 2σ²) / (σ sqrt(2π))

    which integrates to 1. ``Σ_i τ_pi θ_pi = v_pᵀ H v_p``, so the weighted mean of the Ritz values
    estimates ``tr(H) / dim``.

    ``sigma`` defaults to 1% of the Ritz values' range. ``grid`` is a number of points, spread over
    that range plus 6σ on each side (so the mass outside it is below 1e-8), or the points themselves.

    Args:
        model: the trained model; it is left as it was found (weights, buffers, train/eval mode).
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch (``F.cross_entropy``).
        batches: ``(x, y)`` pairs; ``L(w)`` is the mean of the loss over them.
        probes: the number ``P >= 1`` of probe vectors.
        steps: Lanczos steps per probe, ``m >= 1``.
        seed: seeds the random probes, so a call repeats exactly.
        grid: the number of points to evaluate ``φ`` at, or the points themselves.
        sigma: the width of the Gaussian broadening; ``None``: 1% of the Ritz values' range.
        probe: ``"rademacher"`` or ``"gaussian"``.
        progress: show a progress bar.

    Returns:
        ``grid``, ``density`` (lists), ``sigma``, ``dim`` and the raw ``ritz_values`` and
        ``ritz_weights`` (one list per probe).

    Raises:
        ValueError: no batch, ``probes`` or ``steps`` below 1, or an unknown ``probe``.
    """
    batches = materialize(batches)
    if probes < 1 or steps < 1:
        raise ValueError(f"need probes >= 1 and steps >= 1, got {probes}, {steps}")
    generator = torch.Generator().manual_seed(seed)
    values, weights = [], []
    with evaluation_mode(model):
        hessian = Hessian(model, loss_fn, batches)
        for _ in tqdm(range(probes), desc="hessian density", disable=not progress, leave=False):
            for t in lanczos(hessian, _probe(generator, hessian, probe), steps):
                pass
            theta, s = t.ritz()
            values.append(theta.tolist())
            weights.append((s[0] ** 2).tolist())
    return {**slq_density(values, weights, grid, sigma), "dim": hessian.dim, "ritz_values": values,
            "ritz_weights": weights}


def slq_density(ritz_values: Sequence[Sequence[float]], ritz_weights: Sequence[Sequence[float]],
                grid: Union[int, Sequence[float]] = 1000, sigma: Optional[float] = None) -> Dict[str, Any]:
    """The SLQ density ``φ(t)`` of ``hessian_density`` from its Ritz values and weights (one list of
    each per probe; probes of several models may be pooled, each counting once). Returns ``grid``,
    ``density`` (lists) and ``sigma``, with the defaults of ``hessian_density``."""
    nodes = np.concatenate([np.asarray(v, dtype=np.float64) for v in ritz_values])
    mass = np.concatenate([np.asarray(w, dtype=np.float64) for w in ritz_weights]) / len(ritz_weights)
    span = nodes.max() - nodes.min()
    if sigma is None:
        # A single distinct node (e.g. H = cI) has no range: fall back to its magnitude.
        sigma = 0.01 * (span if span > 0 else max(abs(nodes).max(), 1.0))
    if isinstance(grid, int):
        points = np.linspace(nodes.min() - 6 * sigma, nodes.max() + 6 * sigma, grid)
    else:
        points = np.asarray(grid, dtype=np.float64)
    gauss = np.exp(-0.5 * ((points[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return {"grid": points.tolist(), "density": (gauss @ mass).tolist(), "sigma": float(sigma)}
