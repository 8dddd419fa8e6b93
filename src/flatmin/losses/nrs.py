"""NRS: neighbourhood region smoothing, a loss term toward flat minima (Zhao & Zhang, arXiv 2201.06064).

    L_NRS(w; B) = L(w; B) + α · mean_{x ∈ B} D(p_w(x) ‖ p_{w+ε}(x)),      p = softmax(model output)

The second term asks the model at ``w`` and a neighbour ``w + ε`` in weight space to agree on every
input, so a minimum is rewarded for being flat in the directions the neighbourhood covers. It is an
ordinary loss: backpropagate it and step with any optimizer.

Taken from the paper: the objective above — base loss plus ``α`` times the mean divergence between
the output distributions of the model and of a weight-space neighbour, with the gradient reaching
``w`` through both outputs — and KL as the divergence.

Design choices of this implementation (configurable where the paper leaves room):

* The neighbour ``ε`` (``neighbour``):

  - ``"random"`` (default): the filter-wise Gaussian draw of RWP (docs/algorithms.md), ``ε = σ · s(W) ⊙ z`` with
    ``z ~ N(0, I)`` for every trainable tensor ``W``, drawn from a generator the loss owns, in the order
    of ``model.named_parameters()``. ``s(W)`` is computed from the detached weights.
  - ``"adversarial"``: one ascent step on the divergence from the random start, the weight-space
    analogue of virtual adversarial training. With ``ε₀`` the random draw above,
    ``g = ∇_ε D(p_w ‖ p_{w+ε}) |_{ε=ε₀}`` (``p_w`` held constant), and ``ε`` is ``g`` rescaled filter
    by filter to the length of the random draw's filter: ``ε_i = g_i · ||ε₀_i|| / ||g_i||``, where a
    filter ``i`` is slice ``i`` along dim 0 of a tensor with ``ndim >= 2`` and the whole tensor when
    ``ndim <= 1`` (the same partition as ``s(W)``). So the adversarial neighbour is exactly as far from
    ``w`` as the random one, filter by filter. A filter whose gradient is exactly zero (or a tensor the
    output does not depend on) keeps its random draw.

  In both cases ``ε`` is a constant for differentiation: no gradient flows through its construction.

* The direction of ``D`` (``divergence``): ``"kl"`` is ``KL(p_w ‖ p_{w+ε})`` as in the equation,
  ``"reverse-kl"`` is ``KL(p_{w+ε} ‖ p_w)``, ``"symmetric"`` the average of the two. All are computed
  from log-softmax; the class dimension is dim 1 (dim 0 for an unbatched 1-D output), the KL is summed
  over it and averaged over every other position (the samples, and spatial positions if any).

* The perturbed model is evaluated with ``torch.func.functional_call`` on ``W + ε``: no copy of the
  model and no in-place change of the weights. Normalisation running statistics are updated by the
  clean forward only (the perturbed passes run inside :func:`flatmin.frozen_norm_stats`).

* ``alpha = 1.0`` and ``sigma = 0.01`` are placeholders until they are tuned on a validation split.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..norm_stats import frozen_norm_stats
from ..optim.base import check_range
from ..filters import filter_scales, filter_view, is_filterwise
from ..perturb import gaussian_draw, owned_generator, shifted_by
from ..sharding import is_sharded, local, local_range, reshard

NEIGHBOURS = ("random", "adversarial")
DIVERGENCES = ("kl", "reverse-kl", "symmetric")

BaseLoss = Callable[[Tensor, Any], Tensor]


def _check_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be one of {', '.join(map(repr, allowed))}")
    return value


def _class_dim(output: Tensor) -> int:
    return 1 if output.ndim >= 2 else 0


def _kl(log_p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` along ``dim``, per position (not reduced further)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim)


def output_divergence(clean: Tensor, perturbed: Tensor, divergence: str = "kl") -> Tensor:
    """Mean divergence between ``softmax(clean)`` (``p_w``) and ``softmax(perturbed)`` (``p_{w+ε}``).

    ``"kl"``: ``KL(p_w ‖ p_{w+ε})``; ``"reverse-kl"``: ``KL(p_{w+ε} ‖ p_w)``; ``"symmetric"``: their
    average. Summed over the class dimension (dim 1, or dim 0 for a 1-D output) and averaged over all
    other positions. Gradients flow into both arguments.
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    if clean.shape != perturbed.shape:
        raise ValueError(f"clean and perturbed outputs differ in shape: {tuple(clean.shape)} vs {tuple(perturbed.shape)}")
    dim = _class_dim(clean)
    log_p = F.log_softmax(clean, dim=dim)
    log_q = F.log_softmax(perturbed, dim=dim)
    if divergence == "kl":
        per_position = _kl(log_p, log_q, dim)
    elif divergence == "reverse-kl":
        per_position = _kl(log_q, log_p, dim)
    else:
        per_position = 0.5 * (_kl(log_p, log_q, dim) + _kl(log_q, log_p, dim))
    return per_position.mean()


def _raw_filter_norms(t: Tensor) -> Tensor:
    """Norm of each filter of ``t`` (slice along dim 0 for ``ndim >= 2``, whole tensor otherwise),
    broadcastable against ``t`` and without the floor of :func:`flatmin.filters.filter_norms`."""
    if is_filterwise(t):
        return filter_view(torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1), t)
    return torch.linalg.vector_norm(t)


def _same_length(direction: Optional[Tensor], start: Tensor) -> Tensor:
    """``direction`` rescaled per filter to the length of ``start``'s filter; ``start`` where it is zero."""
    if direction is None:
        return start
    length = _raw_filter_norms(direction)
    nonzero = length > 0
    ratio = torch.where(nonzero, _raw_filter_norms(start) / torch.where(nonzero, length, torch.ones_like(length)), 0)
    return torch.where(nonzero, direction * ratio, start)


class NRSLoss:
    """Neighbourhood region smoothing: ``L(w; B) + α · mean_x D(p_w(x) ‖ p_{w+ε}(x))``
    (docs/algorithms.md, "NRS").

        L_NRS(w; B) = L(w; B) + α · mean_{x in B} D(p_w(x), p_{w+ε}(x))
        ε = σ · s(W) ⊙ z,    z ~ N(0, I)

    with the random neighbour (the adversarial one takes one ascent step on ``D`` from it). The
    gradient reaches ``w`` through both outputs.

    ```python
    nrs = flatmin.NRSLoss(alpha=1.0, sigma=0.01, seed=0)
    for x, y in loader:
        opt.zero_grad()
        loss = nrs(model, x, y)                 # base_loss=F.cross_entropy by default
        loss.backward()
        opt.step()
        correct += (nrs.last_output.argmax(1) == y).sum()   # no second forward needed
    ```

    Args:
        alpha: weight ``α >= 0`` of the divergence term; ``0`` gives exactly the base loss (the
            perturbed pass is then skipped).
        sigma: relative radius ``σ >= 0`` of the neighbour: ``ε = σ · s(W) ⊙ z`` (filter-wise ``s``).
        neighbour: ``"random"`` (a Gaussian draw) or ``"adversarial"`` (one ascent step on the
            divergence from that draw, rescaled filter by filter to the draw's length); see the
            module docstring.
        divergence: ``"kl"`` = ``KL(p_w ‖ p_{w+ε})``, ``"reverse-kl"`` = ``KL(p_{w+ε} ‖ p_w)``,
            ``"symmetric"`` = their average.
        seed: seed of the generator the noise comes from; give at most one of ``seed`` and
            ``generator``. Without either, a seed is drawn from torch's global generator (so
            ``torch.manual_seed`` makes runs repeatable). That generator lives on the CPU and the
            draws are moved to the weights' device.
        generator: a ``torch.Generator`` to draw the noise from instead; pass a CUDA one to draw
            on the GPU.

    After each call, ``last_output`` (the clean model output), ``last_base_loss`` and
    ``last_divergence`` hold detached copies of what was computed (``last_divergence`` is ``None``
    when ``alpha == 0``). ``state_dict()`` / ``load_state_dict()`` save and restore the generator, so a
    resumed run draws the same neighbours as an uninterrupted one.

    Only tensors with ``requires_grad`` are perturbed. Stochastic layers (dropout) draw independently
    in the clean and perturbed passes, so their noise also enters the divergence.

    Raises:
        ValueError: ``alpha`` or ``sigma`` negative or not finite (also when set later), an unknown
            ``neighbour`` or ``divergence``, or both ``seed`` and ``generator``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        sigma: float = 0.01,
        neighbour: str = "random",
        divergence: str = "kl",
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.alpha = alpha
        self.sigma = sigma
        self.neighbour = _check_choice("neighbour", neighbour, NEIGHBOURS)
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.generator = owned_generator(seed, generator)
        self.last_output: Optional[Tensor] = None
        self.last_base_loss: Optional[Tensor] = None
        self.last_divergence: Optional[Tensor] = None

    # Hyperparameters are validated whenever they are set, so a schedule cannot slip in a bad value.
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_range("alpha", value, 0.0, math.inf, high_open=True)

    @property
    def sigma(self) -> float:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = check_range("sigma", value, 0.0, math.inf, high_open=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(alpha={self.alpha}, sigma={self.sigma}, "
            f"neighbour={self.neighbour!r}, divergence={self.divergence!r})"
        )

    @staticmethod
    def _trainable(model: nn.Module) -> List[Tuple[str, Tensor]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def _random(self, params: List[Tuple[str, Tensor]]) -> List[Tensor]:
        """``ε = σ · s(W) ⊙ z`` per tensor, drawn in order from the loss's generator (for a tensor
        sharded along dim 0: the whole tensor's ``z``, and this process's rows of ``ε``)."""
        out = []
        with torch.no_grad():
            tensors = [p.detach() for _, p in params]
            for w, scale in zip(tensors, filter_scales(tensors)):
                z = gaussian_draw(w.shape, self.generator, local(w))
                if is_sharded(w):  # a copy of this process's rows: the whole draw is freed
                    start, stop = local_range(w)
                    z = z.flatten()[start:stop].view(local(w).shape).clone()
                out.append(z.mul_(scale.mul_(self.sigma)))
        return out

    def _check_unsharded(self, params: List[Tuple[str, Tensor]], what: str) -> None:
        if any(is_sharded(p) for _, p in params):
            raise ValueError(f"NRSLoss: {what} on a model sharded with fully_shard (DTensor parameters): its "
                             "forward gathers the weights itself; use nrs.backward(model, x, y) with the random "
                             "neighbour")

    def perturbation(
        self, model: nn.Module, x: Tensor, clean_output: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """The neighbour ``ε`` for this call, by parameter name (detached; advances the generator).

        ``clean_output`` (the model's output at ``w`` on ``x``) is needed by the adversarial neighbour
        only; without it that neighbour runs a clean forward of its own with running statistics frozen.

        Args:
            model: the model whose trainable parameters are perturbed.
            x: the batch's inputs (the adversarial neighbour ascends on them).
            clean_output: ``model(x)`` at ``w``, if already computed.

        Returns:
            ``ε`` for every trainable parameter, by name.

        Raises:
            ValueError: the adversarial neighbour on a sharded model.
        """
        params = self._trainable(model)
        start = self._random(params)
        if self.neighbour == "random":
            return {name: e for (name, _), e in zip(params, start)}
        self._check_unsharded(params, "the adversarial neighbour")
        with torch.no_grad(), frozen_norm_stats(model):
            clean = model(x) if clean_output is None else clean_output.detach()
        probe = [e.clone().requires_grad_(True) for e in start]
        with torch.enable_grad(), frozen_norm_stats(model):
            shifted = {name: p.detach() + e for (name, p), e in zip(params, probe)}
            d = output_divergence(clean, functional_call(model, shifted, (x,)), self.divergence)
        if d.requires_grad:
            grads = torch.autograd.grad(d, probe, allow_unused=True)
        else:
            grads = (None,) * len(probe)
        with torch.no_grad():
            return {name: _same_length(g, e) for (name, _), g, e in zip(params, grads, start)}

    def __call__(
        self, model: nn.Module, x: Tensor, y: Any, base_loss: BaseLoss = F.cross_entropy
    ) -> Tensor:
        """``base_loss(model(x), y) + α · D(p_w ‖ p_{w+ε})`` on this batch: a scalar to backpropagate.

        The clean forward is the only one that updates normalisation running statistics.

        Args:
            model: the model being trained.
            x: the batch's inputs.
            y: the batch's targets, as ``base_loss`` takes them.
            base_loss: ``base_loss(output, y)``, the mean loss of the batch.

        Returns:
            ``L_NRS`` of the batch, a scalar with its graph.

        Raises:
            ValueError: ``model`` is sharded with ``fully_shard`` (use `backward` there).
        """
        self._check_unsharded(self._trainable(model), "nrs(model, x, y)")
        output = model(x)
        base = base_loss(output, y)
        divergence: Optional[Tensor] = None
        if self.alpha == 0:
            loss = base
        else:
            eps = self.perturbation(model, x, output)
            with frozen_norm_stats(model):
                shifted = {name: p + eps[name] for name, p in self._trainable(model)}
                perturbed = functional_call(model, shifted, (x,))
            divergence = output_divergence(output, perturbed, self.divergence)
            loss = base + self.alpha * divergence
        self.last_output = output.detach()
        self.last_base_loss = base.detach()
        self.last_divergence = None if divergence is None else divergence.detach()
        return loss

    def backward(self, model: nn.Module, x: Tensor, y: Any, base_loss: BaseLoss = F.cross_entropy) -> Tensor:
        """Backpropagate ``L_NRS`` of this batch into ``.grad`` (adding to it, as ``loss.backward()``
        does) and return the loss, detached.

        The gradient is that of ``nrs(model, x, y).backward()``. On a model sharded with FSDP2
        (``fully_shard``), whose forward gathers the weights itself so that they cannot be swapped
        functionally, it is computed in two backward passes, each at the weights its branch ran at:
        the perturbed branch while the shards are shifted to ``w + ε`` in place, then the clean branch
        at ``w``. Only the random neighbour is available there. Running statistics are updated by the
        clean forward only.

        Args:
            model: the model being trained, plain or sharded.
            x: the batch's inputs.
            y: the batch's targets.
            base_loss: ``base_loss(output, y)``, the mean loss of the batch.

        Returns:
            ``L_NRS`` of the batch, detached.

        Raises:
            ValueError: the adversarial neighbour on a sharded model.
        """
        params = self._trainable(model)
        if not any(is_sharded(p) for _, p in params):
            loss = self(model, x, y, base_loss)
            loss.backward()
            return loss.detach()
        if self.neighbour != "random":
            self._check_unsharded(params, "the adversarial neighbour")
        output = model(x)
        clean_leaf = output.detach().requires_grad_(True)
        with torch.enable_grad():
            base = base_loss(clean_leaf, y)
        divergence: Optional[Tensor] = None
        if self.alpha == 0:
            total = base
            (clean_grad,) = torch.autograd.grad(total, [clean_leaf])
        else:
            eps = self._random(params)
            shards = [local(p) for _, p in params]
            with frozen_norm_stats(model), shifted_by(shards, eps):
                reshard(model)  # the next forward gathers the shifted shards
                perturbed = model(x)
                perturbed_leaf = perturbed.detach().requires_grad_(True)
                with torch.enable_grad():
                    divergence = output_divergence(clean_leaf, perturbed_leaf, self.divergence)
                    total = base + self.alpha * divergence
                clean_grad, perturbed_grad = torch.autograd.grad(total, [clean_leaf, perturbed_leaf])
                perturbed.backward(perturbed_grad)
            reshard(model)  # the clean branch's backward gathers the restored shards
        output.backward(clean_grad)
        self.last_output = output.detach()
        self.last_base_loss = base.detach()
        self.last_divergence = None if divergence is None else divergence.detach()
        return total.detach()

    def state_dict(self) -> Dict[str, Any]:
        """The generator state (the hyperparameters belong to the run's configuration).

        Returns:
            A dict that `load_state_dict` takes.
        """
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the generator from `state_dict`, so that the next neighbours are those of the
        saved run.

        Args:
            state_dict: what `state_dict` returned.

        Raises:
            ValueError: ``state_dict`` has no generator entry.
        """
        if "generator" not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state_dict: it has no 'generator' entry")
        self.generator.set_state(state_dict["generator"])
