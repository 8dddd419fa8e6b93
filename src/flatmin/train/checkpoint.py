"""Checkpoints written atomically: a crash or Ctrl-C mid-write leaves the previous one intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import torch

FORMAT = "flatmin-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def save_checkpoint(path: Union[str, Path], payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Union[str, Path], require: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` that holds every entry in ``require``; a
    clear ``CheckpointError`` otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flatmin checkpoint")
    missing = [key for key in require if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: it is damaged or was not written "
                              f"by flatmin train")
    return payload
