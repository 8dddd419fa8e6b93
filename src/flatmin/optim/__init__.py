"""The methods: optimizers that build a perturbed, mixed or adversarial gradient and end in one
step of an ordinary base optimizer."""
from .arwp import ARWP
from .base import WrappedOptimizer
from .factory import METHODS, create
from .mrwp import MARWP, MRWP
from .rwp import RWP
from .sam import SAM
from .sigma_schedule import CosineIncSigma

__all__ = ["ARWP", "MARWP", "MRWP", "RWP", "SAM", "CosineIncSigma", "METHODS", "WrappedOptimizer", "create"]
