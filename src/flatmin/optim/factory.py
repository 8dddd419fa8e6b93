"""Build any method by its name, for configs and the command line."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Optional, Type, Union

import torch
from torch import nn

from .arwp import ARWP
from .mrwp import MARWP, MRWP
from .rwp import RWP
from .sam import SAM

METHODS: Dict[str, Any] = {
    "sgd": None,
    "sam": SAM,
    "asam": SAM,
    "rwp": RWP,
    "arwp": ARWP,
    "m-rwp": MRWP,
    "m-arwp": MARWP,
}
"""The method names `create` takes, each with its class (``None`` for ``sgd``: the plain base
optimizer; ``asam`` is `SAM` with ``adaptive=True``)."""
BASES: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}
# Keywords that belong to some flatmin method; given to a method that lacks them, they are an error
# rather than something to pass on to the base optimizer.
METHOD_KEYWORDS = frozenset({"sigma", "lam", "eta", "beta", "rho", "adaptive", "seed", "generator",
                             "exact_restore", "grad_scaler", "max_grad_norm"})

# Where the noise comes from: every method takes them, plain SGD too (it has no noise to draw).
NOISE_KEYWORDS = frozenset({"seed", "generator"})


def _method_keywords(cls: type) -> set:
    names = set()
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            names |= set(inspect.signature(klass.__init__).parameters)
    return names & METHOD_KEYWORDS


def create(
    name: str, model: nn.Module, base: Union[str, Type[torch.optim.Optimizer]] = "sgd",
    params: Optional[Iterable[Any]] = None, **hparams: Any
) -> torch.optim.Optimizer:
    """The optimizer of method ``name`` for ``model``'s parameters.

    ``name`` is one of ``sgd, sam, asam, rwp, arwp, m-rwp, m-arwp``; ``base`` is ``"sgd"``,
    ``"adamw"``, ``"adam"`` or an optimizer class. ``hparams`` are the method's own (``sigma``,
    ``lam``, ``eta``, ``beta``, ``rho``, ``seed``, ...) and the base optimizer's (``lr``,
    ``momentum``, ``weight_decay``, ...). ``sgd`` returns the plain base optimizer (the name is the
    method "no perturbation"; with ``base="adamw"`` it is plain AdamW); it draws no noise, so it
    accepts ``seed`` and ``generator`` (as every method does, so that one call builds any of them) and
    they have no effect. ``params`` are the tensors or parameter groups to optimize (default: all of
    ``model``'s parameters).

    ```python
    opt = flatmin.create("m-arwp", model, base="adamw", lr=1e-3, seed=0)
    ```

    Args:
        name: the method, one of `METHODS` (case-insensitive).
        model: the model to train; the optimizer gets it as ``model=``, so normalisation running
            statistics follow the method's rules.
        base: the base optimizer, ``"sgd"``, ``"adamw"``, ``"adam"`` or an optimizer class.
        params: the tensors or parameter groups to optimize; ``None`` takes ``model.parameters()``.
        **hparams: the method's hyperparameters and options and the base optimizer's.

    Returns:
        The optimizer: a `RWP`, `ARWP`, `MRWP`, `MARWP` or `SAM` around ``base``, or ``base``
        itself for ``sgd``.

    Raises:
        ValueError: an unknown ``name`` or ``base``, a hyperparameter of another method (``rho``
            for ``rwp``), or a hyperparameter out of its range.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise ValueError(f"unknown base optimizer {base!r}: choose one of {', '.join(BASES)} or pass a class")
        base = BASES[base.lower()]
    cls = METHODS[key]
    allowed = NOISE_KEYWORDS if cls is None else _method_keywords(cls)
    foreign = sorted(k for k in hparams if k in METHOD_KEYWORDS and k not in allowed)
    if foreign:
        raise ValueError(
            f"method {key!r} takes no {', '.join(foreign)}; its own hyperparameters are: "
            f"{', '.join(sorted(allowed)) if cls is not None else 'none (only the base optimizer’s)'}"
        )
    params = model.parameters() if params is None else params
    if cls is None:
        seed, generator = hparams.pop("seed", None), hparams.pop("generator", None)
        if seed is not None and generator is not None:
            raise ValueError("give either seed= or generator=, not both")
        return base(params, **hparams)
    if key == "asam":
        hparams.setdefault("adaptive", True)
    return cls(params, base, model=model, **hparams)
