"""flatmin under the Hugging Face Trainer (``pip install 'flatmin[huggingface]'``).

``transformers.Trainer`` runs forward and backward in ``training_step`` and then calls
``optimizer.step()`` without a closure: a flatmin method, which must compute its gradients at
weights of its own choosing, cannot work that way. ``FlatminTrainer`` changes one thing: the
micro-batches of an update (``gradient_accumulation_steps`` of them) are held until the last one
arrives, and then one flatmin step runs the Trainer's own ``training_step`` on each of them as its
closure, so the loss, its normalisation, autocast and ``accelerator.backward`` keep their meaning.
The Trainer's later ``optimizer.step()`` finds the update done and does nothing.

What keeps its meaning:

* ``gradient_accumulation_steps``: the update's gradient is the sum over the held micro-batches,
  all at the same perturbed (or unperturbed) weights, as inside one flatmin closure.
* ``max_grad_norm``: becomes the flatmin optimizer's ``max_grad_norm`` (unless it has its own),
  applied to the update's gradient before the base step. The logged ``grad_norm`` is that of the
  gradient the update used, after clipping.
* bf16 (autocast) works as in the Trainer; fp16 (CUDA) connects Accelerate's ``GradScaler`` as the
  flatmin optimizer's ``grad_scaler``, and a step the scaler skips is reported to the Trainer as
  skipped, so its learning-rate scheduler does not advance.
* learning-rate schedulers: the Trainer's own (or yours, built on the flatmin optimizer) drive the
  shared ``param_groups``.
* the loss logged for an update is the sum of its micro-batches' losses, counted with the last
  micro-batch (the others report 0): the clean loss for SAM and the mixed methods, the perturbed
  loss for RWP and ARWP.

The mixed methods use each update's micro-batches for both their terms. DeepSpeed and FSDP shard
the weights that a flatmin method perturbs: they are refused.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..optim.base import WrappedOptimizer
from ..optim.factory import METHODS, create
from . import require

require("transformers", "huggingface")
from transformers import Trainer  # noqa: E402


class _UpdatedInTrainingStep(torch.optim.Optimizer):
    """The optimizer the Trainer holds: the flatmin optimizer, whose update has already run inside
    ``training_step`` by the time the Trainer calls ``step()``, which therefore does nothing.

    Like Accelerate's own optimizer wrapper it shares everything else with the optimizer inside
    (groups, state, state_dict), so schedulers, checkpoints and resuming see the flatmin optimizer.
    """

    def __init__(self, optimizer: WrappedOptimizer) -> None:  # no Optimizer.__init__: nothing of its own
        self.optimizer = optimizer

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class FlatminTrainer(Trainer):
    """A ``transformers.Trainer`` whose updates are a flatmin method's.

    Give it a flatmin optimizer, ``optimizers=(flatmin.create("m-arwp", model, ...), scheduler or
    None)``, or name the method and let the Trainer build it from its arguments
    (``args.optim``, ``learning_rate``, ``weight_decay`` with its no-decay group, ``seed``):
    ``flatmin_method="m-arwp", flatmin_kwargs={"sigma": 0.01}``; one of the two is required.
    ``flatmin_method="sgd"`` (or a plain torch optimizer) trains exactly like ``Trainer``. ``trainer.flatmin_optimizer`` is the
    flatmin optimizer (``skipped_steps``, σ, ...).

    Args:
        *args: the ``Trainer``'s positional arguments (``model``, ``args``, ...).
        flatmin_method: the method by name (one of ``flatmin.METHODS``), built by `create_optimizer`
            from ``TrainingArguments``; ``None`` when ``optimizers=`` brings the optimizer.
        flatmin_kwargs: the method's hyperparameters (``sigma``, ``lam``, ...; ``seed`` defaults to
            ``args.seed``).
        **kwargs: the ``Trainer``'s keyword arguments.

    Raises:
        ValueError: an unknown ``flatmin_method``, ``flatmin_kwargs`` without it, both a method and
            ``optimizers=``, or DeepSpeed or FSDP enabled.
    """

    def __init__(
        self, *args: Any, flatmin_method: Optional[str] = None, flatmin_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if flatmin_method is not None and (not isinstance(flatmin_method, str) or flatmin_method.lower() not in METHODS):
            raise ValueError(f"unknown flatmin_method {flatmin_method!r}: choose one of {', '.join(METHODS)}")
        if flatmin_kwargs and flatmin_method is None:
            raise ValueError("flatmin_kwargs needs flatmin_method (the method they belong to)")
        self.flatmin_method = flatmin_method
        self.flatmin_kwargs = dict(flatmin_kwargs or {})
        self.flatmin_optimizer: Optional[WrappedOptimizer] = None
        self._held: List[Tuple[Any, Any]] = []
        super().__init__(*args, **kwargs)
        if flatmin_method is not None and self.optimizer is not None:
            raise ValueError("give either optimizers=(flatmin optimizer, scheduler) or flatmin_method, not both")
        if flatmin_method is None and self.optimizer is None:
            # Without either, the Trainer would build its plain AdamW and no flatmin method would run.
            raise ValueError(f"FlatminTrainer needs flatmin_method= (one of {', '.join(METHODS)}; 'sgd' trains as "
                             "the plain Trainer) or optimizers=(flatmin optimizer, scheduler)")
        for flag, name in (("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP")):
            if getattr(self, flag, False):
                raise ValueError(f"FlatminTrainer does not run under {name}: it shards the weights a flatmin method "
                                 "perturbs; use plain data parallelism (torchrun, accelerate launch)")
        self._adopt()

    def _adopt(self) -> None:
        """Put a flatmin optimizer behind the no-op step the Trainer will call."""
        if isinstance(self.optimizer, WrappedOptimizer):
            self.flatmin_optimizer = self.optimizer
            if self.flatmin_optimizer.max_grad_norm is None and self.args.max_grad_norm:
                self.flatmin_optimizer.max_grad_norm = self.args.max_grad_norm
            self.optimizer = _UpdatedInTrainingStep(self.flatmin_optimizer)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with ``flatmin_method``, that method around the base optimizer
        ``TrainingArguments`` names, with the Trainer's weight decay and its no-decay group.

        Args:
            *args: passed on to ``Trainer.create_optimizer`` (the model, in recent versions).
            **kwargs: passed on likewise.

        Returns:
            The optimizer the Trainer steps (a no-op in front of the flatmin optimizer, which
            updates inside `training_step`).
        """
        if self.optimizer is None and self.flatmin_method is not None and self.flatmin_method.lower() != "sgd":
            model = args[0] if args else kwargs.get("model") or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups = [
                {"params": [p for n, p in model.named_parameters() if p.requires_grad and n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in model.named_parameters() if p.requires_grad and n not in decay],
                 "weight_decay": 0.0},
            ]
            base, base_kwargs = (self.optimizer_cls_and_kwargs
                                 or self.get_optimizer_cls_and_kwargs(self.args, model))
            self.optimizer = create(self.flatmin_method, model, base=base, params=[g for g in groups if g["params"]],
                                    **{**base_kwargs, **self._seeded(self.flatmin_kwargs)})
        super().create_optimizer(*args, **kwargs)
        self._adopt()
        return self.optimizer

    def _seeded(self, hparams: Dict[str, Any]) -> Dict[str, Any]:
        """The method's hyperparameters, with the Trainer's seed unless they bring a seed or generator."""
        if "seed" in hparams or "generator" in hparams:
            return hparams
        return {**hparams, "seed": self.args.seed}

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """Hold the micro-batch; with the last of an update, run one flatmin step whose closure is
        the Trainer's own ``training_step`` on every held micro-batch.

        Args:
            model: the model, as the Trainer passes it (wrapped for DDP where it is).
            inputs: the micro-batch.
            num_items_in_batch: the Trainer's count of items for loss normalisation.

        Returns:
            The loss of the update (summed over its micro-batches) with its last micro-batch, zero
            for the others.

        Raises:
            ValueError: the flatmin optimizer has a ``grad_scaler`` of its own.
        """
        optimizer = self.flatmin_optimizer
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._held.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)  # counted with the update's last micro-batch
        held, self._held = self._held, []
        one_batch = super().training_step
        scaler = self.accelerator.scaler
        if optimizer.grad_scaler is not None and optimizer.grad_scaler is not scaler:
            raise ValueError("the flatmin optimizer has a grad_scaler of its own: build it without grad_scaler= "
                             "under FlatminTrainer, which connects Accelerate's (fp16)")
        optimizer.grad_scaler = scaler

        def closure() -> Tensor:
            total = torch.zeros((), device=self.args.device)
            for i, (batch, items) in enumerate(held):
                # Under DDP only the last micro-batch's backward all-reduces, as in the Trainer.
                sync = self.accelerator.no_sync(model) if i < len(held) - 1 else nullcontext()
                with sync:
                    total = total + one_batch(model, batch, items)
            return total

        loss = optimizer.step(closure)
        if scaler is not None:
            # The Trainer unscales .grad once more (to clip, to log its norm and to see whether the
            # scaler skipped the step): hand it the update's gradient in scaled form.
            grads = [p.grad for p in optimizer.trainable() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scaler.get_scale())
        return loss
