"""flatmin under PyTorch Lightning (``pip install 'flatmin[lightning]'``).

Automatic optimization needs nothing from here: return ``flatmin.create(name, self, ...)`` from
``configure_optimizers`` and Lightning hands its closure (training_step, zero_grad, backward) to the
flatmin step, which runs it at the weights each pass needs; the update is the direct API's, running
statistics included, with ``precision="32-true"`` or ``"bf16-mixed"``. The mixed methods then use
the same batch for both terms. What Lightning cannot do with a plain flatmin optimizer:

* ``precision="16-mixed"``: Lightning's plugin runs the closure before ``optimizer.step`` and then
  steps through its GradScaler without one, so there is nothing left to perturb: flatmin refuses
  ("closure is required"). ``FlatminMixedPrecision`` hands the closure to the flatmin step instead.
* ``accumulate_grad_batches > 1``: the accumulating batches' backward runs outside the step, at the
  unperturbed weights; flatmin refuses the gradient it would otherwise discard. Use a bigger batch.
* ``gradient_clip_val``: Lightning would clip inside the closure, i.e. each pass's gradient on its
  own; flatmin refuses it. Give the flatmin optimizer ``max_grad_norm=`` to clip the update's gradient.

Two consecutive batches per update (the papers' recipe for m-RWP and m-ARWP) need Lightning's
manual optimization, where ``manual_step`` runs one update per batch pair.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

from torch import Tensor

from ..optim.base import WrappedOptimizer
from . import require

require("lightning.pytorch", "lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402


class FlatminMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` ("16-mixed" or "bf16-mixed") under which a flatmin optimizer
    runs its closures itself.

    For a flatmin optimizer the closure goes into ``optimizer.step``; the optimizer unscales and
    steps through this plugin's ``GradScaler`` (it becomes the optimizer's ``grad_scaler``) and the
    scaler is updated once per update. Other optimizers take Lightning's usual path.

    <!-- not run: needs CUDA (16-mixed) -->
    ```python
    trainer = L.Trainer(plugins=[FlatminMixedPrecision("16-mixed", device="cuda")], ...)
    ```

    It takes the arguments of Lightning's ``MixedPrecision``:

    - ``precision``: ``"16-mixed"`` (float16 with a ``GradScaler``) or ``"bf16-mixed"``;
    - ``device``: the device autocast runs on, ``"cuda"`` or ``"cpu"``;
    - ``scaler``: the ``torch.amp.GradScaler`` to use; ``None`` makes one for ``"16-mixed"``.
    """

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        """Lightning's optimizer step: a flatmin optimizer runs ``closure`` inside its own step,
        through this plugin's scaler, which is then updated.

        Args:
            optimizer: the optimizer to step (a flatmin one, or any other).
            model: the LightningModule being trained.
            closure: Lightning's closure (forward, backward, hooks), returning the loss.
            **kwargs: passed on to ``optimizer.step``.

        Returns:
            What ``optimizer.step`` returned.

        Raises:
            ValueError: ``gradient_clip_val`` is set (use ``max_grad_norm=``), or the flatmin
                optimizer has a ``grad_scaler`` of its own.
        """
        if self.scaler is None or not isinstance(optimizer, WrappedOptimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        clip = getattr(model.trainer, "gradient_clip_val", None) if model.automatic_optimization else None
        if clip:
            raise ValueError(
                f"gradient_clip_val={clip} would clip each pass's scaled gradient inside the flatmin step: "
                "give the flatmin optimizer max_grad_norm= instead"
            )
        if optimizer.grad_scaler is None:
            optimizer.grad_scaler = self.scaler
        elif optimizer.grad_scaler is not self.scaler:
            raise ValueError("the flatmin optimizer has a grad_scaler of its own: build it without grad_scaler= "
                             "under FlatminMixedPrecision, which lends it the plugin's")
        output = optimizer.step(closure=partial(self._wrap_closure, model, optimizer, closure), **kwargs)
        self.scaler.update()
        return output


def manual_step(
    module: "pl.LightningModule", batch: Any, batch_idx: int, loss_fn: Callable[[Any], Tensor]
) -> Optional[Tensor]:
    """One flatmin update under Lightning's manual optimization, called from ``training_step``.

    For m-RWP and m-ARWP each update takes two consecutive batches of an epoch: batch ``2k`` is
    held, and with batch ``2k + 1`` the update ``opt.step(closure(B1), closure(B2))`` runs (``B1``
    clean, ``B2`` perturbed); a last odd batch is dropped, as in ``flatmin train``. Every other
    method takes one update per batch. ``loss_fn(batch)`` returns the loss; backward goes through
    ``module.manual_backward`` (precision plugins included). Returns the step's loss (the clean
    loss of B1 for the mixed methods), or ``None`` while a batch is held. Global steps count
    updates; learning-rate schedulers are stepped by the module, as always in manual optimization.

    ```python
    def training_step(self, batch, batch_idx):
        loss = manual_step(self, batch, batch_idx, self.loss)
        if loss is not None:
            self.log("train_loss", loss)
    ```

    Args:
        module: the LightningModule, with ``automatic_optimization = False`` and one optimizer.
        batch: this training step's batch.
        batch_idx: its index in the epoch (even: held, odd: the update, for the mixed methods).
        loss_fn: ``loss_fn(batch)``, the loss of a batch.

    Returns:
        The step's loss, or ``None`` while a batch is held.

    Raises:
        ValueError: automatic optimization is on, or ``configure_optimizers`` returned several
            optimizers.
    """
    if module.automatic_optimization:
        raise ValueError("manual_step is for manual optimization: set self.automatic_optimization = False")
    optimizer = module.optimizers()
    if isinstance(optimizer, list):
        raise ValueError(f"manual_step runs one optimizer, but configure_optimizers returned {len(optimizer)}")

    def closure_on(data: Any) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            loss = loss_fn(data)
            module.manual_backward(loss)
            return loss.detach()
        return closure

    optimizer.zero_grad()  # a flatmin step starts from an empty .grad anyway; a plain optimizer needs it
    if getattr(optimizer.optimizer, "batches_per_step", 1) == 1:
        return optimizer.step(closure=closure_on(batch))
    if batch_idx % 2 == 0:
        module._flatmin_first_batch = batch
        return None
    first = module.__dict__.pop("_flatmin_first_batch", None)
    if first is None:  # an odd batch without its partner (a resumed epoch): nothing to pair it with
        return None
    return optimizer.step(closure=closure_on(first), perturbed_closure=closure_on(batch))
