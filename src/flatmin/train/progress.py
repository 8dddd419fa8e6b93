"""Progress of a run: a tqdm bar on a terminal, one plain line per epoch otherwise."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from tqdm import tqdm


class Progress:
    """Per-epoch progress. ``mode``: ``auto`` (a bar when stderr is a terminal, log lines
    otherwise), ``bar``, ``log`` or ``none``."""

    def __init__(self, mode: str = "auto", prefix: str = "") -> None:
        self.bar_enabled = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.log_enabled = mode in ("log", "auto") and not self.bar_enabled
        self.prefix = prefix
        self._bar: Optional[tqdm] = None

    def start_epoch(self, epoch: int, epochs: int, updates: int) -> None:
        if self.bar_enabled:
            self._bar = tqdm(total=updates, desc=f"{self.prefix}epoch {epoch + 1}/{epochs}", leave=False,
                             dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def end_epoch(self, row: Dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.bar_enabled or self.log_enabled:
            parts = [f"{self.prefix}epoch {row['epoch']}/{row['epochs']}"]
            parts += [f"{k} {_fmt(row[k])}" for k in ("step_loss", "test_acc", "val_acc", "sigma", "lr",
                                                      "samples_per_s") if row.get(k) is not None]
            line = "  ".join(parts)
            if self.bar_enabled:
                tqdm.write(line, file=sys.stderr)
            else:
                print(line, flush=True)

    def message(self, text: str) -> None:
        if self.bar_enabled:
            tqdm.write(text, file=sys.stderr)
        elif self.log_enabled:
            print(text, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)
