"""Flatness of trained runs side by side, as the papers' figures show it.

Every checkpoint is analysed on the same batches with the same seed, so the probes, the noise draws
and the random directions (before each model's filter normalisation) are the same for all of them;
the results are overlaid in one figure per analysis, one labelled curve per run or per group of runs.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn.functional as F

from ..analysis import analyze
from ..data import split_loader, splits
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .loop import load_trained

# The analyses that overlay as curves (the 2-D landscape and the scalars do not).
OVERLAY_PARTS = ("density", "landscape_1d", "radius")


def analyze_checkpoint(checkpoint: Union[str, Path], what: Sequence[str] = OVERLAY_PARTS, *, batches: int,
                       batch_size: int, split: str = "train", seed: int = 0, device: str = "cpu",
                       progress: bool = False, options: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """``analyze`` of the model in a checkpoint written by ``flatmin train``, on the first ``batches``
    batches of ``split`` (unaugmented; see :func:`flatmin.data.split_loader` for their order):
    ``train`` (the training set, an image folder's ``train/``), ``test`` (an image folder's ``val/``)
    or ``val`` (the part of train that the run's ``val_fraction`` held out). Returns the result with
    what the run was: ``checkpoint``, ``label`` ("method seed N"), ``method``, ``seed`` (the run's),
    ``data``, ``model``, ``split`` and ``analysis_seed``."""
    cfg, model, dataset = load_trained(str(checkpoint), device)
    if split not in splits(dataset):
        held = " (val is the part of train a run holds out with --val-fraction)" if split == "val" else ""
        raise ConfigError(f"--split {split}: this run has no {split} split{held}; it has "
                          f"{', '.join(splits(dataset))} ({checkpoint})")
    loader = split_loader(dataset, split, batch_size, device=next(model.parameters()).device, seed=seed)
    data = list(itertools.islice(iter(loader), batches))
    result = analyze(model, F.cross_entropy, data, what=what, out_dir=None, seed=seed, progress=progress,
                     split=split, **(options or {}))
    del result["plots"]
    result["analysis_seed"] = result.pop("seed")
    return {"checkpoint": str(checkpoint), "label": f"{cfg.method} seed {cfg.seed}", "method": cfg.method,
            "seed": cfg.seed, "data": cfg.data, "model": cfg.model, **result}


def check_checkpoints(checkpoints: Sequence[Union[str, Path]]) -> None:
    """Every checkpoint readable, none given twice, all trained on one data set: a ``ConfigError``
    or ``CheckpointError`` before any work otherwise."""
    seen, data = set(), set()
    for path in checkpoints:
        file = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
        if file.resolve() in seen:
            raise ConfigError(f"checkpoint {path} is given twice")
        seen.add(file.resolve())
        config = load_checkpoint(file, require=("config",))["config"]
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint {path} is damaged: its config is not a mapping of settings")
        data.add(str(config.get("data")))
    if len(data) > 1:
        raise ConfigError(f"the checkpoints were trained on different data ({', '.join(sorted(data))}): "
                          "an overlay compares models on the same data")


def analyze_checkpoints(checkpoints: Sequence[Union[str, Path]], what: Sequence[str], **kwargs: Any) -> List[Dict[str, Any]]:
    """``analyze_checkpoint`` for each (after ``check_checkpoints``); labels made unique with the path."""
    check_checkpoints(checkpoints)
    entries = [analyze_checkpoint(path, what, **kwargs) for path in checkpoints]
    labels = [e["label"] for e in entries]
    for e in entries:
        if labels.count(e["label"]) > 1:
            e["label"] += f" ({e['checkpoint']})"
    return entries


def write_json(path: Path, payload: Any) -> None:
    """Through a temporary file and a rename: an interrupted write leaves no half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
