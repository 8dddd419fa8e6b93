"""``python -m flatmin ...`` is the ``flatmin`` command."""
from .cli import command

command()
