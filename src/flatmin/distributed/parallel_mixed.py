"""Parallel m-RWP and m-ARWP: the clean and the perturbed gradient on different workers at once.

The mixed gradient (docs/algorithms.md, "Parallel m-(A)RWP")

    g = (1 − λ) · ∇L(w; B1) + λ · ∇L(w + ε; B2)

has two independent terms. With N = 2k workers the even ranks (0, 2, …) are *clean*: clean rank i
computes g1_i = ∇L(w; B1_i) on its shard of B1. The odd ranks (1, 3, …) are *perturbed*: perturbed
rank j computes g2_j = ∇L(w + ε; B2_j) on its shard of B2, with the same ε on all of them. Each
worker scales its gradient by its share and one sum all-reduce leaves on every worker

    Σ_i (1 − λ)/k · g1_i + Σ_j λ/k · g2_j = (1 − λ) · ḡ1 + λ · ḡ2 = g,

which is the issue's recipe (losses scaled by 2(1 − λ) and 2λ, gradients averaged over N) with the
1/N folded into the scale. Every worker then runs the optimizer's own final update on the same g
(non-finite skip, clipping, AMP unscaling, base step), so an update costs one forward and backward
plus one all-reduce: the wall time of a data-parallel SGD step.

How the workers stay identical, bit for bit:

* ε — every rank holds rank 0's generator state (sent at construction). Perturbed ranks draw ε;
  clean ranks draw the same numbers and drop them, so the generator, which ``state_dict()`` saves,
  moves alike everywhere.
* w — perturbed ranks restore w from a copy kept while shifted (``exact`` restoration), not by
  subtracting ε again, which would leave them a few ulp away from the clean ranks; weight decay and
  momentum would carry that difference into the optimizer state. The copy exists on perturbed
  ranks only, during their pass.
* F (m-ARWP) — as in the single-process method it comes from ḡ2 alone. With k = 1 the perturbed
  rank's gradient is ḡ2; with k > 1 the perturbed ranks first average their gradients among
  themselves. Rank 1 then adds its per-filter sums Σ ḡ2² to the world all-reduce and every other
  rank adds zeros, so all ranks receive rank 1's numbers exactly (x + 0 = x).
* running statistics — only clean passes update them (perturbed passes run under
  ``frozen_norm_stats``); after the update rank 0's buffers are broadcast, so every rank keeps rank
  0's clean statistics, as DDP's ``broadcast_buffers`` does.

Communication per update: one all-reduce of the gradients (in flat buckets, a transient copy of the
gradient; DDP keeps such a copy for the whole run) and one broadcast of the buffers; for m-ARWP with
k > 1 also an all-reduce of the perturbed gradients among the perturbed ranks.

Failures: an exception inside a closure propagates on its rank after the weights are restored, as
in the single-process step, but the other ranks are already waiting in the all-reduce. They block
until the process group's timeout, or until torchrun, which watches its workers, stops all of them
when one exits with an error: a parallel job does not survive a failing closure.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..norm_stats import frozen_norm_stats
from ..optim.arwp import AdaptiveNoise
from ..optim.base import Closure
from ..optim.mrwp import MRWP
from ..filters import filter_sq_sums, is_filterwise
from ..sharding import is_sharded
from .collectives import coalesced
from .env import check_parallel_world

def _zero_stats_like(p: Tensor) -> Tensor:
    """Zeros shaped and typed as ``filter_sq_sums(p)``: one number per filter, or per element of 1-D."""
    shape = (p.shape[0],) if is_filterwise(p) else p.shape
    return torch.zeros(shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)


class ParallelMixedStep:
    """The update of an ``MRWP``/``MARWP`` optimizer with its two terms on different workers.

    Args:
        optimizer: a ``flatmin.MRWP`` or ``flatmin.MARWP`` over the plain model's parameters — not a
            DDP-wrapped model: this class does its own communication — built alike on every rank.
        model: the plain model, whose running statistics follow the method's rules; defaults to
            the optimizer's ``model=``.
        bucket_mb: the size cap of one flat all-reduce buffer, in MiB.

    Construct it on every rank once torch.distributed is initialised with an even world size and
    after any checkpoint is loaded: it copies rank 0's weights, buffers and noise generator to every
    rank, so the workers start identical whatever their seeds.

    With ``N = 2k`` workers, the even ranks compute the clean term on their shards of B1 and the
    odd ranks the perturbed term on their shards of B2, with the same ``ε``; one all-reduce of the
    gradients, each scaled by its share, gives every worker

        g = (1 − λ) · ḡ1 + λ · ḡ2         ḡ1: mean over clean ranks, ḡ2: over perturbed ranks

    and every worker runs the same update (docs/algorithms.md, "Parallel m-(A)RWP").

    Example (``torchrun --nproc-per-node 2 train.py``):

    <!-- not run: needs torchrun with two processes -->
    ```python
    env = init_distributed(parallel=True)
    opt = flatmin.MARWP(model.parameters(), torch.optim.SGD, model=model, seed=0, lr=0.1)
    parallel = ParallelMixedStep(opt)
    loader = BatchLoader(x, y, batch_size, shard=(env.rank, env.world_size))
    for xb, yb in loader:   # a shard of B1 on the clean ranks, of B2 on the perturbed ranks
        loss = parallel.step(closure_on(xb, yb))
    ```

    Raises:
        TypeError: ``optimizer`` is not an ``MRWP``/``MARWP``, or the model is DDP-wrapped or sharded.
        RuntimeError: torch.distributed is not initialised.
        ValueError: no model (neither ``model`` nor the optimizer's ``model=``).
    """

    def __init__(self, optimizer: MRWP, model: Optional[nn.Module] = None, *, bucket_mb: float = 25.0) -> None:
        if not isinstance(optimizer, MRWP):
            raise TypeError(f"ParallelMixedStep runs flatmin.MRWP or flatmin.MARWP, not {type(optimizer).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("ParallelMixedStep needs torch.distributed: call init_distributed(parallel=True) first")
        model = optimizer.model if model is None else model
        if model is None:
            raise ValueError("ParallelMixedStep needs the model (give the optimizer model=) for its running statistics")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("give ParallelMixedStep the plain model, not a DistributedDataParallel wrapper")
        if any(is_sharded(p) for p in model.parameters()):
            raise TypeError("ParallelMixedStep runs on an unsharded model; a fully_shard model trains m-(A)RWP "
                            "data-parallel with the optimizer's own step")
        check_parallel_world(dist.get_world_size())
        self.optimizer = optimizer
        self.model = model
        self.rank = dist.get_rank()
        self.k = dist.get_world_size() // 2
        self.clean = self.rank % 2 == 0
        self.adaptive = isinstance(optimizer, AdaptiveNoise)
        self.bucket_bytes = int(bucket_mb * 2**20)
        # new_group is collective: every rank calls it, members or not.
        self.perturbed_group = (
            dist.new_group(list(range(1, 2 * self.k, 2))) if self.adaptive and self.k > 1 else None
        )
        self._start_in_sync()

    def _broadcast_from_rank0(self, tensors: Sequence[Tensor]) -> None:
        coalesced(tensors, lambda flat: dist.broadcast(flat, src=0, async_op=True), self.bucket_bytes)

    def _sum(self, tensors: Sequence[Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
        coalesced(tensors, lambda flat: dist.all_reduce(flat, group=group, async_op=True), self.bucket_bytes)

    @torch.no_grad()
    def _start_in_sync(self) -> None:
        """Rank 0's weights, buffers and generator state on every rank."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        state = self.optimizer.generator.get_state().to(device)  # NCCL sends device tensors only
        self._broadcast_from_rank0([*tensors, state])
        self.optimizer.generator.set_state(state.cpu())

    def _entries(self) -> List[Tuple[dict, Tensor]]:
        """``(group, p)`` for every trainable tensor, in the optimizer's order."""
        return [(group, p) for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Any:
        """One update: this rank's ``closure`` (forward, backward, return the loss) on its own batch —
        at ``w`` on clean ranks, at ``w + ε`` on perturbed ranks — then the shared update.

        Args:
            closure: forward and backward on this rank's batch, returning the loss.

        Returns:
            This rank's loss: ``L(w; B1_i)`` on clean ranks (rank 0 included), ``L(w + ε; B2_j)``
            on perturbed ranks (``None`` there when every group has ``λ = 0``: no perturbed term).

        Raises:
            ValueError: no closure was given.
        """
        opt = self.optimizer
        if closure is None:
            opt._call(None)
        opt._clear_grads()
        perturbs = any(group["lam"] > 0 for group in opt.param_groups)
        loss = None
        if self.clean:
            if perturbs:
                # The perturbed ranks' draws, dropped: the generator moves alike on every rank.
                params = [p for _, p in opt._noise_entries()]
                opt._noise_layout(params).skip(params, opt.generator)
            loss = opt._call(closure)
        elif perturbs:
            # Restored from a copy: subtracting ε again would leave these ranks a few ulp from the clean ones.
            with frozen_norm_stats(self.model), opt._perturbed(exact=True):
                loss = opt._call(closure)

        entries = self._entries()
        has_grad = [p.grad is not None for _, p in entries]
        for _, p in entries:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must send the same tensors
        grads = [p.grad for _, p in entries]
        # Row 0: how many ranks hold a gradient for the tensor; row 1: whether ḡ2 has one (rank 1 sets it).
        present = torch.tensor([has_grad, [False] * len(entries)], dtype=torch.float32,
                               device=grads[0].device if grads else None)

        stats: List[Tensor] = []
        if self.adaptive and perturbs:
            if self.perturbed_group is not None and not self.clean:
                self._sum([*grads, present], self.perturbed_group)
                torch._foreach_div_(grads, float(self.k))  # ḡ2 on every perturbed rank
            if self.rank == 1:
                present[1] = present[0] > 0
                stats = [filter_sq_sums(p.grad) if has else _zero_stats_like(p)
                         for (_, p), has in zip(entries, present[1].tolist())]
            else:
                stats = [_zero_stats_like(p) for _, p in entries]

        for group in opt.param_groups:
            share = (1.0 - group["lam"] if self.clean else group["lam"]) / self.k
            group_grads = [p.grad for p in group["params"] if p.requires_grad]
            if not group_grads:
                continue
            if share == 0:
                torch._foreach_zero_(group_grads)  # not a product: 0 · inf would be NaN
            else:
                torch._foreach_mul_(group_grads, share)
        self._sum([*grads, *stats, present])

        has_grad, has_g2 = (present > 0).tolist()
        for (_, p), has in zip(entries, has_grad):
            if not has:
                p.grad = None  # no rank had one: the base optimizer skips the tensor, as without workers
        pending = None
        if self.adaptive and perturbs:
            pending = [(p, sums, group["beta"]) for (group, p), sums, has in zip(entries, stats, has_g2) if has]
        opt._update(pending)
        self._broadcast_from_rank0(list(self.model.buffers()))
        return loss
