"""flatmin: training toward flat minima with random weight perturbation (RWP, ARWP, m-RWP, m-ARWP),
the SAM/ASAM baselines and NRS, plus the tools to train, compare and analyse.

Layers, each importing only from those above it in this list:
``sharding``/``filters``/``perturb``/``norm_stats``/``diagnostics`` (primitives) → ``optim``/``losses`` (methods)
→ ``data``/``models`` → ``analysis`` → ``distributed`` → ``train`` → ``integrations``/``cli``.
"""
from .losses import NRSLoss
from .norm_stats import frozen_norm_stats
from .optim import ARWP, MARWP, METHODS, MRWP, RWP, SAM, CosineIncSigma, create

__version__ = "0.2.0"

__all__ = ["ARWP", "MARWP", "METHODS", "MRWP", "NRSLoss", "RWP", "SAM", "CosineIncSigma", "create", "frozen_norm_stats"]
