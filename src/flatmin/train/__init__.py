"""Training: the loop, its configuration, checkpoints and the multi-method comparison."""
from .compare import compare
from .config import METHOD_DEFAULTS, ConfigError, TrainConfig
from .loop import Trainer, evaluate, load_trained, train

__all__ = ["METHOD_DEFAULTS", "ConfigError", "TrainConfig", "Trainer", "compare", "evaluate", "load_trained", "train"]
