"""``python -m headatlas.cli``: the same as the ``headatlas`` script."""

from . import main

main()
