"""Running a chosen set of analyses in one go: the numbers to ``analysis.json``, the pictures to PNGs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

from torch import nn

from . import plots
from .evaluation import Batch, LossFn, materialize
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .landscape import landscape_1d, landscape_2d
from .radius import loss_vs_radius

# name → (analysis, plot or None). Each analysis takes (model, loss_fn, batches, seed=, progress=, **options).
PARTS: Dict[str, Tuple[Callable[..., Any], Optional[Callable[..., Any]]]] = {
    "eigenvalues": (hessian_eigenvalues, None),
    "trace": (hessian_trace, None),
    "density": (hessian_density, plots.plot_density),
    "landscape_1d": (landscape_1d, plots.plot_landscape_1d),
    "landscape_2d": (landscape_2d, plots.plot_landscape_2d),
    "radius": (loss_vs_radius, plots.plot_loss_vs_radius),
}
GROUPS = {
    "hessian": ("eigenvalues", "trace", "density"),
    "landscape": ("landscape_1d", "landscape_2d"),
}


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    what: Sequence[str] = ("hessian", "landscape", "radius"),
    out_dir: Optional[Union[str, Path]] = "analysis",
    seed: int = 0,
    *,
    progress: bool = False,
    split: str = "train",
    **options: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
    """Run the analyses named in ``what``, write ``analysis.json`` and one PNG per plot into
    ``out_dir``, and return the same dict: a key per part, ``seed``, ``split`` and ``plots`` (name →
    PNG path). With ``out_dir=None`` nothing is written and ``plots`` is empty.

    ``what`` holds groups (``hessian`` = eigenvalues, trace, density; ``landscape`` = 1-D and 2-D
    slices; ``radius``) or single parts (``eigenvalues``, ``trace``, ``density``, ``landscape_1d``,
    ``landscape_2d``, ``radius``). ``options`` are keyword arguments per part, e.g.
    ``analyze(..., eigenvalues={"k": 5}, radius={"adversarial": True})``.
    Every part gets the same ``seed`` and ``progress``.

    Args:
        model: the trained model; it is left as it was found (weights, buffers, train/eval mode).
        loss_fn: ``loss_fn(model(x), y)`` gives the mean loss of a batch (``F.cross_entropy``).
        batches: ``(x, y)`` pairs; ``L(w)`` is the mean of the loss over them.
        what: the groups or parts to run.
        out_dir: the folder for ``analysis.json`` and the PNGs (made if missing), or ``None``.
        seed: the seed of every part.
        progress: show progress bars.
        split: the split the batches come from (``train``, ``test``, ``val``), named in the plots
            and the record.
        **options: keyword arguments per part, by part name.

    Returns:
        The results by part name, with ``seed``, ``split`` and ``plots``.

    Raises:
        ValueError: an unknown name in ``what``, no batch, or a bad option of a part.
        TypeError: ``options`` for a part that does not exist.
    """
    parts = []
    for name in what:
        if name not in GROUPS and name not in PARTS:
            raise ValueError(f"unknown analysis {name!r}; choose from {sorted([*GROUPS, *PARTS])}")
        parts += [p for p in GROUPS.get(name, (name,)) if p not in parts]
    unknown = set(options) - set(PARTS)
    if unknown:
        raise TypeError(f"options for unknown analyses: {sorted(unknown)}")
    batches = materialize(batches)
    result: Dict[str, Any] = {"seed": seed, "split": split}
    for name in parts:
        run, _ = PARTS[name]
        value = run(model, loss_fn, batches, seed=seed, progress=progress, **(options.get(name) or {}))
        if name == "trace":
            value = {"estimate": value[0], "stderr": value[1]}
        result[name] = value
    result["plots"] = {}
    if out_dir is not None:
        result["plots"] = plot_parts(result, out_dir, split)
        with open(Path(out_dir) / "analysis.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


def plot_parts(result: Dict[str, Any], out_dir: Union[str, Path], split: str = "train") -> Dict[str, str]:
    """One PNG per plotted part of an ``analyze`` result in ``out_dir``, the loss axes naming
    ``split``; returns name → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {name: str(plot(result[name], out / f"{name}.png", split=split))
            for name, (_, plot) in PARTS.items() if plot is not None and name in result}
