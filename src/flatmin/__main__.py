"""``python -m flatmin ...`` is the ``flatmin`` command."""
import sys

from .cli import main

sys.exit(main())
