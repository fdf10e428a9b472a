"""``python -m qexp.bench``."""

from .cli import main

main()
