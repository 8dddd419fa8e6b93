"""TensorBoard event files of a run (``--log tensorboard``; ``pip install 'flatmin[tensorboard]'``).

One point per epoch, at step = the epoch number: every number of the epoch's ``metrics.jsonl`` row
under its own name (``step_loss``, ``test_acc``, ``lr``, ``sigma``, ...), plus ``lam`` (λ of the
mixed methods) and ``skipped_steps`` (updates skipped for a non-finite gradient so far). The files
go into the run's folder beside ``metrics.jsonl``, which stays as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .config import ConfigError


class TensorBoardLog:
    """Writes the per-epoch scalars of one run from epoch ``first_epoch`` on; points of that epoch and
    later already in the folder (an interrupted run resumed, an earlier run in the same folder) are
    dropped by TensorBoard's readers."""

    def __init__(self, out: Path, first_epoch: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log tensorboard needs TensorBoard, which is not installed: "
                              "pip install 'flatmin[tensorboard]'") from None
        self.writer = SummaryWriter(str(out), purge_step=first_epoch)

    def epoch(self, row: Dict[str, Any], lam: Optional[float], skipped_steps: int) -> None:
        """Log one epoch's ``metrics.jsonl`` row and the state beside it."""
        step = row["epoch"]
        for name, value in row.items():
            if name not in ("epoch", "epochs") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)
        if lam is not None:
            self.writer.add_scalar("lam", lam, step)
        self.writer.add_scalar("skipped_steps", skipped_steps, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
