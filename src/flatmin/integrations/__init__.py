"""flatmin inside the trainers people already use, one module per framework:

* ``flatmin.integrations.lightning``: Lightning's 16-mixed precision, and two batches per update for
  the mixed methods under manual optimization (automatic optimization needs nothing from here);
* ``flatmin.integrations.huggingface``: ``FlatminTrainer``, a drop-in ``transformers.Trainer``.

Accelerate and ``torch.compile`` need no code of ours (see docs/integrations.md). Each module imports its
framework, an optional extra: ``import flatmin`` works without any of them, and a missing one is
named with the command that installs it.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or an ``ImportError`` saying which flatmin extra installs it.

    Args:
        module: the module to import (``"lightning.pytorch"``).
        extra: the flatmin extra that installs it (``"lightning"``).

    Returns:
        The module.

    Raises:
        ImportError: the module is not installed; the message names ``pip install 'flatmin[extra]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"flatmin.integrations.{extra} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'flatmin[{extra}]'"
        ) from err
