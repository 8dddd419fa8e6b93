"""Loss terms toward flat minima, to add to any training loop with any optimizer."""
from .nrs import NRSLoss

__all__ = ["NRSLoss"]
