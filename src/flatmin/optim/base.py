"""What every flatmin optimizer shares: a wrapped base optimizer, the noise generator, the final
update with its non-finite guard, AMP and clipping, and a state_dict that resumes bit-identically.

A flatmin optimizer builds a gradient (perturbed, mixed or adversarial) in ``.grad`` and ends in one
call of an ordinary base optimizer (SGD, AdamW, ...) at the unperturbed weights. The base optimizer
shares ``param_groups`` with the wrapper, so learning-rate schedulers, ``add_param_group`` and
per-group hyperparameters work on either object.

Non-finite gradients: if the gradient the update would use (or SAM's first gradient) holds an
inf or NaN, the update is skipped: weights, base-optimizer state and ARWP statistics stay as they
were, ``skipped_steps`` grows by one and a ``RuntimeWarning`` is issued. With a ``grad_scaler``
this is the scaler's ordinary business (it lowers its scale), so no warning is issued.

Gradients from outside: every gradient an update uses is computed inside ``step`` (at the weights
the method needs), so ``step`` starts from an empty ``.grad``. A gradient that appeared in ``.grad``
since the last step (a trainer that runs backward before ``optimizer.step()``, such as Lightning
with ``accumulate_grad_batches > 1``) would be thrown away silently; ``step`` refuses it instead.
Lightning's ``gradient_clip_val`` is refused too: it would clip each pass's gradient inside the
closure, where ``max_grad_norm=`` clips the update's gradient.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..perturb import owned_generator
from ..sharding import is_sharded, local

try:  # the global step hooks every optimizer runs; private to torch.optim, there since torch 2.0
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - a torch that moved them: its own step wrapper is used instead
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = None

Closure = Callable[[], Any]
BaseOptimizer = Callable[..., torch.optim.Optimizer]


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """Raise ``ValueError`` naming ``value`` and the allowed interval unless ``value`` lies in it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be a number in {interval}")
    return float(value)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``sqrt(Σ_t ||t||²)`` over all tensors, in at least float32 (inf or NaN if any element is).
    A sparse tensor's norm is that of its coalesced values (duplicate entries added first)."""
    if not tensors:
        return torch.zeros(())
    try:
        norms = torch._foreach_norm(list(tensors))
    except NotImplementedError:  # a sparse tensor (nn.Embedding(sparse=True)'s gradient) has no norm kernel
        norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t) for t in tensors]
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def _first_device(params: Iterable[Any]) -> torch.device:
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        for t in tensors:
            return t.device
    return torch.device("cpu")


def hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` with the step hooks of ``torch.optim.Optimizer`` (global and per-optimizer, pre and
    post), as torch's own wrapper runs them, but labelled for the profiler only while one records.

    torch's wrapper opens a ``record_function`` scope on every step, profiler or not, and every op
    dispatched inside the scope (the closures' included) pays for it: 50-90 µs per update of the
    digits MLP's RWP step on a CPU. A class whose ``step`` is marked ``hooked`` is not wrapped again
    by torch.
    """
    if _global_optimizer_pre_hooks is None:  # pragma: no cover - see the import above
        return step

    def run(self: torch.optim.Optimizer, args: tuple, kwargs: Dict[str, Any]) -> Any:
        for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{pre_hook} must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result}")
                args, kwargs = result
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        args = (self, *args)
        if torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return run(self, args, kwargs)
        return run(self, args, kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class: owns ``base_optimizer``, the noise ``generator`` and the final update.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        base_optimizer: the optimizer class that applies the update (``torch.optim.SGD``, ...).
        defaults: this method's hyperparameters (validated by the subclass).
        model: when given, normalisation running statistics follow the method's rules
            (docs/algorithms.md, "Normalisation statistics").
        seed: seeds the generator the noise comes from; give at most one of ``seed`` and
            ``generator``. Without either, a seed is drawn from torch's global generator, so
            ``torch.manual_seed`` makes runs repeatable.
        generator: a ``torch.Generator`` to draw the noise from instead.
        exact_restore: keep a copy of the weights while they are shifted and copy it back
            (bit-exact), instead of undoing the shift in place (a few ulp of rounding, no copy).
        grad_scaler: a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closures use;
            the optimizer unscales and steps through it, the caller runs ``scaler.update()``.
        max_grad_norm: clip the final gradient to this global 2-norm before the base step.
        **base_kwargs: passed on to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).
    """

    grads_per_step: int = 1
    batches_per_step: int = 1
    method: str = ""  # the name ``flatmin.create`` knows the method by; saved in ``state_dict()``

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in vars(cls):
            cls.step = hooked_step(cls.step)  # type: ignore[method-assign]

    def __init__(
        self,
        params: Union[Iterable[Tensor], Iterable[Dict[str, Any]]],
        base_optimizer: BaseOptimizer,
        defaults: Dict[str, Any],
        *,
        model: Optional[nn.Module] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        exact_restore: bool = False,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        max_grad_norm: Optional[float] = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, not {base_optimizer!r}"
            )
        if max_grad_norm is not None:
            check_range("max_grad_norm", max_grad_norm, 0.0, math.inf, low_open=True, high_open=True)
        params = list(params)
        self.generator = owned_generator(seed, generator, _first_device(params))
        self.model = model
        self.exact_restore = bool(exact_restore)
        self.grad_scaler = grad_scaler
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self._flags: Dict[torch.device, Tuple[Tensor, Tensor]] = {}  # the finite check's (found_inf, 1), per device
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of group dicts for both objects: a scheduler or a user editing either sees the same.
        self.param_groups = self.base_optimizer.param_groups
        # The base optimizer's full defaults too (momentum, betas, ... whether passed or not): schedulers
        # such as OneCycleLR and CyclicLR look in ``defaults`` for the momentum they cycle.
        self._shown = {**defaults, **base_kwargs}
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        self._grads_left: Optional[List[Tuple[Tensor, Optional[weakref.ref]]]] = None
        self._remember_grads()
        if grad_scaler is not None:
            self._refuse_complex_with_scaler()
        self.register_step_pre_hook(WrappedOptimizer._refuse_outside_grads)
        self.register_step_pre_hook(WrappedOptimizer._refuse_trainer_clipping)
        self.register_step_post_hook(WrappedOptimizer._remember_grads)

    def _refuse_complex_with_scaler(self) -> None:
        """torch's GradScaler cannot unscale a complex gradient (it has no kernel for it): say so now,
        naming the parameter, rather than from inside the first step."""
        names = {p: name for name, p in self.model.named_parameters()} if self.model is not None else {}
        for i, p in enumerate(p for group in self.param_groups for p in group["params"]):
            if p.is_complex():
                name = repr(names[p]) if p in names else f"#{i} (shape {tuple(p.shape)})"
                raise ValueError(
                    f"parameter {name} is complex ({p.dtype}) and grad_scaler= is given: torch's GradScaler "
                    "cannot unscale complex gradients; train complex parameters without a GradScaler (bf16 or fp32)"
                )

    def _remember_grads(self, *hook_args: Any) -> None:
        """Note which ``.grad`` tensors are there now (weakly: ``zero_grad`` may free them)."""
        self._grads_left = [(p, None if p.grad is None else weakref.ref(p.grad))
                            for group in self.param_groups for p in group["params"]]

    def _refuse_outside_grads(self, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Step pre-hook: raise if a ``.grad`` appeared since the last step ended (see the module doc).

        After a step that raised, nothing is known about ``.grad`` and nothing is checked; without a
        closure, ``step`` raises its own error.
        """
        left, self._grads_left = self._grads_left, None
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if left is None or closure is None:
            return
        for p, ref in left:
            if p.grad is not None and (ref is None or ref() is not p.grad):
                raise RuntimeError(
                    f"{type(self).__name__}.step(): .grad holds a gradient computed outside step() (for example "
                    "by Lightning with accumulate_grad_batches > 1), which the update would throw away; compute "
                    "every gradient inside the closure (accumulate micro-batches there) or call zero_grad() first"
                )

    def _refuse_trainer_clipping(self, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Step pre-hook: raise if Lightning would clip inside the closure (``gradient_clip_val``).

        Lightning's precision plugins step with ``closure=partial(_wrap_closure, module, ...)``, which
        clips every pass's gradient after its backward; the module's trainer holds the setting.
        """
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if not (isinstance(closure, functools.partial) and closure.args):
            return
        try:
            module = closure.args[0]
            clip = module.trainer.gradient_clip_val if module.automatic_optimization else None
        except (AttributeError, RuntimeError):  # not a Lightning module, or one without a trainer
            return
        if clip:
            raise ValueError(f"gradient_clip_val={clip} would clip each pass's gradient inside the flatmin step: "
                             "give the flatmin optimizer max_grad_norm= instead")

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Validate this method's hyperparameters in one parameter group (subclasses override)."""

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group of tensors to train, shared with the base optimizer, as ``torch.optim`` does.

        Args:
            param_group: a dict with ``"params"`` and, optionally, this method's hyperparameters
                and the base optimizer's options for the group (the defaults fill in the rest).

        Raises:
            ValueError: a hyperparameter of the group outside its range.
        """
        if "base_optimizer" in self.__dict__:
            # The list is shared: the base optimizer appends the group and fills in its own defaults.
            self.base_optimizer.add_param_group(param_group)
            for name, value in self.defaults.items():
                self.param_groups[-1].setdefault(name, value)
        else:
            super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def trainable(self) -> List[Tensor]:
        """The tensors that are perturbed and updated: every ``requires_grad`` tensor of every group.

        Returns:
            The tensors, group by group.
        """
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _grads(self) -> List[Tensor]:
        return [p.grad for p in self.trainable() if p.grad is not None]

    def _clear_grads(self) -> None:
        """``.grad = None`` for every tensor (``zero_grad(set_to_none=True)`` without its bookkeeping)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _all_finite(self, grads: Sequence[Tensor]) -> bool:
        """Whether every gradient is finite: one fused check per device and one host sync (and, for
        sharded gradients, one all-reduce, so that every process skips or steps together)."""
        if not grads:
            return True
        device = grads[0].device
        sharded = False
        if all(type(g) is Tensor and not g.is_sparse and g.is_floating_point() and g.device == device for g in grads):
            by_device = {device: list(grads)}  # the usual case, checked in one pass
        else:
            sharded = any(is_sharded(g) for g in grads)
            if sharded:
                grads = [local(g) for g in grads]
            if any(g.is_sparse or not g.is_floating_point() for g in grads):
                return bool(torch.isfinite(global_norm(grads)))
            by_device = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
        found = []
        for device, group in by_device.items():
            if device not in self._flags:
                self._flags[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
            found_inf, one = self._flags[device]
            found_inf.zero_()
            # Unscaling by exactly 1 changes nothing; the op's purpose here is its fused inf/NaN check.
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, one)
            found.append(found_inf)
        if sharded:
            found = [torch.stack(found).amax().reshape(1)]
            torch.distributed.all_reduce(found[0], op=torch.distributed.ReduceOp.MAX)
        return not any(found_inf.item() for found_inf in found)

    def _observe(self, pending: Any, inv_scale_sq: float) -> None:
        """Fold statistics of the perturbed gradient into the state (ARWP overrides)."""

    def _update(self, pending: Any = None) -> None:
        """Apply the base optimizer to the gradient now in ``.grad`` at the unperturbed weights.

        ``pending`` holds statistics of the perturbed gradient taken earlier in the step, before
        any unscaling; they enter the state only if the update is applied.
        """
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.base_optimizer)
        finite = self._all_finite(self._grads())
        if finite:
            if pending is not None:
                inv_scale_sq = 1.0 if scaler is None else 1.0 / scaler.get_scale() ** 2
                self._observe(pending, inv_scale_sq)
            if self.max_grad_norm is not None:
                self._clip()
        if scaler is not None:
            scaler.step(self.base_optimizer)  # skips the step itself when it found an inf
        elif finite:
            self._base_step()
        else:
            self.skipped_steps += 1
            warnings.warn(
                # One text per method, so that Python's default filter shows it once, not at every
                # skipped update of a diverging run; skipped_steps counts them.
                f"{type(self).__name__}: non-finite gradient, update skipped; weights and optimizer state are "
                "unchanged (the optimizer's skipped_steps counts the skipped updates)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _clip(self) -> None:
        """Scale the gradient to a global 2-norm of at most ``max_grad_norm``, as ``clip_grad_norm_``
        does; that function has no kernel for sparse gradients, which are scaled here the same way."""
        try:
            torch.nn.utils.clip_grad_norm_(self.trainable(), self.max_grad_norm)
        except NotImplementedError:
            grads = self._grads()
            coef = torch.clamp(self.max_grad_norm / (global_norm(grads) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, [coef.to(g.device, g.dtype.to_real()) for g in grads])

    def _base_step(self) -> None:
        """The base optimizer's step. Its wrapper's profiler label and hooks belong to this
        optimizer's step, which ran them already (global optimizer hooks would otherwise run twice
        per update), so the step itself is called, unless hooks or a scheduler's tracker were put
        on the base optimizer itself."""
        base = self.base_optimizer
        step = type(base).step
        if (getattr(step, "hooked", False) and "step" not in vars(base)
                and not base._optimizer_step_pre_hooks and not base._optimizer_step_post_hooks):
            step.__wrapped__(base)
        else:
            base.step()

    @staticmethod
    def _call(closure: Optional[Closure], what: str = "closure") -> Any:
        if closure is None:
            raise ValueError(
                f"{what} is required: a function that runs forward and backward and returns the loss (a trainer "
                "that calls optimizer.step() without one needs flatmin.integrations: FlatminTrainer for Hugging "
                "Face, FlatminMixedPrecision for Lightning's 16-mixed)"
            )
        with torch.enable_grad():
            return closure()

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's state: ``torch.optim``'s (with ARWP's statistics), the base optimizer's,
        the noise generator's and ``skipped_steps``.

        Returns:
            A dict that `load_state_dict` takes; a run resumed from it draws the same noise.
        """
        state = super().state_dict()
        state["method"] = self.method
        state["base_optimizer"] = self.base_optimizer.state_dict()
        state["generator"] = self.generator.get_state()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state written by `state_dict` of the same method.

        Args:
            state_dict: what `state_dict` returned.

        Raises:
            ValueError: ``state_dict`` is not a flatmin optimizer's (no base optimizer or generator
                entry), or torch's own check fails (another number of groups or tensors).
        """
        state_dict = dict(state_dict)
        try:
            base_state = state_dict.pop("base_optimizer")
            generator_state = state_dict.pop("generator")
        except KeyError as missing:
            raise ValueError(
                f"not a {type(self).__name__} state_dict: it has no {missing} entry"
            ) from None
        method = state_dict.pop("method", None)  # absent from checkpoints older than the entry: not checked
        if method is not None and method != self.method:
            raise ValueError(
                f"this state_dict was saved by method {method!r}; it cannot be loaded into {type(self).__name__} "
                f"(method {self.method!r}): build the optimizer of the method that saved it"
            )
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base_state)
        self.param_groups = self.base_optimizer.param_groups
        # On the CPU whatever the generator's device (a framework may have moved the state dict to a GPU).
        self.generator.set_state(generator_state.cpu())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, " + ", ".join(
            f"{k}={v!r}" for k, v in self._shown.items()
        ) + ")"
