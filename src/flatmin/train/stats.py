"""Differences between methods with their uncertainty: a t-interval on differences paired by seed.

Runs of two methods with the same seed share the initial weights and the data order, so the
difference of their accuracies cancels much of the seed-to-seed spread that the accuracies of each
method show alone.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence, Tuple


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> Tuple[float, Optional[float]]:
    """The mean ``d̄`` of paired differences ``d_1 … d_n`` and the half-width ``h`` of its
    Student-t confidence interval ``d̄ ± h``:

        h = t_{(1 + confidence)/2, n−1} · s_d / sqrt(n),    s_d² = Σ (d_i − d̄)² / (n − 1)

    ``h`` is ``None`` for a single difference (no spread to estimate an interval from).
    """
    n = len(differences)
    if n < 1:
        raise ValueError("paired_t_interval needs at least one difference")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is not allowed: it must lie in (0, 1)")
    mean = statistics.fmean(differences)
    if n == 1:
        return mean, None
    from scipy.stats import t  # imported here: scipy is slow to import and only the table needs it

    return mean, float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
